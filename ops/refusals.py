"""Refused callbacks in the log: the first of each reason at once, then one summary line per reason per minute.

A flood of forged or stale callbacks would otherwise write one line per request (issue 24): the log fills, the
lines that matter scroll away, and each line costs the sender nothing and us a formatted write. The counter
`wecom_mailer_callbacks_total{outcome="rejected"}` still counts every one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0
ADDRESSES_NAMED = 3  # a summary names this many of the sending addresses, and counts the rest
ADDRESSES_KEPT = 1000  # distinct addresses remembered per window: a flood from many cannot grow memory


@dataclass
class _Window:
    started: float
    status: int
    more: int = 0  # refusals since the line that opened this window, not logged yet
    addresses: dict = field(default_factory=dict)  # address → refusals, in order of arrival


class RefusalLog:
    """Give every refusal to refused(); `emit(line)` is called at most once per reason per window after the first.

    A window opens with a refusal that is logged at once. When it ends with refusals that were only counted,
    one summary line says how many and from where, and the next window opens silently; a window that ends
    quiet closes, so the next refusal of that reason is logged at once again. A daemon timer ends the windows
    (`timer=False` for tests, which call flush() with their own clock)."""

    def __init__(self, emit, window: float = WINDOW_SECONDS, clock=time.monotonic, timer: bool = True):
        self.emit, self.window, self.clock, self.timer = emit, window, clock, timer
        self._lock = threading.Lock()
        self._open: dict[str, _Window] = {}
        self._armed: threading.Timer | None = None

    def refused(self, status: int, reason: str, address: str | None) -> None:
        """Log this refusal now if it opens a window for its reason, else count it for the summary."""
        now = self.clock()
        address = address or "unknown"
        with self._lock:
            window = self._open.get(reason)
            if window is not None and now - window.started < self.window:
                window.more += 1
                if address in window.addresses or len(window.addresses) < ADDRESSES_KEPT:
                    window.addresses[address] = window.addresses.get(address, 0) + 1
                return
            lines = self._close(reason, window, now) if window is not None else []
            if not lines:
                self._open[reason] = _Window(now, status)
                lines = [f"callback refused ({status}) from {address}: {reason} (more refusals for this reason "
                         f"are summed up once every {self.window:g} s)"]
            self._arm()
        for line in lines:
            self.emit(line)

    def flush(self) -> None:
        """Write the summary of every window that has ended, and close the quiet ones."""
        now = self.clock()
        lines = []
        with self._lock:
            for reason, window in list(self._open.items()):
                if now - window.started >= self.window:
                    lines += self._close(reason, window, now)
            self._armed = None
            self._arm()
        for line in lines:
            self.emit(line)

    def _close(self, reason: str, window: _Window, now: float) -> list[str]:
        """The ended window's summary (and a new, silent window), or nothing and the reason forgotten."""
        if not window.more:
            del self._open[reason]
            return []
        named = ", ".join(list(window.addresses)[:ADDRESSES_NAMED])
        others = len(window.addresses) - ADDRESSES_NAMED
        counted = len(window.addresses)
        line = (f"callback refused {window.more} more time(s) in the last {now - window.started:.0f} s "
                f"({window.status}): {reason}; from {counted}{'+' if counted >= ADDRESSES_KEPT else ''} "
                f"address(es): {named}"
                + (f" and {others} more" if others > 0 else ""))
        self._open[reason] = _Window(now, window.status)
        return [line]

    def _arm(self) -> None:
        """A timer for the end of the earliest open window (windows opened later end later)."""
        if self.timer and self._armed is None and self._open:
            ends = min(window.started for window in self._open.values()) + self.window
            self._armed = threading.Timer(max(ends - self.clock(), 0.05), self.flush)
            self._armed.daemon = True
            self._armed.start()
