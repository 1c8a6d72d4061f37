"""Fixtures: databases (SQLite always, MariaDB too), the app, the WeCom stand-in, SMTP, real processes.

Helpers that tests import live in tests/support/; this file only holds fixtures.
"""
from __future__ import annotations

import dataclasses
import uuid

import pytest
import sqlalchemy as sa

from support.env import DEPARTMENT, TEST_AES_KEY, TEST_CORP_ID, TEST_SECRET, TEST_TOKEN, base_env
from support.mysql import MYSQL_HINT, require_mysql, server_url

# --- databases ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mysql_server_url():
    """The MariaDB server URL, checked to answer; skip (or fail under REQUIRE_MYSQL=1) otherwise."""
    url, problem = server_url()
    if url is None:
        if require_mysql():
            pytest.fail(f"REQUIRE_MYSQL=1 but {problem}")
        pytest.skip(f"{MYSQL_HINT} ({problem})")
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


# --- the app --------------------------------------------------------------------------------------------

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


# --- the outside world: WeCom API stand-in, SMTP server, real service processes -------------------------

@pytest.fixture
def standin():
    """The WeCom server API stand-in on 127.0.0.1, serving department 2 with five members."""
    from devtools.wecom_standin import WeComStandIn, make_members

    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {DEPARTMENT: make_members(5, DEPARTMENT)}) as server:
        yield server


@pytest.fixture
def smtp_sink():
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it accepts."""
    from support.smtp_server import SmtpSink

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
    import services
    import templates_repo

    flask_app = app_module.create_app(service_env)
    parts = services.of(flask_app)
    templates_repo.seed_templates(parts.template_engine, parts.settings.template_table, parts.settings.template_app)

    def make_worker(**overrides):
        return parts.make_worker(dataclasses.replace(parts.settings, **overrides))

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
    flask_app.engine = parts.engine
    flask_app.parts = parts
    return flask_app


@pytest.fixture
def department(service, standin):
    """The service with a department of ten members (user0001..user0010), each with an address."""
    from devtools.wecom_standin import make_members

    standin.set_members(DEPARTMENT, make_members(10, DEPARTMENT))
    service.drain()  # the member snapshot
    return service


@pytest.fixture
def poster(department, crypto):
    """poster(userid, change_type="create_user", n=0): one signed callback to `department` about `userid`,
    its CreateTime n seconds after support.CREATED_AT."""
    from support import CREATED_AT, change_xml, signed_post

    client = department.test_client()

    def post(userid: str, change_type: str = "create_user", n: int = 0) -> None:
        xml = change_xml(change_type, userid, create_time=CREATED_AT + n)
        assert signed_post(client, crypto, xml).data == b"success"
    return post


@pytest.fixture
def processes(tmp_path):
    """Start real service processes; all are stopped at the end of the test."""
    from support.processes import Launcher

    launcher = Launcher(tmp_path)
    yield launcher
    launcher.stop_all()


# --- WeCom application messages (issue 21) ----------------------------------------------------------------

@pytest.fixture
def messaging(standin, smtp_sink, db_url, tmp_path):
    """messaging(mode, **env): a service with WECOM_MESSAGE=mode whose self-built app is the stand-in's."""
    from support.messages import APP_AGENT_ID, APP_SECRET, build_service, message_env

    standin.enable_app(APP_AGENT_ID, APP_SECRET)

    def make(mode: str = "fallback", **env):
        return build_service(message_env(standin, smtp_sink, db_url, tmp_path, mode, **env))
    return make


# --- what this run covers ----------------------------------------------------------------------------------

def pytest_report_header(config):
    """One line at the start: which databases the storage tests run against."""
    url, what = server_url()
    return f"database tests: SQLite, and {what}" if url else f"database tests: SQLite only; {what}"


def pytest_terminal_summary(terminalreporter):
    """One line at the end: how many tests were skipped, for what reason."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ").split(" (")[0][:100]
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.write_line("skipped: " + "; ".join(f"{n} × {why}" for why, n in sorted(reasons.items())))
