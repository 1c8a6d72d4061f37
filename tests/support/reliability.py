"""The reliability suite's pieces: the service's environment, callbacks over HTTP, what arrived, a private
MariaDB that a test may crash (the `private_mariadb` fixture: test modules import it from here)."""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
import sqlalchemy as sa

import templates_repo
from store import db, migrate
from support import base_env, change_xml, free_port, wait_until
from support.state import count, rows  # noqa: F401 (the reliability tests read rows through here)

# Short settings: every case below must finish in seconds, not in production's minutes.
FAST = {"LEASE_SECONDS": "2", "RETRY_BACKOFF_SECONDS": "0.2", "SMTP_TIMEOUT_SECONDS": "5"}


def reliability_env(standin, smtp_sink, database_url: str, **overrides) -> dict[str, str]:
    """A complete service environment on MariaDB, the WeCom stand-in and the SMTP sink."""
    env = base_env(WECOM_API_BASE=standin.api_base, DATABASE_URL=database_url, MAIL_BACKEND="smtp",
                   SMTP_HOST="127.0.0.1", SMTP_PORT=smtp_sink.port, SMTP_SECURITY="none", **FAST)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def prepare_database(database_url: str) -> sa.engine.Engine:
    """Create the state tables and the original template rows, as `init-db --seed-templates` does."""
    engine = db.make_engine(database_url)
    migrate.upgrade(engine)
    templates_repo.seed_templates(engine, "ipaas_email_template", "tencent-wechat")
    return engine


def event_xml(userid: str, change_type: str = "create_user", **fields) -> str:
    return change_xml(change_type, userid, **fields)


def packet(crypto, xml: str) -> tuple[str, bytes]:
    """The query string and body WeCom would POST for `xml` (kept, so it can be sent again as a retry)."""
    sealed = crypto.encrypt(xml)
    return urlencode(sealed["query"]), sealed["body"]


def post(base: str, sealed: tuple[str, bytes], session=None, timeout: float = 10) -> requests.Response:
    """POST one sealed callback to a running service."""
    query, body = sealed
    return (session or requests).post(f"{base}/wecom/callback?{query}", data=body, timeout=timeout,
                                      headers={"Content-Type": "text/xml"})


# --- what a user sees: mails at the sink, rows in the database -------------------------------------

def recipients(sink) -> collections.Counter:
    """How many messages each address received."""
    return collections.Counter(m["X-RcptTo"] for m in sink.messages)


def duplicates(counter: collections.Counter) -> int:
    return sum(n - 1 for n in counter.values() if n > 1)


def addresses(n: int, prefix: str = "user") -> set[str]:
    return {f"{prefix}{i:04d}@corp.example" for i in range(1, n + 1)}


def wait_for(predicate, timeout: float, what: str, *processes):
    """wait_until, failing with `what` and the tail of each process's log on timeout."""
    try:
        return wait_until(predicate, timeout=timeout, interval=0.05, what=what)
    except AssertionError as exc:
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log[-2500:]}" for p in processes)
        pytest.fail(f"{exc}\n{logs}")


def figure(name: str, value) -> None:
    """Print one measured figure (pytest -s, or the captured output of a failing test, shows it)."""
    print(f"[reliability] {name}: {value}", flush=True)


# --- a private MariaDB server that a test may stop and start ------------------------------------------

MARIADBD = shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin:/usr/bin:" + os.environ.get("PATH", ""))
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")


class PrivateMariaDB:
    """A second mariadbd on its own port and data directory; the shared server on 3306 is never touched."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.datadir = directory / "data"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = directory / "mariadbd.log"

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/wm"

    def install(self) -> None:
        args = [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
                "--skip-test-db"]
        if os.geteuid() == 0:
            args.append("--user=root")
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self, timeout: float = 60) -> None:
        args = [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                f"--socket={self.directory / 'mariadbd.sock'}", f"--pid-file={self.directory / 'mariadbd.pid'}",
                "--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-name-resolve", "--skip-log-bin",
                "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M"]
        if os.geteuid() == 0:
            args.append("--user=root")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        engine = sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{self.port}/",
                                  connect_args={"connect_timeout": 2})
        try:
            def answers():
                if self.process.poll() is not None:
                    raise RuntimeError(f"mariadbd exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
                try:
                    with engine.begin() as conn:
                        conn.execute(sa.text("CREATE DATABASE IF NOT EXISTS wm CHARACTER SET utf8mb4"))
                    return True
                except sa.exc.DBAPIError:
                    return False
            wait_until(answers, timeout=timeout, interval=0.1, what=f"mariadbd on port {self.port} to answer")
        finally:
            engine.dispose()

    def crash(self) -> None:
        """SIGKILL: the server vanishes mid-transaction, as in a power cut."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def private_mariadb(tmp_path_factory):
    """A private, installed (not started) MariaDB server; stopped at the end of the test."""
    if not MARIADBD or not INSTALL_DB:
        why = ("the database-outage case needs mariadbd and mariadb-install-db "
               "(Debian: apt-get install mariadb-server); they were not found")
        if os.environ.get("REQUIRE_MYSQL") == "1":  # CI: a missing server must not pass as a skip
            pytest.fail("REQUIRE_MYSQL=1 but " + why)
        pytest.skip(why)
    # A short path: the socket path must stay under the 107-byte limit of AF_UNIX.
    directory = tmp_path_factory.mktemp("mdb")
    server = PrivateMariaDB(directory)
    server.install()
    yield server
    server.stop()
