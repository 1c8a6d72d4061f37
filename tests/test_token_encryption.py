"""Security round three (issue 24), item 2: a read-only leak of the state database yields no live WeCom token.

Every access token in wm_access_tokens is sealed with AES-GCM under a key derived (HKDF) from the secret it
was issued for: every process has the secret, a reader of the database does not.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa

import config
from store import db, migrate, schema, tokens
from support import TEST_CORP_ID, TEST_SECRET, base_env
from wecom_api import WeComClient, token_key
from devtools.wecom_standin import WeComStandIn, make_members

OTHER_SECRET = "another-contact-secret-ZYXWVUTSRQPONM"


def _client(standin, engine, secret=None):
    settings = config.from_env(base_env(WECOM_API_BASE=standin.api_base))
    return WeComClient(settings, tokens.TokenStore(engine), timeout=(2.0, 5.0), secret=secret)


def _stored(engine) -> list[str]:
    with engine.connect() as conn:
        return [r.access_token for r in conn.execute(sa.select(schema.access_tokens))]


def test_a_database_reader_sees_no_access_token(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {2: make_members(2, 2)}) as standin:
        client = _client(standin, engine)
        client.list_members([2])
        issued = standin.tokens_issued
        [row] = _stored(engine)
        live = client._token()
        assert live not in row and live[:16] not in row and TEST_SECRET not in row
        assert row.startswith(tokens.SEALED_PREFIX)
        _client(standin, engine).list_members([2])  # another process unseals it: no new gettoken
        assert standin.tokens_issued == issued
    engine.dispose()


def test_a_row_sealed_for_another_secret_does_not_decrypt(db_url):
    sealed = tokens.seal("live-token-value-0123456789", OTHER_SECRET, "k" * 64)
    assert tokens.unseal(sealed, OTHER_SECRET, "k" * 64) == "live-token-value-0123456789"
    assert tokens.unseal(sealed, TEST_SECRET, "k" * 64) is None
    assert tokens.unseal(sealed, OTHER_SECRET, "j" * 64) is None  # moved to another row: refused too
    assert tokens.unseal(sealed[:-2] + "AA", OTHER_SECRET, "k" * 64) is None  # tampered
    # A row another secret sealed, planted under our key: refetched, never used.
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    key = token_key(TEST_CORP_ID, TEST_SECRET)
    tokens.TokenStore(engine).put(key, tokens.seal("planted", OTHER_SECRET, key), 4102444800.0)
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {2: make_members(2, 2)}) as standin:
        assert len(_client(standin, engine).list_members([2])[2]) == 2
        assert standin.tokens_issued == 1
    engine.dispose()


def test_an_old_clear_row_is_simply_refetched(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    key = token_key(TEST_CORP_ID, TEST_SECRET)
    tokens.TokenStore(engine).put(key, "a-clear-token-of-the-previous-release", 4102444800.0)
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {2: make_members(2, 2)}) as standin:
        assert len(_client(standin, engine).list_members([2])[2]) == 2
        assert standin.tokens_issued == 1
    [row] = _stored(engine)
    assert row.startswith(tokens.SEALED_PREFIX)
    engine.dispose()


def test_the_app_token_is_sealed_under_its_own_secret(make_app, db_url):
    app_secret = "app-secret-for-messages-Qm7Rk2Vx9"
    app = make_app(DATABASE_URL=db_url, WECOM_APP_SECRET=app_secret, WECOM_AGENT_ID="1000002")
    import services

    parts = services.of(app)
    key = token_key(TEST_CORP_ID, app_secret)
    with WeComStandIn(TEST_CORP_ID, app_secret, {}) as standin:
        settings = config.from_env(base_env(WECOM_API_BASE=standin.api_base, WECOM_APP_SECRET=app_secret))
        client = WeComClient(settings, tokens.TokenStore(parts.engine), secret=app_secret)
        client.check_token()
        live = client._token()
    [row] = _stored(parts.engine)
    assert live not in row and tokens.unseal(row, app_secret, key) == live
    assert tokens.unseal(row, TEST_SECRET, key) is None


def test_access_tokens_are_masked_in_logs_once_seen(caplog, tmp_path):
    import logs

    settings = config.from_env(base_env())
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {2: make_members(1, 2)}) as standin:
        client = WeComClient(config.from_env(base_env(WECOM_API_BASE=standin.api_base)), timeout=(2.0, 5.0))
        client.check_token()
        live = client._token()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "url ?access_token=%s", (live,), None)
    assert live not in logs.TextFormatter(settings).format(record)
