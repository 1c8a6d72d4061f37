"""Logging: one line per record, text or JSON, with every configured secret masked and no line forged.

Values in a record come from outside (a WeCom UserID, an uploaded file name, an SMTP server's reply):
control characters in the message are escaped (a line break becomes the two characters \\n), so that a
record is one line and never starts another. In text format the traceback of a record follows it on
lines that begin with four spaces; with LOG_FORMAT=json each record, traceback included, is one line.
Secrets are masked in the whole output, tracebacks included.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

import config

# C0 and C1 controls and the Unicode line and paragraph separators: what a reader may take for a new line.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_JSON_UNESCAPED = re.compile(r"[\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UNSET = object()  # a record MaskSecrets has not seen (gunicorn's own, say): its message is still to render


def escape_controls(text: str) -> str:
    """`text` with every control character written out (\\n, \\r, \\t, \\x1b, \\u2028, …)."""
    def written(match: re.Match) -> str:
        char = match.group(0)
        return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
    return _CONTROLS.sub(written, text)


class MaskSecrets(logging.Filter):
    """Replace secret values in the rendered message, for every handler that sees the record after ours."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = config.mask(message, self.settings)
        # Rendered and masked once: our formatter then uses it as it is (the message was formatted and
        # masked twice per record before; the per-callback line is one record per request).
        record.msg, record.args, record._wm_masked = masked, None, self.settings
        return True


class _Rendering(logging.Formatter):
    """What both formats share: the message and the traceback, each masked."""

    def __init__(self, settings=None, fmt: str | None = None):
        super().__init__(fmt)
        self.settings = settings

    def message(self, record: logging.LogRecord) -> str:
        if getattr(record, "_wm_masked", _UNSET) is self.settings:  # MaskSecrets did it with the same secrets
            return record.msg
        return config.mask(record.getMessage(), self.settings)

    def details(self, record: logging.LogRecord) -> str:
        """The traceback and stack of the record, masked ('' when it has none)."""
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return config.mask("\n".join(parts), self.settings)


class TextFormatter(_Rendering):
    """`time LEVEL logger: message`, then the traceback indented by four spaces."""

    def __init__(self, settings=None):
        super().__init__(settings, TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:  # noqa: N802 - logging's name
        """logging's default `YYYY-MM-DD HH:MM:SS,mmm`, the seconds rendered once per second, not per line."""
        if datefmt:
            return super().formatTime(record, datefmt)
        whole = int(record.created)
        second, text = self._second
        if second != whole:
            text = time.strftime(self.default_time_format, self.converter(whole))
            self._second = (whole, text)
        return self.default_msec_format % (text, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(self.message(record))
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        details = self.details(record)
        if details:
            line += "".join("\n    " + escape_controls(part) for part in details.split("\n"))
        return line


class JsonFormatter(_Rendering):
    """One JSON object per line: time, level, logger, message, and `exc` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname, "logger": record.name, "message": self.message(record)}
        details = self.details(record)
        if details:
            entry["exc"] = details
        # json escapes C0 controls but leaves DEL, C1 and U+2028/2029, at which str.splitlines() breaks a line
        # (and a terminal may act on C1): they can only stand inside a string here, so \uXXXX is valid JSON.
        return _JSON_UNESCAPED.sub(lambda m: f"\\u{ord(m.group(0)):04x}", json.dumps(entry, ensure_ascii=False))


_OUTCOMES = {"recorded": "recorded", "ignored": "ignored", "duplicate": "duplicate, already recorded"}


def event_line(logger: logging.Logger, event_id: int, kind: str, user_id: str, outcome: str) -> bool:
    """The one line per callback (the promise: one line per event): `event N kind userid=U: outcome`.
    Whether it was written (not below LOG_LEVEL=INFO)."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    logger.info("event %s %s userid=%s: %s", event_id, kind, user_id, _OUTCOMES[outcome])
    return True


def setup(settings) -> None:
    """Configure the root logger once per process from LOG_LEVEL and LOG_FORMAT."""
    # No format of ours (nor gunicorn's) shows the caller's file and line, the thread or the multiprocessing
    # process name: not collecting them is what the Logging HOWTO's "Optimization" section suggests, and it
    # takes a third off each record (a callback writes one). gunicorn's lines show the pid: kept.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_wecom_mailer", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._wecom_mailer = True
    handler.addFilter(MaskSecrets(settings))
    handler.setFormatter(JsonFormatter(settings) if settings.log_format == "json" else TextFormatter(settings))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # urllib3 logs full request URLs at DEBUG, access tokens included.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
    # Alembic narrates each migration step; store/migrate.py logs one line per upgrade instead.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
