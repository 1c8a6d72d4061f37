"""The parts of a running service, built once by create_app() and kept on the app (app.extensions)."""
from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask
from sqlalchemy.engine import Engine

import wecom
import wecom_api
from config import Settings
from delivery.worker import Worker
from ops import metrics
from store.db import make_engine
from store.recording import GroupCommit
from store.tokens import TokenStore

EXTENSION = "wecom_mailer"


@dataclass
class Services:
    """Settings, engines, callback crypto, the callbacks' writer and the delivery worker of this process."""

    settings: Settings
    engine: Engine
    template_engine: Engine
    crypto: wecom.CallbackCrypto
    recorder: GroupCommit  # records callbacks: those that arrive together in one INSERT and one commit
    worker: Worker | None = field(default=None)

    def wecom_client(self) -> wecom_api.WeComClient:
        """A WeCom API client whose access token is shared with every process through the state database."""
        return wecom_api.WeComClient(self.settings, TokenStore(self.engine), observe=metrics.Recorder.wecom_call)

    def app_client(self) -> wecom_api.WeComClient | None:
        """A client holding the self-built app's token (message/send, sign-in); None without WECOM_APP_SECRET."""
        if not self.settings.app_secret:
            return None
        return wecom_api.WeComClient(self.settings, TokenStore(self.engine), observe=metrics.Recorder.wecom_call,
                                     secret=self.settings.app_secret)

    def make_worker(self, settings: Settings | None = None) -> Worker:
        """A delivery worker on these engines (not started)."""
        return Worker(settings or self.settings, self.engine, self.template_engine, self.wecom_client(),
                      metrics.Recorder(), reconcile_client=self.wecom_client(), app_client=self.app_client())

    def start_worker(self) -> Worker:
        """Start this process's delivery thread (gunicorn's post_worker_init, `flask worker`); once."""
        if self.worker is None:
            self.worker = self.make_worker()
            self.worker.start()
        return self.worker

    def stop_worker(self) -> None:
        """Let the message in flight finish and release the lease (gunicorn's worker_exit, SIGTERM)."""
        if self.worker is not None:
            self.worker.shutdown()

    def wake_worker(self) -> None:
        """Tell this process's delivery thread that work is due (after a callback or a retry)."""
        if self.worker is not None:
            self.worker.wakeup.set()


def build(settings: Settings) -> Services:
    """Engines and crypto for `settings`; connects to nothing yet."""
    engine = make_engine(settings.database_url)
    template_engine = (engine if settings.template_database_url == settings.database_url
                       else make_engine(settings.template_database_url))
    crypto = wecom.CallbackCrypto(settings.callback_token, settings.callback_aes_key, settings.corp_id,
                                  settings.callback_max_skew)
    return Services(settings, engine, template_engine, crypto, GroupCommit(engine, observe=metrics.callback_batch))


def of(app: Flask) -> Services:
    """The services of `app` (flask.current_app in a request or command)."""
    return app.extensions[EXTENSION]
