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
    else holds it (then the sending round stops after the message in flight). `renew` renews another kind
    of lease the same way (store/digests.renew_leases: every digest this process is sending)."""

    def __init__(self, engine, event_id: int | None, owner: str, lease_seconds: float, clock=time.time,
                 renew=outbox.renew_lease, what: str | None = None):
        self.lost = threading.Event()
        self._done = threading.Event()
        self._clock = clock
        self._renew_one = renew
        self._what = what or f"event {event_id}"
        self._args = (engine, event_id, owner, lease_seconds)
        self._thread = threading.Thread(target=self._renew, name="wecom-mailer-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        engine, event_id, owner, lease_seconds = self._args
        while not self._done.wait(lease_seconds / 3):
            try:
                if not self._renew_one(engine, event_id, owner, lease_seconds, now=self._clock()):
                    self.lost.set()
                    return
            except DBAPIError as exc:  # try again at the next beat; the lease may run out meanwhile
                log.warning("%s: cannot renew the lease (%s)", self._what, exc.orig.__class__.__name__)

    def close(self) -> None:
        """Stop renewing (the caller has released the lease or is about to give it up)."""
        self._done.set()
        self._thread.join(timeout=self._args[3])
