"""The test harness: settings, databases (SQLite always, MariaDB when TEST_MYSQL_URL is set), app, client."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

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
