"""The heartbeat on the event in hand: a slow WeCom call or SMTP reply never lets another process take over."""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import DBAPIError

from store import outbox

log = logging.getLogger("wecom_mailer.worker")


class LeaseKeeper:
    """Renews the lease on one event every LEASE_SECONDS/3 from its own thread; `lost` is set once someone
    else holds it (then the sending round stops after the message in flight)."""

    def __init__(self, engine, event_id: int, owner: str, lease_seconds: float, clock=time.time):
        self.lost = threading.Event()
        self._done = threading.Event()
        self._clock = clock
        self._args = (engine, event_id, owner, lease_seconds)
        self._thread = threading.Thread(target=self._renew, name="wecom-mailer-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        engine, event_id, owner, lease_seconds = self._args
        while not self._done.wait(lease_seconds / 3):
            try:
                if not outbox.renew_lease(engine, event_id, owner, lease_seconds, now=self._clock()):
                    self.lost.set()
                    return
            except DBAPIError as exc:  # try again at the next beat; the lease may run out meanwhile
                log.warning("event %s: cannot renew the lease (%s)", event_id, exc.orig.__class__.__name__)

    def close(self) -> None:
        """Stop renewing (the caller has released the lease or is about to give it up)."""
        self._done.set()
        self._thread.join(timeout=self._args[3])
