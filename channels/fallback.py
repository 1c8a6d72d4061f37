"""WECOM_MESSAGE=fallback after the round: an email that failed or bounced later (a digest that failed for
good, a bounce report hours after sending) still gets its member a WeCom message. A periodic look over the
events of the last two days; the rows it adds are sent by the event's next round like any other."""
from __future__ import annotations

import logging
import time

from channels import message_round
from store import channel_rows

log = logging.getLogger("wecom_mailer.worker")
SWEEP_SECONDS = 30.0
LOOK_BACK_SECONDS = 2 * 86400.0  # bounces come within hours, a day or two; older events are left as they are


def sweep(worker, force: bool = False) -> int:
    """Add the WeCom rows recent events lack for members email did not reach; how many. At most once per
    SWEEP_SECONDS per worker unless `force`."""
    if worker.settings.wecom_message != "fallback":
        return 0
    if not force and time.monotonic() < getattr(worker, "fallback_due", 0.0):
        return 0
    worker.fallback_due = time.monotonic() + SWEEP_SECONDS
    added = 0
    for event_id in channel_rows.events_with_unreached(worker.engine, worker.clock() - LOOK_BACK_SECONDS):
        n = message_round.add_fallbacks(worker, event_id)
        if n:
            log.info("event %s: %d WeCom message(s) added for members email did not reach", event_id, n)
        added += n
    if added:
        worker.wakeup.set()
    return added
