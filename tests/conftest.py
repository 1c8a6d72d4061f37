"""The test harness: settings, databases (SQLite always, MariaDB when TEST_MYSQL_URL is set), app, client."""
from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from smtpd import free_port  # tests/smtpd.py (pytest puts tests/ first on sys.path), re-exported to the tests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Fixed test credentials: placeholders, valid in shape only.
TEST_CORP_ID = "ww0123456789abcdef"
TEST_SECRET = "test-contact-secret-0123456789abcdef"
TEST_TOKEN = "TestCallbackToken123"
TEST_AES_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"

MYSQL_HINT = ("MariaDB tests skipped: set TEST_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/test "
              "(and REQUIRE_MYSQL=1 to make a missing server fail the run)")


def base_env(**overrides) -> dict[str, str]:
    """A complete, valid environment for the service; tests override what they exercise."""
    env = {
        "WECOM_CORP_ID": TEST_CORP_ID,
        "WECOM_CONTACT_SECRET": TEST_SECRET,
        "WECOM_CALLBACK_TOKEN": TEST_TOKEN,
        "WECOM_CALLBACK_AES_KEY": TEST_AES_KEY,
        "WECOM_DEPARTMENT_ID": "2",
        "MAIL_BACKEND": "file",
        "MAIL_FROM": "it@corp.example",
        "WORKER_IN_WEB": "false",
        "LOG_LEVEL": "INFO",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _mysql_server_url() -> str | None:
    url = os.environ.get("TEST_MYSQL_URL")
    if not url:
        if os.environ.get("REQUIRE_MYSQL") == "1":
            pytest.fail("REQUIRE_MYSQL=1 but TEST_MYSQL_URL is not set")
        return None
    return url


@pytest.fixture(scope="session")
def mysql_server_url():
    """The MariaDB server URL, checked to answer; skip (or fail under REQUIRE_MYSQL=1) otherwise."""
    url = _mysql_server_url()
    if url is None:
        pytest.skip(MYSQL_HINT)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        if os.environ.get("REQUIRE_MYSQL") == "1":
            pytest.fail(f"REQUIRE_MYSQL=1 but MariaDB at TEST_MYSQL_URL does not answer: {exc.orig}")
        pytest.skip(f"{MYSQL_HINT}; the server did not answer")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def mysql_url(mysql_server_url):
    """A fresh, empty MariaDB database for one test, dropped afterwards."""
    name = "wmtest_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(mysql_server_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    url = sa.engine.make_url(mysql_server_url).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path):
    """Each storage test runs on SQLite and on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("mysql_url")


@pytest.fixture
def crypto():
    """The callback crypto as WeCom holds it: the same token, key and corp id as the service."""
    import wecom

    return wecom.CallbackCrypto(TEST_TOKEN, TEST_AES_KEY, TEST_CORP_ID)


@pytest.fixture
def make_app(tmp_path):
    """Build an app on a given environment; defaults to a SQLite state database in tmp_path."""
    import app as app_module

    def build(**env):
        env.setdefault("DATABASE_URL", f"sqlite:///{tmp_path / 'state.db'}")
        env.setdefault("MAIL_FILE_DIR", str(tmp_path / "outbox"))
        return app_module.create_app(base_env(**env))
    return build


@pytest.fixture
def app(make_app, db_url):
    return make_app(DATABASE_URL=db_url)


@pytest.fixture
def client(app):
    return app.test_client()


def signed_post(client, crypto, xml, path="/wecom/callback", **query_overrides):
    """POST `xml` encrypted and signed as WeCom would; returns the response."""
    from urllib.parse import urlencode

    packet = crypto.encrypt(xml)
    query = dict(packet["query"], **query_overrides)
    return client.post(f"{path}?{urlencode(query)}", data=packet["body"], content_type="text/xml")


def event_rows(engine):
    import outbox

    with engine.connect() as conn:
        return conn.execute(sa.select(outbox.events).order_by(outbox.events.c.id)).all()


# --- the outside world: WeCom API stand-in, SMTP server, real service processes -------------------

DEPARTMENT = 2


@pytest.fixture
def standin():
    """The WeCom server API stand-in on 127.0.0.1, serving department 2 with five members."""
    from wecom_standin import WeComStandIn, make_members

    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {DEPARTMENT: make_members(5, DEPARTMENT)}) as server:
        yield server


@pytest.fixture
def smtp_sink():
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it accepts."""
    from smtpd import SmtpSink

    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def service_env(standin, smtp_sink, db_url, tmp_path):
    """The environment of a complete service: stand-in WeCom, real SMTP, state on SQLite or MariaDB."""
    return base_env(WECOM_API_BASE=standin.api_base, DATABASE_URL=db_url, MAIL_BACKEND="smtp",
                    SMTP_HOST="127.0.0.1", SMTP_PORT=smtp_sink.port, SMTP_SECURITY="none",
                    MAIL_FILE_DIR=str(tmp_path / "outbox"), RETRY_BACKOFF_SECONDS="0.05")


@pytest.fixture
def service(service_env):
    """An app with the templates seeded; `service.drain()` runs the delivery worker until idle."""
    import app as app_module
    import templates_repo
    import worker as delivery

    flask_app = app_module.create_app(service_env)
    settings = flask_app.config["SETTINGS"]
    templates_repo.seed_templates(app_module.template_engine(flask_app), settings.template_table,
                                  settings.template_app)

    def make_worker(**overrides):
        return delivery.Worker(dataclasses.replace(settings, **overrides), flask_app.extensions["engine"], app_module.template_engine(flask_app),
                               app_module.wecom_client(flask_app))

    def drain(worker=None, rounds: int = 200):
        """Run rounds until no event is due (bounded)."""
        worker = worker or make_worker()
        worker.ensure_snapshots()
        for _ in range(rounds):
            if not worker.run_once():
                return worker
        raise AssertionError("worker still busy after %d rounds" % rounds)

    flask_app.make_worker = make_worker
    flask_app.drain = drain
    flask_app.engine = flask_app.extensions["engine"]
    return flask_app


class Process:
    """A real service process (gunicorn or `flask worker`) with its output kept in a file."""

    def __init__(self, args, env, log_path):
        import subprocess

        self.log_path = log_path
        self._log = open(log_path, "ab")
        full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20):
        import signal as signals
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signals.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def processes(tmp_path):
    """Start real service processes; all are stopped at the end of the test."""
    started: list[Process] = []

    class Launcher:
        def gunicorn(self, env, workers: int = 1, port: int | None = None) -> tuple[Process, str]:
            port = port or free_port()
            args = [sys.executable, "-m", "gunicorn", "app:create_app()", "-b", f"127.0.0.1:{port}",
                    "--workers", str(workers), "--no-control-socket"]
            process = Process(args, env, tmp_path / f"gunicorn-{port}.log")
            started.append(process)
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", process)
            return process, base

        def worker(self, env, name: str = "worker") -> Process:
            args = [sys.executable, "-m", "flask", "--app", "app", "worker"]
            process = Process(args, env, tmp_path / f"{name}-{len(started)}.log")
            started.append(process)
            return process

    yield Launcher()
    for process in started:
        process.stop()


def wait_http(url: str, process: "Process | None" = None, timeout: float = 30) -> None:
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{process.log[-3000:]}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (bounded); return that value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
