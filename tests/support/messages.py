"""WeCom application messages (issue 21): a service whose self-built app sends them through the stand-in."""
from __future__ import annotations

import collections
import dataclasses

from support.callbacks import CREATED_AT, change_xml, signed_post
from support.env import base_env

APP_AGENT_ID = 1000002
APP_SECRET = "test-app-secret-0123456789abcdef"


def message_env(standin, smtp_sink, db_url, tmp_path, mode: str, **env) -> dict:
    """The environment of a complete service with WECOM_MESSAGE=`mode` (stand-in app, real SMTP)."""
    values = dict(WECOM_API_BASE=standin.api_base, DATABASE_URL=db_url, MAIL_BACKEND="smtp",
                  SMTP_HOST="127.0.0.1", SMTP_PORT=smtp_sink.port, SMTP_SECURITY="none",
                  MAIL_FILE_DIR=str(tmp_path / "outbox"), RETRY_BACKOFF_SECONDS="0.05",
                  WECOM_MESSAGE=mode, WECOM_AGENT_ID=APP_AGENT_ID, WECOM_APP_SECRET=APP_SECRET)
    return base_env(**{**values, **env})


def build_service(env: dict):
    """An app on `env` with the templates seeded; .drain(worker) runs a worker until idle (bounded)."""
    import app as app_module
    import services
    import templates_repo

    flask_app = app_module.create_app(env)
    parts = services.of(flask_app)
    templates_repo.seed_templates(parts.template_engine, parts.settings.template_table, parts.settings.template_app)

    def make_worker(**overrides):
        return parts.make_worker(dataclasses.replace(parts.settings, **overrides))

    def drain(worker=None, rounds: int = 300):
        worker = worker or make_worker()
        worker.ensure_snapshots()
        for _ in range(rounds):
            if not worker.run_once():
                return worker
        raise AssertionError("worker still busy after %d rounds" % rounds)

    flask_app.make_worker, flask_app.drain, flask_app.engine, flask_app.parts = make_worker, drain, parts.engine, parts
    return flask_app


def received(standin) -> collections.Counter:
    """userid → how many WeCom messages that member got (duplicates WeCom dropped are not counted)."""
    return collections.Counter(userid for userid, _ in standin.delivered)


def post(service, crypto, userid: str, change_type: str = "create_user", n: int = 0) -> None:
    """One signed callback to `service` about `userid`, its CreateTime n seconds after CREATED_AT."""
    xml = change_xml(change_type, userid, create_time=CREATED_AT + n)
    assert signed_post(service.test_client(), crypto, xml).data == b"success"
