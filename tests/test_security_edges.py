"""Security round three (issue 24): the edges. Forwarded headers only from proxy networks (item 4), no terminal
escapes in `status` and `check` (item 6), weak and short secrets (item 7), the start-up warning for a public
BIND without a proxy (item 8), /readyz cached, the generated key masked."""
from __future__ import annotations

import logging
import runpy
import time

import pytest
import sqlalchemy as sa
from flask import request

import config
import logs
import services
import wecom
from ops import checks
from store import recording, schema
from store import sessions as session_store
from support import ROOT, TEST_CORP_ID, base_env

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\r\nFORGED ✓ everything fine\u2028\x9b31m"


def _peer(app, address: str, **headers):
    app.add_url_rule("/whoami", "whoami", lambda: f"{request.remote_addr} {request.scheme}")
    return app.test_client().get("/whoami", headers=headers, environ_base={"REMOTE_ADDR": address}).text


# --- item 4: forwarded headers only from the proxies' networks --------------------------------------------

def test_forwarded_headers_count_only_from_the_proxy_networks(make_app, caplog):
    env = {"TRUSTED_PROXIES": "1", "TRUSTED_PROXY_NETWORKS": "10.0.0.0/8,fd00::/8"}
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    assert _peer(make_app(**env), "10.1.2.3", **forwarded) == "203.0.113.9 https"
    assert _peer(make_app(**env), "fd00::5", **forwarded) == "203.0.113.9 https"
    caplog.clear()
    app = make_app(**env)
    assert _peer(app, "198.51.100.7", **forwarded) == "198.51.100.7 http"  # gunicorn reached directly
    client = app.test_client()
    for _ in range(3):
        client.get("/whoami", headers=forwarded, environ_base={"REMOTE_ADDR": "198.51.100.8"})
    warnings = [r for r in caplog.records if "not a trusted proxy" in r.getMessage()]
    assert len(warnings) == 1 and "TRUSTED_PROXY_NETWORKS" in warnings[0].getMessage()


def test_a_declared_proxy_that_sends_no_forwarded_header_is_warned_about_once(make_app, caplog):
    app = make_app(TRUSTED_PROXIES="1", TRUSTED_PROXY_NETWORKS="10.0.0.0/8")
    for _ in range(3):
        assert _peer_again(app, "10.0.0.2") == "10.0.0.2 http"
    warnings = [r for r in caplog.records if "without X-Forwarded-For" in r.getMessage()]
    assert len(warnings) == 1


def _peer_again(app, address):
    if "whoami" not in app.view_functions:
        app.add_url_rule("/whoami", "whoami", lambda: f"{request.remote_addr} {request.scheme}")
    return app.test_client().get("/whoami", environ_base={"REMOTE_ADDR": address}).text


def test_without_proxy_networks_only_loopback_may_forward(make_app):
    assert _peer(make_app(TRUSTED_PROXIES="1"), "127.0.0.1", **{"X-Forwarded-For": "203.0.113.9"}) \
        .startswith("203.0.113.9")
    assert _peer(make_app(TRUSTED_PROXIES="1"), "192.0.2.4", **{"X-Forwarded-For": "203.0.113.9"}) \
        .startswith("192.0.2.4")


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-network", "10.0.0.1/8x"])
def test_a_bad_proxy_network_stops_start_up(value):
    with pytest.raises(config.ConfigError) as info:
        config.from_env(base_env(TRUSTED_PROXIES="1", TRUSTED_PROXY_NETWORKS=value))
    assert str(info.value).startswith("TRUSTED_PROXY_NETWORKS")


# --- item 6: what `status` and `check` print --------------------------------------------------------------

def test_status_escapes_control_characters_from_the_database(make_app):
    app = make_app()
    engine = services.of(app).engine
    xml = wecom.event_xml("create_user", "u1", TEST_CORP_ID, "2", 1700000000)
    row = recording.event_row(xml, wecom.parse_event(xml), "failed", "WeCom said: " + HOSTILE, time.time())
    row["user_id"] = "u" + HOSTILE[:20]
    with engine.begin() as conn:
        event_id = conn.execute(schema.events.insert(), row).inserted_primary_key[0]
        conn.execute(schema.deliveries.insert(), {"event_id": event_id, "userid": "x" + HOSTILE[:12],
                                                  "address": "a@corp.example", "status": "failed",
                                                  "reason": "550 " + HOSTILE, "attempts": 1})
    for args in (["status"], ["status", "--event", str(event_id)]):
        output = app.test_cli_runner().invoke(args=args).output
        assert "\x1b" not in output and "\x07" not in output and "\x9b" not in output and "\u2028" not in output
        assert not any(line.startswith("FORGED") for line in output.splitlines())
        assert "\\x1b]0;pwned" in output


def test_check_escapes_what_peers_answered(make_app, monkeypatch):
    app = make_app()
    monkeypatch.setattr(checks, "run_all", lambda parts: [(False, "SMTP login refused: 535 " + HOSTILE),
                                                          (True, "WeCom: errmsg " + HOSTILE)])
    output = app.test_cli_runner().invoke(args=["check"]).output
    assert "\x1b" not in output and not any(line.startswith("FORGED") for line in output.splitlines())
    assert output.count("\n") == 2 + len(checks.config_warnings(services.of(app).settings))


# --- item 7: masking only what is long enough to be a secret -----------------------------------------------

def test_a_short_secret_cannot_turn_masking_into_a_disclosure():
    with pytest.raises(config.ConfigError):
        config.from_env(base_env(METRICS_TOKEN="a"))
    settings = config.from_env(base_env(SMTP_PASSWORD="Zq8#mW2!vR5kT9"))
    assert config.mask("a quick brown fox", settings) == "a quick brown fox"
    assert all(len(v) >= config.MIN_MASKED for v in settings.masked_values)


def test_the_generated_signing_key_is_masked_in_logs(make_app):
    app = make_app(ADMIN_TOKEN="edge-test-admin-token-Gm4Rt8Vq2Lz6")
    key = session_store.shared_secret(services.of(app).engine)
    with app.test_request_context("/admin/login"):
        from ops.admin import sessions

        sessions.signing_key()
    settings = services.of(app).settings
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "key=%s", (key,), None)
    assert key not in logs.TextFormatter(settings).format(record)


# --- item 8: a public BIND without a proxy is warned about at start-up -----------------------------------

def test_gunicorn_warns_at_start_up_about_a_public_bind_without_a_proxy(monkeypatch, capsys):
    for name, value in base_env(BIND="0.0.0.0:8000").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.chdir(ROOT)
    hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    hooks["on_starting"](None)
    assert "BIND=0.0.0.0:8000 listens on a public address with no proxy declared" in capsys.readouterr().err
    monkeypatch.setenv("BIND", "127.0.0.1:8000")
    hooks["on_starting"](None)
    assert "BIND=" not in capsys.readouterr().err


# --- /readyz ------------------------------------------------------------------------------------------------

def test_readyz_is_cached_for_a_second_or_two(make_app, monkeypatch):
    import app as app_module

    calls = []
    monkeypatch.setattr(app_module, "ready", lambda engine: calls.append(1) or True)
    client = make_app().test_client()
    for _ in range(50):
        assert client.get("/readyz").status_code == 200
    assert len(calls) <= 2
    assert 1 <= app_module.READY_CACHE_SECONDS <= 2
