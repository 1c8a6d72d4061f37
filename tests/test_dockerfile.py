"""The Dockerfile, without Docker: parse it, then run its install and start steps for real.

No Docker engine runs on these machines. The slow test below does what a build and a `docker run`
would: the build stage's RUN steps in a fresh virtual environment, exactly the files the final stage
COPYs into an empty app directory, the CMD with the image's ENV, then the HEALTHCHECK command.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import ROOT, base_env, free_port, wait_until
from support.imports import graph, project_modules, reachable

DOCKERFILE = ROOT / "Dockerfile"


# --- a small Dockerfile reader ----------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """["a", "b"] for the JSON form, the shell form wrapped as Docker does."""
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return ["/bin/sh", "-c", text]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, `$NAME` references left as written."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                name, _, value = word.partition("=")
                values[name] = value
        return values

    def workdir(self) -> str:
        dirs = [i.args.strip() for i in self.all("WORKDIR")]
        return dirs[-1] if dirs else "/"


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; comments dropped, continuation lines joined."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return stages


def copy_args(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(--flags, sources, destination) of a COPY."""
    words = instruction.args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def healthcheck_command(stage: Stage) -> list[str]:
    (instruction,) = stage.all("HEALTHCHECK")
    _options, _, command = instruction.args.partition("CMD ")
    return Instruction("CMD", command).exec_form()


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if any(_matches(prefix, pattern) for prefix in prefixes):
            verdict = not negate
    return verdict


def _matches(path: str, pattern: str) -> bool:
    """Go's filepath.Match per path segment, with a leading `**/` matching any depth."""
    if pattern.startswith("**/"):
        segments = path.split("/")
        return any(_matches("/".join(segments[i:]), pattern[3:]) for i in range(len(segments)))
    want, have = pattern.split("/"), path.split("/")
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want))


def context_files(source: str, patterns: list[str] | None = None) -> list[tuple[Path, str]]:
    """(file in the build context, its path relative to the source) for one COPY source."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    matches = sorted(ROOT.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [ROOT / source]
    files = []
    for match in matches:
        if not match.exists():
            raise AssertionError(f"COPY {source}: {match.relative_to(ROOT)} does not exist (a build would fail)")
        if match.is_dir():
            for path in sorted(p for p in match.rglob("*") if p.is_file()):
                if not ignored(path.relative_to(ROOT).as_posix(), patterns):
                    files.append((path, path.relative_to(match).as_posix()))
        elif ignored(match.relative_to(ROOT).as_posix(), patterns):
            raise AssertionError(f"COPY {source}: .dockerignore excludes {match.relative_to(ROOT)} "
                                 "(a build would fail)")
        else:
            files.append((match, match.name))
    return files


def copied_into(stage: Stage, patterns: list[str] | None = None) -> dict[str, Path]:
    """Image path → context file, for every COPY of the context (not --from) in the stage."""
    image: dict[str, Path] = {}
    workdir = "/"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.args.strip()
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        flags, sources, dest = copy_args(instruction)
        if "from" in flags:
            continue
        dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
        for source in sources:
            for path, relative in context_files(source, patterns):
                if dest.endswith("/"):
                    target = dest + (relative if (ROOT / source).is_dir() or source.endswith("/") else path.name)
                else:
                    target = dest
                image[os.path.normpath(target)] = path
    return image


def image_files(stage: Stage, patterns: list[str] | None = None) -> set[str]:
    """What the stage COPYs from the context, relative to its WORKDIR (e.g. store/outbox.py)."""
    workdir = stage.workdir().rstrip("/") + "/"
    return {p.removeprefix(workdir) for p in copied_into(stage, patterns) if p.startswith(workdir)}


def missing_modules(stage: Stage, patterns: list[str] | None = None) -> list[str]:
    """Modules that app.py, gunicorn.conf.py or the healthcheck import (through each other) and the image lacks."""
    edges = graph()
    modules = project_modules()
    wanted = reachable({"app", "healthcheck"}, edges)
    gunicorn_conf = ast.parse((ROOT / "gunicorn.conf.py").read_text(encoding="utf-8"))
    wanted |= reachable({a.name for n in ast.walk(gunicorn_conf) if isinstance(n, ast.Import) for a in n.names},
                        edges)
    files = image_files(stage, patterns)
    return sorted(rel for rel in (modules[name].relative_to(ROOT).as_posix() for name in wanted) if rel not in files)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


# --- what the Dockerfile must say ------------------------------------------------------------------

def test_the_image_is_multi_stage_and_runs_gunicorn_as_a_system_user(stages):
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build.name, "a named build stage, then the final one"
    assert all(re.fullmatch(r"python:3\.11(\.[0-9]+)?-slim(-bookworm)?@sha256:[0-9a-f]{64}", s.base) for s in stages), \
        "both stages on python 3.11 slim, pinned by digest"
    assert len({s.base for s in stages}) == 1, "the build stage and the final one use the same base"
    users = final.all("USER")
    assert users and users[-1].args.split(":")[0] not in ("root", "0"), "the final stage must not run as root"
    assert any("/opt/venv" in i.args for i in final.all("COPY") if "--from=" + build.name in i.args)
    assert final.all("CMD")[-1].exec_form() == ["gunicorn", "app:create_app()"]
    env = final.env()
    assert env["BIND"] == "0.0.0.0:8000" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "8000" in [i.args for i in final.all("EXPOSE")]
    # The user is created without a login shell, and only /app/var (and the metrics dir) are its own.
    run = " ".join(i.args for i in final.all("RUN"))
    assert "--system" in run and "nologin" in run and "chown wecom:wecom /app/var" in run


def test_the_healthcheck_is_the_stdlib_probe_of_healthz(stages):
    final = stages[-1]
    command = healthcheck_command(final)
    assert command[0] == "python" and command[1].endswith("/healthcheck.py")
    (instruction,) = final.all("HEALTHCHECK")
    assert "--timeout=" in instruction.args
    probe = (ROOT / "healthcheck.py").read_text(encoding="utf-8")
    imports = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(probe)) if isinstance(n, ast.Import)}
    assert imports <= set(sys.stdlib_module_names), f"healthcheck.py must use the stdlib only: {imports}"
    assert "timeout=3" in probe and "/healthz" in probe


def test_every_module_app_py_imports_is_copied(stages):
    final = stages[-1]
    missing = missing_modules(final)
    assert not missing, (f"the service imports {', '.join(missing)} but the image does not get "
                         f"{'it' if len(missing) == 1 else 'them'}: let it in through .dockerignore")
    files = image_files(final)
    assert "gunicorn.conf.py" in files, "gunicorn reads gunicorn.conf.py from the working directory"
    assert {"store/migrations/env.py", "store/migrations/versions/0001_initial.py"} <= files


def test_a_module_left_out_of_the_image_is_named(stages):
    """The guard above works: keep store/outbox.py out of the context and it is reported."""
    patterns = dockerignore_patterns() + ["store/outbox.py"]
    assert missing_modules(stages[-1], patterns) == ["store/outbox.py"]


def test_the_image_holds_no_stand_in_demo_tests_or_benchmarks(stages):
    files = image_files(stages[-1])
    assert files, "the final stage copies the service"
    strays = sorted(f for f in files if f.split("/")[0] in ("devtools", "tests", "bench", "docs")
                    or Path(f).name in ("wecom_standin.py", "demo.py", "pyproject.toml"))
    assert not strays, f"the image would ship development code: {strays}"
    assert "app.py" in files and "store/outbox.py" in files


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context():
    patterns = dockerignore_patterns()
    for path in (".env", ".venv/bin/python", "var/wecom-mailer.db", "tests/test_cli.py", ".git/HEAD",
                 "bench/run.py", "__pycache__/app.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build context"
    for path in ("app.py", "requirements.txt", "requirements.lock", "gunicorn.conf.py", "templates/admin/base.html"):
        assert not ignored(path, patterns), f"{path} is needed in the image but .dockerignore drops it"


def compose_environment() -> dict[str, str]:
    """The `x-environment` block of docker-compose.yml (flat `NAME: value` lines; no YAML library here)."""
    lines = (ROOT / "docker-compose.yml").read_text(encoding="utf-8").splitlines()
    start = lines.index("x-environment: &environment")
    values = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        if line.strip().startswith("#"):
            continue
        name, _, value = line.strip().partition(": ")
        values[name] = value.strip().strip('"')
    return values


def compose_service(text: str, name: str) -> str:
    """The lines of one service of docker-compose.yml (two-space indented name, up to the next one)."""
    match = re.search(rf"^  {name}:\n(.*?)(?=^  \S|^\S|\Z)", text, re.M | re.S)
    assert match, f"docker-compose.yml has no service {name}"
    return match.group(1)


def test_compose_publishes_only_nginx_on_every_address_and_its_environment_is_valid():
    import config

    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    published = [m.group(0) for m in re.finditer(r'- "(?:[0-9.]+:)?[0-9]+:[0-9]+"', text)]  # host:container
    nginx = compose_service(text, "nginx")
    public = [p for p in published if not p.startswith('- "127.0.0.1:')]
    assert sorted(public) == ['- "443:443"', '- "80:80"'] and all(p in nginx for p in public), published
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx
    web = compose_service(text, "web")
    assert "ports:" not in web and '- "8000"' in web, "gunicorn must be reachable through nginx only"
    assert 'test: ["CMD", "healthcheck.sh", "--connect", "--innodb_initialized"]' in text
    assert text.count("condition: service_healthy") == 4
    assert 'command: ["flask", "--app", "app", "init-db", "--seed-templates"]' in text
    assert 'command: ["flask", "--app", "app", "worker"]' in text
    env = compose_environment()
    assert env["DATABASE_URL"].startswith("mysql+pymysql://") and "@mariadb:3306/" in env["DATABASE_URL"]
    assert (env["SMTP_HOST"], env["SMTP_PORT"], env["SMTP_SECURITY"]) == ("mailpit", "1025", "none")
    settings = config.from_env(base_env(**env))
    assert settings.smtp_port == 1025 and settings.mail_backend == "smtp"
    assert settings.trusted_proxies == 1  # nginx in front


# --- the install and start steps, for real ---------------------------------------------------------

def _on_host(text: str, paths: dict[str, Path]) -> str:
    """Rewrite image paths (longest first) to their stand-ins on this machine."""
    for image_path in sorted(paths, key=len, reverse=True):
        text = text.replace(image_path, str(paths[image_path]))
    return text


def _run_build_stage(stage: Stage, root: Path, paths: dict[str, Path]) -> None:
    workdir = root / stage.workdir().lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    for image_path, source in copied_into(stage).items():
        target = root / image_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    # `python` is the base image's interpreter: this one (3.11), wherever it lives here.
    bin_dir = root / "base-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("VIRTUAL_ENV", None)
    for run in stage.all("RUN"):
        command = [_on_host(word, paths) for word in run.exec_form()]
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"RUN {run.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _wait_healthy(command: list[str], env: dict, cwd: Path, process: subprocess.Popen, log: Path,
                  timeout: float = 60) -> None:
    """Run the HEALTHCHECK command until it passes, as Docker does during the start period (bounded)."""
    last: list[subprocess.CompletedProcess] = []

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the CMD exited early:\n{log.read_text()[-3000:]}")
        last[:] = [subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=10)]
        return last[0].returncode == 0
    try:
        wait_until(healthy, timeout=timeout, interval=0.2, what="the HEALTHCHECK command to pass")
    except AssertionError as exc:
        said = f"{last[0].stdout}{last[0].stderr}" if last else ""
        raise AssertionError(f"{exc}; it said: {said[-2000:]}\n{log.read_text()[-3000:]}") from None


@pytest.mark.slow
def test_the_build_installs_and_the_cmd_starts_healthy(stages, tmp_path):
    build, final = stages[0], stages[-1]
    root = tmp_path / "image"
    # What the final stage takes from the build stage keeps its place: /opt/venv → <root>/opt/venv.
    artifacts = [copy_args(i)[1] for i in final.all("COPY") if "from" in copy_args(i)[0]]
    paths = {image: root / image.lstrip("/") for sources in artifacts for image in sources}
    app_dir = root / final.workdir().lstrip("/")
    paths[final.workdir()] = app_dir
    _run_build_stage(build, root, paths)
    venv = paths["/opt/venv"]
    assert (venv / "bin" / "gunicorn").exists(), "the build stage left no gunicorn in /opt/venv"

    # The final stage: exactly the files it COPYs, nothing from this checkout besides.
    for image_path, source in copied_into(final).items():
        target = root / image_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (app_dir / "var").mkdir(exist_ok=True)

    port = free_port()
    image_env = {name: _on_host(value.replace("$PATH", os.environ["PATH"]), paths)
                 for name, value in final.env().items()}
    image_env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")  # /tmp/metrics is shared here
    env = {"HOME": str(tmp_path), **image_env, **base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}",
                                                          MAIL_BACKEND="file", WORKER_IN_WEB="true"),
           "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", "MAIL_FILE_DIR": str(tmp_path / "outbox")}
    cmd = final.all("CMD")[-1].exec_form()
    executable = shutil.which(cmd[0], path=env["PATH"])
    assert executable and executable.startswith(str(venv)), f"{cmd[0]} resolves to {executable}, not the venv's"
    log = tmp_path / "cmd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([executable, *cmd[1:]], cwd=app_dir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        probe = [_on_host(word, paths) for word in healthcheck_command(final)]
        probe[0] = shutil.which(probe[0], path=env["PATH"])
        assert probe[0].startswith(str(venv))
        _wait_healthy(probe, env, app_dir, process, log)

        # The one-shot of docker-compose.yml runs from the same image.
        flask = [shutil.which("flask", path=env["PATH"]), "--app", "app", "init-db", "--seed-templates"]
        seeded = subprocess.run(flask, cwd=app_dir, env=env, capture_output=True, text=True, timeout=60)
        assert seeded.returncode == 0, seeded.stderr
        assert "Initialized the state database (schema revision" in seeded.stdout
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # Stopped: the probe says unhealthy, quickly.
    down = subprocess.run(probe, cwd=app_dir, env=env, capture_output=True, text=True, timeout=10)
    assert down.returncode == 1 and "healthcheck:" in down.stderr
    assert process.returncode == 0, log.read_text()[-3000:]
