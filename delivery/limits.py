"""The provider's pace: SMTP_MAX_PER_MINUTE and SMTP_MAX_PER_DAY, counted in the state database for every
process, checked before each message is handed to the SMTP server."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

from smtp_session import Halt
from store import limits

MAX_WAIT_SECONDS = 1.0  # a blocked sender looks at `stop` at least this often


def day_of(epoch: float, tz) -> str:
    """The calendar day (YYYY-MM-DD) in TIMEZONE."""
    return datetime.fromtimestamp(epoch, tz).strftime("%Y-%m-%d")


def next_day_start(epoch: float, tz) -> float:
    """Midnight after `epoch` in TIMEZONE, as epoch seconds (a DST shift is absorbed by the zone)."""
    moment = datetime.fromtimestamp(epoch, tz)
    midnight = datetime(moment.year, moment.month, moment.day, tzinfo=tz) + timedelta(days=1)
    return midnight.timestamp()


def daily_limit_reason(settings, resume_at: float, provider_said: str | None = None) -> str:
    """Why deliveries wait for tomorrow: our SMTP_MAX_PER_DAY, or the provider's own quota."""
    at = datetime.fromtimestamp(resume_at, settings.tz).strftime("%Y-%m-%d %H:%M")
    if provider_said:
        return f"the provider's daily quota is used up ({provider_said}), resumes at {at}"
    return f"daily limit {settings.smtp_max_per_day} reached (SMTP_MAX_PER_DAY), resumes at {at}"


class Gate:
    """admit(block) before each message: True to send it now; False not now (only when not blocking, or when
    stopping); raises Halt(quota=True) when the day's limit is used up."""

    def __init__(self, engine, settings, clock, stop: threading.Event):
        self.engine, self.settings, self.clock, self.stop = engine, settings, clock, stop
        self.waited = 0.0  # seconds spent waiting for the per-minute limit, for the round's log line

    @property
    def active(self) -> bool:
        return bool(self.settings.smtp_max_per_minute or self.settings.smtp_max_per_day)

    def admit(self, block: bool) -> bool:
        settings = self.settings
        if settings.smtp_max_per_minute:
            free_at = limits.take_minute_slot(self.engine, settings.smtp_max_per_minute, self.clock())
            while free_at is not None:
                if not block or self.stop.is_set():
                    return False
                pause = min(max(free_at - self.clock(), 0.01), MAX_WAIT_SECONDS)
                self.stop.wait(pause)
                self.waited += pause
                free_at = limits.take_minute_slot(self.engine, settings.smtp_max_per_minute, self.clock())
        if settings.smtp_max_per_day:
            now = self.clock()
            if not limits.take_day_slot(self.engine, settings.smtp_max_per_day, day_of(now, settings.tz)):
                resume_at = next_day_start(now, settings.tz)
                raise Halt(daily_limit_reason(settings, resume_at), quota=True, resume_at=resume_at)
        return True

    def used_today(self) -> int:
        """Messages counted against SMTP_MAX_PER_DAY today (0 when no daily limit is set)."""
        if not self.settings.smtp_max_per_day:
            return 0
        return limits.sent_on(self.engine, day_of(self.clock(), self.settings.tz))
