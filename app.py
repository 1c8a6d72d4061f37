"""The Flask app: create_app() builds the parts once; routes for the WeCom callback, health, readiness, metrics."""
from __future__ import annotations

import hmac
import logging
import sys
import time
from http import HTTPStatus
from typing import Mapping

from flask import Flask, Response, current_app, request
from sqlalchemy.exc import DBAPIError
from werkzeug.wrappers import Request

import config
import logs
from ops.forwarded import TrustedProxies
import services
import wecom
from ops import admin, cli, metrics, refusals
from store import recording, server
from store.db import StateUnavailable, with_retries
from store.migrate import SchemaTooNew, ensure_schema, ready

log = logging.getLogger("wecom_mailer.callback")
REFUSALS = "wecom_mailer.refusals"  # app.extensions key: the refused callbacks' log (ops/refusals.py)


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the app from the environment (or from `env`, for tests); starts no thread.

    The delivery thread of a web process is started by gunicorn's post_worker_init hook
    (gunicorn.conf.py), and by `flask --app app worker`.
    """
    if env is None:
        config.load_dotenv_file()
    try:
        settings = config.from_env(env)
    except config.ConfigError as exc:
        print(f"wecom-mailer: configuration error: {exc}", file=sys.stderr)
        # Exit code 4 is gunicorn's "app failed to load": the arbiter stops instead of respawning.
        raise SystemExit(4) from None
    logs.setup(settings)
    app = Flask(__name__)
    parts = services.build(settings)
    app.extensions[services.EXTENSION] = parts
    app.extensions[REFUSALS] = refused = refusals.RefusalLog(log.warning)
    # The client address and scheme as the last TRUSTED_PROXIES proxies report them, and only when the
    # connection comes from TRUSTED_PROXY_NETWORKS; from anyone else X-Forwarded-* are dropped (ops/forwarded.py).
    # Inside that, WeCom's POSTed events are answered before Flask (EventEndpoint); the rest goes on to Flask.
    app.wsgi_app = TrustedProxies(EventEndpoint(app.wsgi_app, parts, refused),
                                  settings.trusted_proxies, settings.trusted_proxy_networks)
    try:
        with_retries(lambda: ensure_schema(parts.engine))
        server.verify(parts.engine)
    except (SchemaTooNew, server.ServerSettingBroken) as exc:
        # A newer release migrated past us (rolling update), or the server breaks a promise: refuse to start.
        print(f"wecom-mailer: {exc}", file=sys.stderr)
        raise SystemExit(4) from None
    except (DBAPIError, StateUnavailable) as exc:
        # Start anyway: /readyz says 503 and callbacks answer 503 until the database is back.
        reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
        log.error("state database unavailable at start-up (%s); tables not checked", reason)
    app.add_url_rule(settings.callback_path, "callback", callback, methods=["GET"])
    app.add_url_rule("/healthz", "healthz", lambda: _plain("ok\n"))
    app.add_url_rule("/readyz", "readyz", readyz)
    app.add_url_rule("/metrics", "metrics", metrics_view)
    cli.init_app(app)
    admin.init_app(app)
    return app


def _plain(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/plain")


def callback():
    """WeCom's URL check (GET): verify and decrypt `echostr`. The POSTed events never reach Flask (EventEndpoint)."""
    started = time.perf_counter()
    parts = services.of(current_app)
    try:
        params = _require(request.args, "msg_signature", "timestamp", "nonce", "echostr")
        parts.crypto.precheck(params[0], params[1])
        response, outcome, reason = _plain(parts.crypto.verify_url(*params)), "verified", ""
    except wecom.CallbackRejected as exc:
        current_app.extensions[REFUSALS].refused(exc.status, exc.reason, request.remote_addr)
        response, outcome, reason = _plain(exc.public + "\n", exc.status), "rejected", exc.public
    metrics.callback(outcome, reason, time.perf_counter() - started)
    return response


def _require(args, *names: str) -> list[str]:
    missing = [n for n in names if not args.get(n)]
    if missing:
        raise wecom.CallbackRejected("missing query parameter(s): " + ", ".join(missing))
    return [args[n] for n in names]


# Set in a callback's WSGI environ once its event line is written: gunicorn's access line for it is left
# out (gunicorn.conf.py), so that an event answered costs one line, not two.
EVENT_LOGGED = "wecom_mailer.event_logged"


class EventEndpoint:
    """WSGI, in front of Flask: a POST to CALLBACK_PATH (a WeCom event) is verified, decrypted, recorded and
    answered here, with werkzeug's Request and a plain WSGI answer; every other request goes on to Flask.

    Why: Flask's request context, routing and Response cost more CPU per callback than the werkzeug Request
    the route needs (~60 against ~24 µs, measured; BENCHMARKS.md, issue 25), and the route uses nothing else
    of Flask's: no hook, session, template or error page."""

    def __init__(self, flask_wsgi, parts: services.Services, refused: refusals.RefusalLog):
        self.flask_wsgi, self.parts, self.refused = flask_wsgi, parts, refused
        self.path = parts.settings.callback_path

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != self.path:
            return self.flask_wsgi(environ, start_response)
        started = time.perf_counter()
        try:
            status, text, outcome, reason, wake = self.receive(Request(environ))
        except Exception:  # noqa: BLE001 - a bug: logged (masked) and answered 500, so WeCom retries
            log.exception("callback failed; answered 500 so WeCom retries")
            return _answer(start_response, 500, b"internal error\n")
        metrics.callback(outcome, reason, time.perf_counter() - started)
        return _answer(start_response, status, text, self.parts.wake_worker if wake else None)

    def receive(self, request: Request) -> tuple[int, bytes, str, str, bool]:
        """(status, body, outcome, reason, whether to wake the delivery thread once answered)."""
        parts = self.parts
        try:
            msg_signature, timestamp, nonce = _require(request.args, "msg_signature", "timestamp", "nonce")
            parts.crypto.precheck(msg_signature, timestamp)  # a stale or misshapen query: the body stays unread
            body = _read_body(request, parts.settings.callback_max_body)
            xml, change = parts.crypto.open_event(body, msg_signature, timestamp, nonce)
        except wecom.CallbackRejected as exc:
            self.refused.refused(exc.status, exc.reason, request.remote_addr)
            return exc.status, (exc.public + "\n").encode(), "rejected", exc.public, False
        status, reason = ("pending", None) if change.is_member_change else (
            "ignored", f"not a member change ({change.msg_type}/{change.event}/{change.change_type})")
        try:
            event_id, created = parts.recorder.record(recording.event_row(xml, change, status, reason, time.time()))
        except StateUnavailable as exc:
            log.error("state database unavailable, answered 503 so WeCom retries: %s", exc)
            return 503, b"state database unavailable\n", "unavailable", "state database", False
        outcome = ("recorded" if status == "pending" else "ignored") if created else "duplicate"
        if logs.event_line(log, event_id, change.change_type or change.event, change.user_id, outcome):
            request.environ[EVENT_LOGGED] = True  # its access line is left out; below INFO it is kept
        # Woken once the answer is out (_answer): woken earlier, the delivery thread's first burst holds the
        # GIL while this thread still has the answer to write (measured: +25-40 ms for 100+ members).
        return 200, b"success", outcome, "", created and status == "pending"


def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes whether or not Content-Length says so."""
    if request.content_length is not None and request.content_length > limit:
        raise wecom.CallbackRejected("body too large", 413)
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise wecom.CallbackRejected("body too large", 413)
    return data


def _answer(start_response, status: int, body: bytes, then=None):
    """A plain-text WSGI answer; `then()` runs once the server has sent it (and closes the body)."""
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body] if then is None else _ThenClose(body, then)


class _ThenClose:
    """A WSGI body of one chunk whose close(), which the server calls after sending it, runs `then`."""

    def __init__(self, body: bytes, then):
        self.body, self.then = body, then

    def __iter__(self):
        yield self.body

    def close(self) -> None:
        self.then()


def metrics_view():
    parts = services.of(current_app)
    token = parts.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 token.encode("utf-8")):
            response = _plain("metrics need Authorization: Bearer <METRICS_TOKEN>\n", 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    body, content_type = metrics.exposition(parts.engine)
    return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)


READY_CACHE_SECONDS = 1.5  # a flood of probes costs one database round trip per 1.5 s per process
_READY_KEY = "wecom_mailer_ready"  # app.extensions: (monotonic time of the check, its answer)


def readyz():
    checked = current_app.extensions.get(_READY_KEY)
    now = time.monotonic()
    if checked is None or now - checked[0] >= READY_CACHE_SECONDS:
        checked = (now, ready(services.of(current_app).engine))
        current_app.extensions[_READY_KEY] = checked
    if checked[1]:
        return _plain("ready\n")
    return _plain("state database unavailable\n", 503)
