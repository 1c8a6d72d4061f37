"""requirements.lock (what the image installs, with hashes) pins exactly what requirements.txt pins."""
from __future__ import annotations

import re

from support import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalized(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        match = PIN.match(line.strip())
        if match:
            found[normalized(match.group(1))] = match.group(2)
    return found


def locked(text: str) -> dict[str, tuple[str, list[str]]]:
    """name → (version, its sha256 hashes), from pip-compile's `name==version \\` + `--hash=…` lines."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        match = PIN.match(stripped)
        if match:
            current = normalized(match.group(1))
            entries[current] = (match.group(2), [])
        elif stripped.startswith("--hash=") and current:
            entries[current][1].append(stripped.removeprefix("--hash=").rstrip(" \\"))
        elif not stripped.startswith("#"):
            current = None
    return entries


def test_the_lock_pins_the_same_packages_and_versions_as_requirements_txt():
    wanted = pins((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    lock = locked((ROOT / "requirements.lock").read_text(encoding="utf-8"))
    assert wanted, "requirements.txt pins nothing?"
    missing = sorted(set(wanted) - set(lock))
    extra = sorted(set(lock) - set(wanted))
    differ = sorted(f"{n}: {wanted[n]} in requirements.txt, {lock[n][0]} locked" for n in set(wanted) & set(lock)
                    if wanted[n] != lock[n][0])
    assert not (missing or extra or differ), (
        f"requirements.lock is out of step with requirements.txt (run `make lock`): missing {missing}, "
        f"not in requirements.txt {extra}, other versions {differ}")


def test_every_locked_package_carries_sha256_hashes():
    lock = locked((ROOT / "requirements.lock").read_text(encoding="utf-8"))
    for name, (version, hashes) in lock.items():
        assert hashes, f"{name}=={version} has no --hash in requirements.lock"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), (name, hashes)


def test_the_image_installs_the_lock_with_require_hashes_and_requirements_txt_stays_readable():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile
    assert "COPY requirements.lock" in dockerfile and "-r requirements.txt" not in dockerfile
    readable = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert "--hash" not in readable and all(len(line) < 120 for line in readable.splitlines())
    dev = pins((ROOT / "requirements-dev.txt").read_text(encoding="utf-8"))
    assert "pip-tools" in dev, "pip-compile (make lock) comes from a pinned pip-tools"


def test_the_sync_check_notices_a_drift():
    """The check above can fail: a version bumped in requirements.txt alone is reported."""
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8").replace("Flask==3.1.3", "Flask==3.1.4")
    lock = locked((ROOT / "requirements.lock").read_text(encoding="utf-8"))
    assert pins(text)["flask"] != lock["flask"][0]
