"""Logging: one line per record, text or JSON, with every configured secret masked."""
from __future__ import annotations

import json
import logging
import sys
import time

import config


class MaskSecrets(logging.Filter):
    """Replace secret values in the rendered message: a last line of defence, not the first."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = config.mask(message, self.settings)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(settings) -> None:
    """Configure the root logger once per process from LOG_LEVEL and LOG_FORMAT."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_wecom_mailer", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._wecom_mailer = True
    handler.addFilter(MaskSecrets(settings))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # urllib3 logs full request URLs at DEBUG, access tokens included.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
    # Alembic narrates each migration step; store/migrate.py logs one line per upgrade instead.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
