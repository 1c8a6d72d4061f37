"""The Flask app: WeCom callback, health, readiness; starts the in-process delivery worker."""
from __future__ import annotations

import logging
import sys
import time
from typing import Mapping

from flask import Flask, Response, current_app, request

import config
import logs
import metrics
import outbox
import wecom

log = logging.getLogger("wecom_mailer.callback")


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the app from the environment (or from `env`, for tests)."""
    if env is None:
        config.load_dotenv_file()
    try:
        settings = config.from_env(env)
    except config.ConfigError as exc:
        if _running_cli_command() and sys.argv[-1:] == ["demo"]:
            return _demo_app()  # the demo brings its own embedded configuration
        print(f"wecom-mailer: configuration error: {exc}", file=sys.stderr)
        # Exit code 4 is gunicorn's "app failed to load": the arbiter stops instead of respawning.
        raise SystemExit(4) from None
    logs.setup(settings)
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["SECRET_KEY"] = settings.admin_token or None
    engine = outbox.make_engine(settings.database_url)
    app.extensions["engine"] = engine
    app.extensions["crypto"] = wecom.CallbackCrypto(settings.callback_token, settings.callback_aes_key,
                                                    settings.corp_id, settings.callback_max_skew)
    try:
        outbox.with_retries(lambda: outbox.ensure_schema(engine))
    except outbox.DBAPIError as exc:
        # Start anyway: /readyz says 503 and callbacks answer 503 until the database is back.
        log.error("state database unavailable at start-up (%s); tables not checked", exc.orig.__class__.__name__)
    app.add_url_rule(settings.callback_path, "callback", callback, methods=["GET", "POST"])
    app.add_url_rule("/healthz", "healthz", lambda: Response("ok\n", mimetype="text/plain"))
    app.add_url_rule("/readyz", "readyz", readyz)
    app.add_url_rule("/metrics", "metrics", metrics_view)

    import cli
    cli.init_app(app)
    import admin
    admin.init_app(app)
    app.extensions["worker"] = None
    if settings.worker_in_web and not _running_cli_command():
        start_worker(app)
    return app


def _demo_app() -> Flask:
    """An app that only knows `flask demo`, for a machine with no configuration yet."""
    import cli

    app = Flask(__name__)
    app.cli.add_command(cli.demo)
    return app


def _running_cli_command() -> bool:
    """Under `flask …` a click context is active: commands run their own worker (or none)."""
    import click
    return click.get_current_context(silent=True) is not None


def start_worker(app: Flask):
    """Start one delivery thread in this process."""
    import worker as delivery
    worker = delivery.Worker(app.config["SETTINGS"], app.extensions["engine"], template_engine(app),
                             wecom_client(app), metrics.Recorder())
    app.extensions["worker"] = worker
    delivery.start_in_background(worker)
    return worker


def template_engine(app: Flask):
    settings = app.config["SETTINGS"]
    if settings.template_database_url == settings.database_url:
        return app.extensions["engine"]
    return app.extensions.setdefault("template_engine", outbox.make_engine(settings.template_database_url))


def wecom_client(app: Flask):
    settings = app.config["SETTINGS"]
    return wecom.WeComClient(settings, outbox.TokenStore(app.extensions["engine"]),
                             observe=metrics.Recorder.wecom_call)


def _plain(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/plain")


def callback():
    """WeCom's URL check (GET) and contact events (POST): verify, decrypt, record, answer at once."""
    started = time.perf_counter()
    response, outcome, reason = _callback()
    metrics.callback(outcome, reason, time.perf_counter() - started)
    return response


def _callback() -> tuple[Response, str, str]:
    settings = current_app.config["SETTINGS"]
    crypto = current_app.extensions["crypto"]
    args = request.args
    try:
        if request.method == "GET":
            params = _require(args, "msg_signature", "timestamp", "nonce", "echostr")
            return _plain(crypto.verify_url(*params)), "verified", ""
        msg_signature, timestamp, nonce = _require(args, "msg_signature", "timestamp", "nonce")
        body = _read_body(settings.callback_max_body)
        xml = crypto.open_envelope(body, msg_signature, timestamp, nonce)
        change = wecom.parse_event(xml)
    except wecom.CallbackRejected as exc:
        log.warning("callback refused (%s) from %s: %s", exc.status, request.remote_addr, exc.reason)
        return _plain(exc.reason + "\n", exc.status), "rejected", exc.reason
    status, reason = ("pending", None) if change.is_member_change else (
        "ignored", f"not a member change ({change.msg_type}/{change.event}/{change.change_type})")
    try:
        event_id, created = outbox.record_event(current_app.extensions["engine"], xml, change, status, reason)
    except outbox.StateUnavailable as exc:
        log.error("state database unavailable, answered 503 so WeCom retries: %s", exc)
        return _plain("state database unavailable\n", 503), "unavailable", "state database"
    log.info("event %s %s userid=%s: %s", event_id, change.change_type or change.event, change.user_id,
             ("recorded" if status == "pending" else "ignored") if created else "duplicate, already recorded")
    worker = current_app.extensions.get("worker")
    response = _plain("success")
    if created and worker is not None and status == "pending":
        # Once the answer is out: woken earlier, the delivery thread's first burst holds the GIL
        # while this thread still has the answer to write (measured: +25-40 ms for 100+ members).
        response.call_on_close(worker.wakeup.set)
    outcome = ("recorded" if status == "pending" else "ignored") if created else "duplicate"
    return response, outcome, ""


def _require(args, *names: str) -> list[str]:
    missing = [n for n in names if not args.get(n)]
    if missing:
        raise wecom.CallbackRejected("missing query parameter(s): " + ", ".join(missing))
    return [args[n] for n in names]


def _read_body(limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes whether or not Content-Length says so."""
    if request.content_length is not None and request.content_length > limit:
        raise wecom.CallbackRejected("body too large", 413)
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise wecom.CallbackRejected("body too large", 413)
    return data


def metrics_view():
    body, content_type = metrics.exposition(current_app.extensions["engine"])
    return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)


def readyz():
    if outbox.ping(current_app.extensions["engine"]):
        return _plain("ready\n")
    return _plain("state database unavailable\n", 503)
