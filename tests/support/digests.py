"""Reading digests as a member does: the mails each address received, the changes each mail tells of;
and a clock a test moves by hand (the worker's `clock`)."""
from __future__ import annotations

import collections
import re
from datetime import datetime
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")
T0 = datetime(2024, 3, 5, 10, 0, tzinfo=SHANGHAI).timestamp()  # a Tuesday morning, outside quiet hours
MEMBERS = [f"user{i:04d}@corp.example" for i in range(1, 11)]  # the `department` fixture's
CHANGED = re.compile(r"(?:新增|更新|删除)成员 ID：(\S+)")  # the original templates' line naming the member


class Clock:
    """The worker's clock, moved by the test: windows and quiet hours pass without waiting."""

    def __init__(self, now: float):
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def digest_worker(service, clock: Clock, **settings):
    """A worker of `service` with settings overridden (digest_window=…, quiet_hours=…) on `clock`."""
    worker = service.make_worker(**settings)
    worker.clock = clock
    return worker


def text(message) -> str:
    """The body as the member reads it (SMTP carries CRLF line ends)."""
    return message.get_content().replace("\r\n", "\n").rstrip("\n")


def mails_by_recipient(messages) -> dict[str, list]:
    """Every message each address received, in arrival order."""
    mails = collections.defaultdict(list)
    for message in messages:
        mails[message["X-RcptTo"]].append(message)
    return dict(mails)


def changes_received(messages) -> collections.Counter:
    """(recipient, changed userid) → how often that member read about that change, over every mail."""
    seen = collections.Counter()
    for message in messages:
        for userid in CHANGED.findall(text(message)):
            seen[(message["X-RcptTo"], userid)] += 1
    return seen
