"""/admin against an attacker: sessions that logout ends, throttled logins, and hostile input of every kind.

Each finding of the security review (issue 14) has its reproduction here; the corpus at the end sends
oversized ids, control characters in every parameter, wrong or missing CSRF tokens and replayed cookies,
and asserts a 4xx (or a redirect to the login form), never a 5xx.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
from itsdangerous import BadSignature, URLSafeTimedSerializer

import config
import services
from ops.admin import login_throttle, sessions
from store import db, migrate
from store import sessions as session_store
from support.admin import post_login, session_cookies
from support import base_env

TOKEN = "admin-token-for-security-tests-0123456789"
TOO_BIG = str(2**63)  # one more than the largest BIGINT


@pytest.fixture
def admin_app(make_app, db_url):
    return make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url)


@pytest.fixture
def proxied_app(make_app, db_url):
    """/admin behind one trusted reverse proxy: X-Forwarded-For names the client."""
    return make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url, TRUSTED_PROXIES="1")


def log_in(client, **kwargs) -> str:
    """Log in with the right token; return the CSRF token of the new session."""
    response = post_login(client, TOKEN, **kwargs)
    assert response.status_code == 302, response.get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/admin/").get_data(as_text=True))
    assert match, "page has no CSRF token"
    return match.group(1)


def cookie_of(client) -> str:
    return client.get_cookie(sessions.cookie_name(secure=True), path="/").value


def wrong_logins(client, n: int, **kwargs) -> list[int]:
    return [post_login(client, f"guess-{i}", **kwargs).status_code for i in range(n)]


def from_address(address: str) -> dict:
    return {"headers": {"X-Forwarded-For": address}}


# --- finding 1: the cookie is not signed with ADMIN_TOKEN ------------------------------------------------

def test_the_admin_token_cannot_be_guessed_from_a_cookie(admin_app):
    """Before: URLSafeTimedSerializer(ADMIN_TOKEN, salt=…) verified the cookie, so a guess could be checked offline."""
    client = admin_app.test_client()
    log_in(client)
    cookie = cookie_of(client)
    for salt in ("wecom-mailer-admin-session", "itsdangerous", "cookie-session"):
        with pytest.raises(BadSignature):
            URLSafeTimedSerializer(TOKEN, salt=salt).loads(cookie)
    assert TOKEN not in cookie


@pytest.mark.parametrize("length", [1, 10, 31])
def test_a_short_admin_token_stops_start_up_with_how_to_make_one(length):
    token = "Qz8vR2xK9mW4tZ7bN3cF6hJ1sL5dG0aEyU"
    with pytest.raises(config.ConfigError) as info:
        config.from_env(base_env(ADMIN_TOKEN=token[:length]))
    message = str(info.value)
    assert message.startswith(f"ADMIN_TOKEN must be at least 32 characters (got {length})")
    assert "python -c 'import secrets; print(secrets.token_urlsafe(32))'" in message and token[:length] not in message
    assert config.from_env(base_env(ADMIN_TOKEN=token[:32])).admin_token == token[:32]


def test_secret_key_signs_the_sessions_and_a_new_key_ends_them(make_app, tmp_path):
    url = f"sqlite:///{tmp_path / 'keyed.db'}"
    first = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=url, SECRET_KEY="Kq7Wm2Rx9Vb4Tz8Ln3Pc6Hs1Jd5Gf0Ae").test_client()
    log_in(first)
    (tmp_path / "key").write_text("Kq7Wm2Rx9Vb4Tz8Ln3Pc6Hs1Jd5Gf0Ae\n")
    same_key = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=url, SECRET_KEY_FILE=str(tmp_path / "key")).test_client()
    same_key.set_cookie(sessions.cookie_name(secure=True), cookie_of(first), path="/")
    assert same_key.get("/admin/").status_code == 200  # SECRET_KEY_FILE: the same key, the same sessions
    other_key = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=url, SECRET_KEY="Ox3Yp8Sd1Fg6Hj2Kl9Zc4Vb7Nm5Qw0Er").test_client()
    other_key.set_cookie(sessions.cookie_name(secure=True), cookie_of(first), path="/")
    assert other_key.get("/admin/").status_code == 302


def test_a_new_admin_token_ends_every_session(make_app, tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    client = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=url).test_client()
    log_in(client)
    rotated = make_app(ADMIN_TOKEN=TOKEN[::-1], DATABASE_URL=url).test_client()
    rotated.set_cookie(sessions.cookie_name(secure=True), cookie_of(client), path="/")
    assert rotated.get("/admin/").status_code == 302


def test_without_secret_key_every_process_shares_one_generated_key(make_app, db_url):
    """Two apps on one state database (two gunicorn workers, or two machines) accept each other's sessions."""
    one = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url).test_client()
    two = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url).test_client()
    log_in(one)
    two.set_cookie(sessions.cookie_name(secure=True), cookie_of(one), path="/")
    assert two.get("/admin/").status_code == 200


def test_the_generated_key_is_created_once_when_processes_race(db_url):
    engines = [db.make_engine(db_url) for _ in range(4)]
    migrate.upgrade(engines[0])
    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(session_store.shared_secret, engines))
    assert len(set(keys)) == 1 and len(keys[0]) >= 43
    assert session_store.shared_secret(engines[0]) == keys[0]
    for engine in engines:
        engine.dispose()


# --- finding 3: logout ends the session ---------------------------------------------------------------

def test_a_logged_out_cookie_replayed_is_sent_to_the_login_form(admin_app):
    client = admin_app.test_client()
    csrf = log_in(client)
    kept = cookie_of(client)
    assert client.post("/admin/logout", data={"csrf_token": csrf}).status_code == 302
    thief = admin_app.test_client()
    thief.set_cookie(sessions.cookie_name(secure=True), kept, path="/")
    response = thief.get("/admin/")
    assert response.status_code == 302 and response.headers["Location"].startswith("/admin/login")
    assert thief.post("/admin/retry-failed", data={"csrf_token": csrf}).status_code == 302  # no action
    assert thief.get("/admin/login").status_code == 200  # the form, not a session


def test_log_out_everywhere_ends_the_sessions_of_every_browser(admin_app, monkeypatch):
    # Several sessions at once (as WeCom sign-in gives each admin their own): a token login would end the other.
    monkeypatch.setattr(session_store, "end_sessions_of", lambda engine, actor: 0)
    laptop, phone = admin_app.test_client(), admin_app.test_client()
    csrf = log_in(laptop)
    log_in(phone)
    assert phone.get("/admin/").status_code == 200
    assert laptop.post("/admin/logout-everywhere").status_code == 400  # CSRF first
    assert laptop.post("/admin/logout-everywhere", data={"csrf_token": csrf}).status_code == 302
    assert phone.get("/admin/").status_code == 302 and laptop.get("/admin/").status_code == 302
    log_in(phone)  # and a new login works again
    assert phone.get("/admin/").status_code == 200


def test_every_page_offers_log_out_everywhere(admin_app):
    client = admin_app.test_client()
    log_in(client)
    page = client.get("/admin/").get_data(as_text=True)
    assert 'action="/admin/logout-everywhere"' in page and "全部退出 Log out everywhere" in page


# --- finding 2: login throttling --------------------------------------------------------------------------

def test_ten_wrong_logins_then_429_with_retry_after_even_for_the_right_token(admin_app, caplog):
    client = admin_app.test_client()
    assert wrong_logins(client, login_throttle.PER_CLIENT) == [403] * login_throttle.PER_CLIENT
    refused = post_login(client, "guess-again")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= login_throttle.WINDOW_SECONDS
    assert "Too many failed logins" in refused.get_data(as_text=True)
    right = post_login(client, TOKEN)
    assert right.status_code == 429 and not session_cookies(right)
    assert "admin login refused from 127.0.0.1: wrong token" in caplog.text
    assert "admin login refused from 127.0.0.1: too many failed logins" in caplog.text


def test_x_forwarded_for_is_ignored_without_trusted_proxies(admin_app):
    client = admin_app.test_client()
    codes = [post_login(client, "x", **from_address(f"198.51.100.{i}")).status_code
             for i in range(login_throttle.PER_CLIENT + 1)]
    assert codes[-1] == 429  # a fresh X-Forwarded-For per try does not make a fresh client


def test_behind_a_trusted_proxy_each_client_address_is_throttled_on_its_own(proxied_app, caplog):
    client = proxied_app.test_client()
    attacker, admin = from_address("203.0.113.7"), from_address("198.51.100.20")
    assert wrong_logins(client, login_throttle.PER_CLIENT + 1, **attacker)[-1] == 429
    assert "admin login refused from 203.0.113.7: wrong token" in caplog.text
    log_in(client, **admin)  # the administrator at another address is not locked out
    # ProxyFix takes the address the (one) trusted proxy appended, not what the client put before it.
    spoofed = from_address("198.51.100.20, 203.0.113.7")
    assert post_login(proxied_app.test_client(), TOKEN, **spoofed).status_code == 429


def test_ipv6_clients_are_counted_by_their_64(proxied_app):
    client = proxied_app.test_client()
    for i in range(login_throttle.PER_CLIENT):
        post_login(client, "x", **from_address(f"2001:db8:1:2::{i + 1:x}"))
    assert post_login(client, TOKEN, **from_address("2001:db8:1:2:ffff::1")).status_code == 429
    log_in(client, **from_address("2001:db8:1:3::1"))


def test_failures_from_many_addresses_no_longer_lock_out_a_fresh_address(proxied_app):
    """Issue 24: the overall lock let anyone lock the administrator out; now it is a warning, not a lock."""
    client = proxied_app.test_client()
    for i in range(login_throttle.OVERALL_ALERT):
        assert post_login(client, "x", **from_address(f"10.{i // 250}.{i % 250}.1")).status_code == 403
    assert post_login(client, TOKEN, **from_address("192.0.2.1")).status_code == 302


def test_the_count_is_shared_by_every_process_on_the_database(make_app, db_url):
    one = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url).test_client()
    two = make_app(ADMIN_TOKEN=TOKEN, DATABASE_URL=db_url).test_client()
    wrong_logins(one, login_throttle.PER_CLIENT // 2)
    wrong_logins(two, login_throttle.PER_CLIENT - login_throttle.PER_CLIENT // 2)
    assert post_login(one, TOKEN).status_code == 429
    assert post_login(two, TOKEN).status_code == 429


def test_a_right_token_clears_the_address_and_failures_expire(admin_app, monkeypatch):
    client = admin_app.test_client()
    wrong_logins(client, login_throttle.PER_CLIENT - 1)
    log_in(client)
    assert wrong_logins(admin_app.test_client(), login_throttle.PER_CLIENT) == [403] * login_throttle.PER_CLIENT
    monkeypatch.setattr(login_throttle, "WINDOW_SECONDS", 0.000001)  # every failure is now old
    log_in(admin_app.test_client())


def test_failed_logins_are_counted_in_metrics(admin_app):
    client = admin_app.test_client()

    def counted(reason: str) -> float:
        text = client.get("/metrics").get_data(as_text=True)
        match = re.search(rf'wecom_mailer_admin_login_failures_total{{reason="{reason}"}} (\S+)', text)
        return float(match.group(1)) if match else 0.0
    before = counted("wrong_token"), counted("throttled")
    wrong_logins(client, login_throttle.PER_CLIENT + 2)
    assert (counted("wrong_token"), counted("throttled")) == (before[0] + login_throttle.PER_CLIENT, before[1] + 2)


# --- finding 4: `next` with CR/LF -----------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/admin/\r\nX-Injected: 1", "/admin/\nX: 1", "/admin/\r", "/admin/\x00",
                                    "/admin/\t", "/admin/\x7f", "/admin/\u2028x", "/admin/é", "/admin/" + "a" * 5000])
def test_a_next_with_control_characters_is_dropped_not_a_500(make_app, target):
    client = make_app(ADMIN_TOKEN=TOKEN).test_client()
    response = post_login(client, TOKEN, data={"next": target})
    assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    signed_in = client.get("/admin/login", query_string={"next": target})
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == "/admin/"
    assert "X-Injected" not in response.headers


# --- finding 5: event ids beyond BIGINT --------------------------------------------------------------------

@pytest.mark.parametrize("event_id", [TOO_BIG, "99999999999999999999999999", str(2**63 - 1), "0"])
def test_an_event_id_out_of_range_is_404(admin_app, event_id):
    client = admin_app.test_client()
    csrf = log_in(client)
    assert client.get(f"/admin/events/{event_id}").status_code == 404
    assert client.post(f"/admin/events/{event_id}/retry", data={"csrf_token": csrf}).status_code in (302, 404)
    assert client.post(f"/admin/events/{TOO_BIG}/retry", data={"csrf_token": csrf}).status_code == 404


# --- finding 8 (admin side): an uploaded file name cannot forge a log line ----------------------------------

@pytest.fixture
def service_log(capfd):
    """What the service's own log handler writes (it writes to the stream capfd installs)."""
    yield capfd
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_wecom_mailer", False)]:
        root.removeHandler(handler)


def test_an_uploaded_file_name_cannot_forge_a_log_line(make_app, service_log):
    client = make_app(ADMIN_TOKEN=TOKEN).test_client()
    csrf = log_in(client)
    # The reviewer's request: an RFC 5987 file name whose %0A decodes to a line break.
    forged = "2026-01-01 00:00:00,000 INFO wecom_mailer.admin: admin login from 10.0.0.1"
    body = ("--b\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n" + csrf + "\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''book.csv%0A"
            + quote(forged) + "\r\nContent-Type: text/csv\r\n\r\nuserid,email\na,a@corp.example\n\r\n--b--\r\n")
    response = client.post("/admin/addresses/import", data=body.encode(),
                           content_type="multipart/form-data; boundary=b")
    assert response.status_code == 200, response.get_data(as_text=True)
    lines = service_log.readouterr().err.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    (imported,) = [line for line in lines if "admin imported" in line]
    assert "book.csv\\n2026-01-01" in imported


# --- the hostile corpus ----------------------------------------------------------------------------------

HOSTILE_VALUES = ["\r\nX-Injected: 1", "\x00", "\x1b[31m", "\u2028", "%0d%0a", "-1", TOO_BIG, "9" * 400, "a" * 5000,
                  "<script>alert(1)</script>", "' OR 1=1 --", "../../etc/passwd", "🙂"]
PAGES = {  # GET page → its query parameters
    "/admin/": ["status", "delivery", "limit", "requeued", "requeued_events"],
    "/admin/events/1": ["status", "requeued", "requeued_events"],
    "/admin/templates": ["x"],
    "/admin/addresses": ["q"],
    "/admin/login": ["next"],
}
POSTS = ["/admin/retry-failed", "/admin/events/1/retry", "/admin/addresses/import", "/admin/logout",
         "/admin/logout-everywhere"]
PATHS = [f"/admin/events/{TOO_BIG}", "/admin/events/-1", "/admin/events/1.5", "/admin/events/%00",
         "/admin/events/1%0d%0a", "/admin/%2e%2e/healthz", "/admin/" + "x" * 3000, "/admin/events/١"]


def _corpus():
    for page, params in PAGES.items():
        for param in params:
            for value in HOSTILE_VALUES:
                yield "GET", page, {"query_string": {param: value}}
            yield "GET", page, {"query_string": f"{param}=%ff%c0%80&{param}=2"}  # not UTF-8, and twice
    for path in PATHS:
        yield "GET", path, {}
    for path in POSTS:
        for csrf in (None, "", "forged", "\r\n", "a" * 5000):
            yield "POST", path, {"data": {} if csrf is None else {"csrf_token": csrf}}
    for value in HOSTILE_VALUES:
        yield "POST", "/admin/login", {"data": {"token": value, "next": value}}
        # Issue 24: the login CSRF field, the browser's origin headers and the body cap, hostile too.
        yield "POST", "/admin/login", {"data": {"token": TOKEN, "login_csrf": value}}
        for header in ("Origin", "Sec-Fetch-Site", "X-Forwarded-Proto", "Host"):
            sent = value.replace("\r", "").replace("\n", "")[:200]  # a header line cannot hold a line break
            yield "POST", "/admin/login", {"data": {"token": value}, "headers": {header: sent}}
    for size in (16 * 1024, 17 * 1024, 1024 * 1024):
        yield "POST", "/admin/login", {"data": {"token": "t" * size}}


CORPUS = list(_corpus())


def test_the_hostile_corpus_gets_4xx_or_the_login_form_and_never_a_5xx(make_app):
    app = make_app(ADMIN_TOKEN=TOKEN, TRUSTED_PROXIES="1")
    signed_in, stranger, replay, leaving = (app.test_client() for _ in range(4))
    leaving_csrf = log_in(leaving, **from_address("192.0.2.11"))
    replay.set_cookie(sessions.cookie_name(secure=True), cookie_of(leaving), path="/")
    assert leaving.post("/admin/logout", data={"csrf_token": leaving_csrf}).status_code == 302
    csrf = log_in(signed_in, **from_address("192.0.2.10"))  # after: a second login ends the first
    seen: dict[int, int] = {}
    for who, client in (("signed in", signed_in), ("stranger", stranger), ("replayed cookie", replay)):
        for n, (method, path, kwargs) in enumerate(CORPUS):
            # Not throttled: a fresh address (and whatever other headers the case sends).
            address = f"198.18.{n // 250}.{n % 250}"
            kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), "X-Forwarded-For": address}}
            response = client.open(path, method=method, **kwargs)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (who, method, path, kwargs, response.get_data(as_text=True)[:300])
            if who != "signed in" and path != "/admin/login":
                assert response.status_code in (302, 400, 404), (who, method, path, response.status_code)
                if response.status_code == 302:
                    assert response.headers["Location"].startswith("/admin/login")
            if method == "POST" and path != "/admin/login" and who == "signed in":
                assert response.status_code in (400, 404, 413), (method, path, kwargs)  # no right CSRF token here
            assert "X-Injected" not in response.headers
    assert signed_in.get("/admin/").status_code == 200  # the corpus logged nobody out
    assert signed_in.post("/admin/retry-failed", data={"csrf_token": csrf}).status_code == 302
    print(f"\n{len(CORPUS)} hostile requests × 3 clients: status codes {dict(sorted(seen.items()))}")


def test_two_hundred_wrong_logins_get_403_then_429_and_never_a_5xx(make_app):
    client = make_app(ADMIN_TOKEN=TOKEN).test_client()
    codes = [post_login(client, value).status_code
             for value in (HOSTILE_VALUES * 15)[:200]]
    assert codes[:login_throttle.PER_CLIENT] == [403] * login_throttle.PER_CLIENT
    assert set(codes[login_throttle.PER_CLIENT:]) == {429}
    assert post_login(client, TOKEN).status_code == 429


def test_the_state_database_keeps_the_failure_table_small_under_a_flood(make_app):
    app = make_app(ADMIN_TOKEN=TOKEN)
    client = app.test_client()
    wrong_logins(client, 200)
    count, _ = session_store.login_failures_since(services.of(app).engine, 0)
    assert count == login_throttle.PER_CLIENT  # throttled attempts are refused before they are written


def test_the_admin_migration_builds_the_tables_schema_py_declares(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from store.schema import metadata

    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    mine = {"wm_service_secrets", "wm_admin_sessions", "wm_login_failures"}
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    ours = [d for d in diffs if mine & {getattr(part, "name", None) for part in _parts(d)}
            or mine & {getattr(getattr(part, "table", None), "name", None) for part in _parts(d)}]
    assert ours == []
    engine.dispose()


def _parts(diff):
    return diff if isinstance(diff, (list, tuple)) else [diff]
