"""Before a WeCom message goes: the limits every process shares (WeCom's per member, WECOM_MESSAGE_MAX_PER_DAY)."""
from __future__ import annotations

from datetime import datetime

from delivery.limits import day_of, next_day_start
from store import message_limits


def admit(worker, items: list, address_of) -> tuple[list, list]:
    """Split `items` into those that may go now and (item, until, reason) for those that wait: over a
    person's limit (30 a minute, 1,000 an hour), or over WECOM_MESSAGE_MAX_PER_DAY. Waiting is no attempt."""
    settings, now = worker.settings, worker.clock()
    refused = message_limits.take_people(worker.engine, [address_of(i) for i in items], now) if items else {}
    go, waits = [], []
    for item in items:
        until = refused.get(address_of(item))
        if until is None:
            go.append(item)
        else:
            at = datetime.fromtimestamp(until, settings.tz).strftime("%H:%M:%S")
            waits.append((item, until, f"WeCom's limit per member (30 a minute, 1,000 an hour) reached: "
                                       f"waits until {at}"))
    limit = settings.wecom_message_max_per_day
    if limit and go:
        granted = message_limits.take_day(worker.engine, limit, day_of(now, settings.tz), len(go))
        if granted < len(go):
            resume = next_day_start(now, settings.tz)
            at = datetime.fromtimestamp(resume, settings.tz).strftime("%Y-%m-%d %H:%M")
            reason = f"daily limit {limit} reached (WECOM_MESSAGE_MAX_PER_DAY), resumes at {at}"
            waits += [(item, resume, reason) for item in go[granted:]]
            go = go[:granted]
    return go, waits
