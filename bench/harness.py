"""What the benchmarks run on: databases, service processes, signed callbacks, wrk, the SMTP floors."""
from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # logs and request files (git-ignored)

# Placeholder credentials, valid in shape only (the same as the tests').
CORP_ID = "ww0123456789abcdef"
SECRET = "bench-contact-secret-0123456789abcdef"
TOKEN = "BenchCallbackToken123"
AES_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
DEPARTMENT = 2
OTHER_DEPARTMENT = 99  # events about it are recorded, then ignored by scope
MAIL_FROM = "it@corp.example"


def mysql_server_url() -> str:
    return os.environ.get("BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@contextlib.contextmanager
def database(label: str):
    """A fresh MariaDB database `wmbench_<label>_<random>`, dropped afterwards; yields its URL."""
    name = f"wmbench_{label}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(mysql_server_url())
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield sa.engine.make_url(mysql_server_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def service_env(database_url: str, api_base: str, smtp_port: int, **overrides) -> dict[str, str]:
    """The complete environment of a service process (no .env file is read: every variable is set)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
        "WECOM_CORP_ID": CORP_ID, "WECOM_CONTACT_SECRET": SECRET, "WECOM_CALLBACK_TOKEN": TOKEN,
        "WECOM_CALLBACK_AES_KEY": AES_KEY, "WECOM_DEPARTMENT_ID": str(DEPARTMENT), "WECOM_API_BASE": api_base,
        "DATABASE_URL": database_url, "MAIL_BACKEND": "smtp", "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port), "SMTP_SECURITY": "none", "MAIL_FROM": MAIL_FROM,
        "LOG_LEVEL": "INFO", "WORKER_IN_WEB": "false",
        # One mail per event and no background listing, as these rows measure; the digest's and reconciliation's
        # own rows (bench/digest.py, bench/reconcile_round.py) set theirs.
        "DIGEST_WINDOW_SECONDS": "0", "RECONCILE_SECONDS": "0",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def settings_for(env: dict[str, str]):
    import config

    return config.from_env(env)


def prepare_state(database_url: str, root: Path = ROOT) -> None:
    """State tables and the original template rows, as `init-db --seed-templates` makes them; for another
    checkout (`root`), by that checkout's own `init-db`, so the code before a change runs on its own schema."""
    if Path(root).resolve() != ROOT:
        # The command needs a complete configuration; it connects to nothing but the database.
        env = service_env(database_url, "http://127.0.0.1:9", 9)
        done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "init-db", "--seed-templates"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"init-db in {root} failed:\n{done.stdout}{done.stderr}")
        return
    import templates_repo
    from store import db, migrate

    engine = db.make_engine(database_url)
    migrate.upgrade(engine)
    templates_repo.seed_templates(engine, "ipaas_email_template", "tencent-wechat")
    engine.dispose()


def say(text: str) -> None:
    """A progress line of the benchmark run, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    from devtools.waiting import wait_until

    return wait_until(predicate, timeout=timeout, interval=interval, what=what)


def scalar(engine, query):
    with engine.connect() as conn:
        return conn.execute(query).scalar()


def start_worker(url: str, api_base: str, smtp_port: int, size: int, root: Path = ROOT, **overrides) -> dict:
    """A counted `flask worker` process on its own database, once its member snapshot of `size` is taken;
    `root` may be another checkout of the project (the code before a change)."""
    from store import db, schema

    prepare_state(url, root)
    stats_dir = OUT / f"stats-{url.rsplit('/', 1)[1]}"
    shutil.rmtree(stats_dir, ignore_errors=True)
    stats_dir.mkdir(parents=True)
    env = service_env(url, api_base, smtp_port, BENCH_STATS_DIR=stats_dir, **overrides)
    service = Service.worker(env, f"worker-{url.rsplit('/', 1)[1]}", root=root)
    engine = db.make_engine(url)
    snapshot = sa.select(schema.department_snapshots.c.member_count)
    wait_for(lambda: scalar(engine, snapshot) == size, 120, 0.1, "the worker's member snapshot")
    return {"service": service, "engine": engine, "stats_dir": stats_dir}


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (gunicorn's workers)."""
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.split("/")[2]))
    return sorted(children)


class Service:
    """A real process (gunicorn or `flask … worker`) started from the repository root (or `root`: another
    checkout, for a before/after comparison), output to a log."""

    def __init__(self, args: list[str], env: dict[str, str], name: str, root: Path = ROOT):
        OUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUT / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    def gunicorn(cls, app_spec: str, env: dict[str, str], port: int, name: str, root: Path = ROOT) -> "Service":
        """The shipped gunicorn.conf.py (2 workers, 16 threads each), bound to 127.0.0.1:port; from another
        checkout (`root`), that checkout's own gunicorn.conf.py and code."""
        env = dict(env, PORT=str(port), BIND=f"127.0.0.1:{port}")
        service = cls([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app_spec], env, name, root)
        service.base = f"127.0.0.1:{port}"
        service.port = port
        wait_for(lambda: service._answers(), 60, 0.1, f"gunicorn {app_spec} on port {port}")
        workers = int(env.get("WEB_CONCURRENCY", "2"))
        wait_for(lambda: len(child_pids(service.proc.pid)) >= workers, 30, 0.1, "gunicorn workers")
        return service

    @classmethod
    def worker(cls, env: dict[str, str], name: str, app_spec: str = "bench.instrumented:create_app",
               root: Path = ROOT) -> "Service":
        return cls([sys.executable, "-m", "flask", "--app", app_spec, "worker"], env, name, root)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.log_path.name}: exited early:\n{self.log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            connection.close()
            return True
        except OSError:
            return False

    @property
    def pids(self) -> list[int]:
        return child_pids(self.proc.pid) or [self.proc.pid]

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port() -> int:
    from devtools.ports import free_port as port

    return port()


# --- signed callbacks -------------------------------------------------------------------------

def crypto():
    import wecom

    return wecom.CallbackCrypto(TOKEN, AES_KEY, CORP_ID)


def member_event(user_id: str, department: int, change_type: str = "update_user") -> str:
    import wecom

    return wecom.event_xml(change_type, user_id, CORP_ID, str(department), name="")


def party_event(party_id: int) -> str:
    """A department change: recorded, and ignored at once (not a member change)."""
    return (f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[change_contact]]></Event><ChangeType><![CDATA[create_party]]></ChangeType>"
            f"<Id>{party_id}</Id><Name><![CDATA[bench {party_id}]]></Name><ParentId>1</ParentId></xml>")


def signed(xml: str, path: str = "/wecom/callback") -> tuple[str, bytes]:
    packet = crypto().encrypt(xml)
    return f"{path}?{urlencode(packet['query'])}", packet["body"]


def write_requests(file: Path, count: int, prefix: str) -> Path:
    """`count` distinct signed callbacks (member changes outside the watched department), one per line."""
    box = crypto()
    with open(file, "w") as out:
        for i in range(count):
            packet = box.encrypt(member_event(f"{prefix}{i:06d}", OTHER_DEPARTMENT))
            out.write(f"/wecom/callback?{urlencode(packet['query'])}\t{packet['body'].decode()}\n")
    return file


class Poster:
    """One keep-alive HTTP connection posting signed callbacks; returns each answer's latency."""

    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.connection.connect()
        # Headers and body leave in two writes: without NODELAY, Nagle and delayed ACK add 40 ms.
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, target: str, body: bytes) -> float:
        started = time.perf_counter()
        self.connection.request("POST", target, body, {"Content-Type": "text/xml"})
        response = self.connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200 or answer != b"success":
            raise RuntimeError(f"callback answered {response.status} {answer[:200]!r}")
        return elapsed

    def close(self) -> None:
        self.connection.close()


def wrk(port: int, requests_file: Path, first: int, count: int, seconds: float, rate: float = 0,
        connections: int = 16, threads: int = 2) -> dict:
    """Run wrk against 127.0.0.1:port with bench/callbacks.lua; the JSON line its done() prints."""
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed: apt-get install wrk (Debian's package)")
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "5s", "-s", str(ROOT / "bench" / "callbacks.lua"), f"http://127.0.0.1:{port}",
            "--", str(requests_file), str(first), str(count), str(rate), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            result["rps"] = result["requests"] / result["seconds"] if result["seconds"] else 0.0
            return result
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


# --- SMTP floors --------------------------------------------------------------------------------

def build_messages(settings, members: list[dict], subject: str, body: str) -> list[tuple[str, bytes]]:
    """The service's own messages (mailer.build_message), built before the clock starts."""
    import mailer

    return [(m["email"], mailer.build_message(settings, mailer.Outgoing(i, m["email"], m["name"], subject, body))
             .as_bytes()) for i, m in enumerate(members)]


def floor_send(port: int, messages: list[tuple[str, bytes]], connections: int, per_message: bool = False) -> None:
    """A bare smtplib loop: `connections` threads with one reused connection each, or (per_message)
    a new connection for every message (the naive shape)."""
    position, lock = iter(messages), threading.Lock()

    def take():
        with lock:
            return next(position, None)

    def loop():
        smtp = None if per_message else smtplib.SMTP("127.0.0.1", port, timeout=30)
        while (item := take()) is not None:
            if per_message:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as one:
                    one.sendmail(MAIL_FROM, [item[0]], item[1])
            else:
                smtp.sendmail(MAIL_FROM, [item[0]], item[1])
        if smtp is not None:
            smtp.quit()

    threads = [threading.Thread(target=loop, name=f"floor-{i}") for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)


# --- the statement counter's files ----------------------------------------------------------------

def read_stats(directory: Path, pids: list[int] | None = None) -> list[dict]:
    stats = []
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pids is None or data["pid"] in pids:
            stats.append(data)
    return stats


def total(stats: list[dict], prefix: str) -> int:
    return sum(count for data in stats for key, count in data["counts"].items() if key.startswith(prefix))


def commit_latency(database_url: str, samples: int = 400) -> dict:
    """Round trip of `SELECT 1` and of a durable single-row UPDATE (autocommit), p50 in ms: what a
    per-message `sent` mark costs at least on this machine's MariaDB and disk."""
    import pymysql

    url = sa.engine.make_url(database_url)
    connection = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username,
                                 password=url.password or "", database=url.database, autocommit=True)
    timings: dict[str, list[float]] = {"select_ms": [], "commit_ms": []}
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE bench_marks (id INT PRIMARY KEY, n INT NOT NULL) ENGINE=InnoDB")
            cursor.execute("INSERT INTO bench_marks VALUES (1, 0)")
            for _ in range(samples):
                started = time.perf_counter()
                cursor.execute("SELECT 1")
                timings["select_ms"].append(time.perf_counter() - started)
                started = time.perf_counter()
                cursor.execute("UPDATE bench_marks SET n = n + 1 WHERE id = 1")
                timings["commit_ms"].append(time.perf_counter() - started)
            cursor.execute("DROP TABLE bench_marks")
    finally:
        connection.close()
    return {key: sorted(values)[len(values) // 2] * 1000 for key, values in timings.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mariadb_pid() -> int | None:
    """The local MariaDB server's pid, for its CPU time (it serves other sessions too: an upper bound)."""
    for stat in glob.glob("/proc/[0-9]*/comm"):
        try:
            if Path(stat).read_text().strip() in ("mariadbd", "mysqld"):
                return int(stat.split("/")[2])
        except OSError:
            continue
    return None
