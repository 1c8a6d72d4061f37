"""Bounce intake: one process at a time (the lease "bounce-intake") polls the folder of BOUNCE_IMAP_URL every
BOUNCE_POLL_SECONDS, hands each new message to bounces/handle.py, and marks \\Seen (or moves to
BOUNCE_IMAP_DONE_FOLDER) only the messages that were delivery reports. Nothing else in the mailbox changes.

Each message is processed once across restarts: the folder's UIDVALIDITY and the UID up to which every
message was processed are kept in wm_bounce_mailbox, and the position advances only past a batch that was
processed and flagged. A poll that breaks (the server hangs up, a timeout) stops; the next one re-reads the
batch in hand, which is harmless because processing is idempotent (a report is stored once, by its own
Message-ID). Memory stays bounded: sizes are read first, bodies in batches of at most BATCH_BYTES, and a
message over MAX_MESSAGE_BYTES is read only as far as its first MAX_MESSAGE_BYTES (a DSN's report and the
returned headers come first), so a 25 MB message is neither loaded whole nor lost.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from bounces.imap import Mailbox, MailboxError
from store import leases, mailbox
from store.db import StateUnavailable

log = logging.getLogger("wecom_mailer.bounces")
LEASE = "bounce-intake"
SIZE_WINDOW = 500  # UIDs whose sizes one FETCH asks for
MAX_WINDOW = 25_000  # widened over runs of expunged UIDs, at most this far (the answer's lines stay few)
BATCH_BYTES = 2 * 1024 * 1024  # bodies fetched per round trip (bounded memory)
BATCH_MESSAGES = 100
MAX_MESSAGE_BYTES = 1024 * 1024  # larger: read only this far (never loaded whole), logged, counted as `large`
LEASE_HOLD_SECONDS = 120.0  # a poll ends its turn after 80 % of this; a backlog goes on in the next one at once
PROGRESS_EVERY = 1000  # a progress line every this many messages in one poll


@dataclass
class PollReport:
    """What one poll did (its log line)."""

    folder: str
    started: float
    seen: int = 0  # messages read
    kinds: Counter = field(default_factory=Counter)  # outcome kind → count (reports and not)
    reports: int = 0  # delivery reports (marked \Seen / moved)
    left_alone: int = 0  # not a report: untouched
    duplicates: int = 0
    large: int = 0  # over MAX_MESSAGE_BYTES: read partially
    moved: int = 0
    last_uid: int = 0
    uidvalidity: int = 0
    error: str | None = None  # why the poll stopped early
    more: bool = False  # stopped by its time budget with messages left: the next poll follows at once

    def line(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items())) or "none"
        text = (f"bounce mailbox {self.folder}: {self.seen} new message(s) ({kinds}); {self.reports} report(s) "
                f"marked \\Seen{f' ({self.moved} moved)' if self.moved else ''}, {self.left_alone} other(s) left "
                f"untouched, {self.duplicates} already known, {self.large} over {MAX_MESSAGE_BYTES} bytes; "
                f"position UID {self.last_uid} (UIDVALIDITY {self.uidvalidity})")
        return text + (f"; stopped: {self.error}, the next poll resumes after UID {self.last_uid}"
                       if self.error else "")


def default_handler():
    """bounces.handle.process_message, imported when first needed."""
    from bounces import handle

    return handle.process_message


def poll(settings, engine, owner: str, *, handler=None, now: float | None = None, backlog: bool = False,
         budget: float | None = None, stop: threading.Event | None = None) -> PollReport | None:
    """One poll of the bounce mailbox if it is due and no other process has the lease (None otherwise)."""
    now = time.time() if now is None else now
    interval = 0 if backlog else settings.bounce_poll_seconds
    hold = max(settings.lease_seconds, LEASE_HOLD_SECONDS)  # not the interval: a dead poller blocks no day long
    turn = leases.take_turn(engine, LEASE, owner, interval, hold, now)
    if turn.round is None:
        return None
    report = PollReport(settings.bounce_imap.key, now)
    try:
        # The lease is not renewed: a poll ends its turn well before the lease does, the rest waits for the next.
        deadline = time.monotonic() + (budget if budget is not None else hold * 0.8)
        read_folder(settings, engine, handler or default_handler(), report,
                    lambda: time.monotonic() > deadline or (stop is not None and stop.is_set()))
    except BaseException as exc:  # a bug in the processing: logged by the caller; the position stays before it
        report.error = report.error or f"{exc.__class__.__name__} while processing after UID {report.last_uid}"
        raise
    finally:
        level = logging.WARNING if report.error else logging.INFO
        log.log(level, "%s", report.line())
        leases.finish_turn(engine, LEASE, owner, ("failed: " + report.error) if report.error else
                           f"ok: {report.seen} message(s), {report.reports} report(s)")
    return report


def read_folder(settings, engine, handler, report: PollReport, out_of_time) -> None:
    """Process the messages after the saved position, batch by batch; a broken session stops it (logged)."""
    key = settings.bounce_imap.key
    try:
        with Mailbox(settings) as box:
            selected = box.select(settings.bounce_imap.folder)
            saved = mailbox.position(engine, key)
            last = saved.last_uid if saved is not None and saved.uidvalidity == selected.uidvalidity else 0
            if saved is not None and saved.uidvalidity != selected.uidvalidity:
                log.warning("bounce mailbox %s: UIDVALIDITY changed from %s to %s: reading the folder again from "
                            "the start (a report already processed is recognised and counts once)",
                            key, saved.uidvalidity, selected.uidvalidity)
                mailbox.save_position(engine, key, selected.uidvalidity, 0, time.time())
            report.uidvalidity, report.last_uid = selected.uidvalidity, last
            end, window = selected.uidnext - 1, SIZE_WINDOW
            while last < end:
                if out_of_time():
                    report.more = True
                    return
                upper = min(last + window, end)
                sizes = box.sizes(last + 1, upper)
                # An empty window is a run of expunged UIDs: widen the next one (sparse folders stay quick).
                window = SIZE_WINDOW if sizes else min(window * 2, MAX_WINDOW)
                for batch in _batches(sizes):
                    if out_of_time():
                        report.more = True
                        return
                    _process_batch(settings, engine, handler, box, batch, report)
                    last = batch[-1][0]
                    _advance(engine, key, report, last)
                # Every UID up to `upper` is now processed or absent: new mail gets UIDs from UIDNEXT on.
                last = upper
                _advance(engine, key, report, last)
    except MailboxError as exc:
        report.error = str(exc)
    except (DBAPIError, StateUnavailable) as exc:
        reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
        report.error = f"state database error: {reason}"


def _advance(engine, key: str, report: PollReport, last: int) -> None:
    if last > report.last_uid:
        mailbox.save_position(engine, key, report.uidvalidity, last, time.time())
        report.last_uid = last


def _batches(sizes: list[tuple[int, int]]):
    """Consecutive groups of (UID, size) of at most BATCH_MESSAGES and BATCH_BYTES (one message at least)."""
    batch, total = [], 0
    for uid, size in sizes:
        size = min(size, MAX_MESSAGE_BYTES)
        if batch and (len(batch) >= BATCH_MESSAGES or total + size > BATCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append((uid, size))
        total += size
    if batch:
        yield batch


def _process_batch(settings, engine, handler, box: Mailbox, batch, report: PollReport) -> None:
    """Fetch, process, then flag (and move) the reports of one batch. Raises MailboxError before the position
    moves when anything of it could not be done."""
    small = [uid for uid, size in batch if size < MAX_MESSAGE_BYTES]
    large = [uid for uid, size in batch if size >= MAX_MESSAGE_BYTES]
    bodies = box.bodies(small) if small else {}
    if large:
        bodies.update(box.bodies(large, limit=MAX_MESSAGE_BYTES))
    done = []
    for uid, size in batch:
        raw = bodies.get(uid)
        if raw is None:  # expunged meanwhile by someone else: nothing to read
            continue
        if uid in large:
            report.large += 1
            log.warning("bounce mailbox %s: message UID %s is %s bytes: only its first %s bytes are read",
                        report.folder, uid, size, MAX_MESSAGE_BYTES)
        outcome = handler(engine, settings, raw, source="imap")
        report.seen += 1
        report.kinds[outcome.kind] += 1
        report.duplicates += bool(outcome.duplicate)
        if outcome.is_bounce:
            done.append(uid)
        else:
            report.left_alone += 1
        if report.seen % PROGRESS_EVERY == 0:
            log.info("bounce mailbox %s: %d message(s) read so far in this poll, at UID %s",
                     report.folder, report.seen, uid)
    if done:
        box.mark_seen(done)
        if settings.bounce_imap_done_folder:
            if box.move(done, settings.bounce_imap_done_folder):
                report.moved += len(done)
            elif not getattr(box, "warned_no_move", False):
                box.warned_no_move = True
                log.warning("bounce mailbox %s: the server has neither MOVE nor UIDPLUS: processed reports are "
                            "copied to %s and marked \\Seen, but stay in the folder", report.folder,
                            settings.bounce_imap_done_folder)
        report.reports += len(done)


class Poller:
    """Runs a poll in a thread of its own when one is due, so that a slow IMAP server never holds up the
    deliveries of the worker whose loop calls tick()."""

    def __init__(self, settings, engine, owner: str, stop: threading.Event | None = None, handler=None):
        self.settings, self.engine, self.owner, self.handler = settings, engine, owner, handler
        self.stop = stop or threading.Event()
        self.thread: threading.Thread | None = None
        self._next_check = 0.0
        self._backlog = False

    @property
    def enabled(self) -> bool:
        return self.settings.bounce_imap is not None and self.settings.bounce_poll_seconds > 0

    def tick(self) -> None:
        """Start a poll if one may be due (a time comparison; the lease decides who runs it)."""
        if not self.enabled or (self.thread is not None and self.thread.is_alive()) or self.stop.is_set():
            return
        if time.time() < self._next_check:
            return
        self.thread = threading.Thread(target=self._run, name="wecom-mailer-bounces", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        interval = self.settings.bounce_poll_seconds
        try:
            report = poll(self.settings, self.engine, self.owner, handler=self.handler, backlog=self._backlog,
                          stop=self.stop)
        except (DBAPIError, StateUnavailable) as exc:
            reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
            log.warning("bounce intake: state database error, next try in %.0f s: %s", min(interval, 30.0), reason)
            self._next_check = time.time() + min(interval, 30.0)
            return
        except Exception:
            log.exception("bounce intake: the poll failed; trying again in one interval")
            self._next_check = time.time() + interval
            return
        if report is None:  # another process has the turn: ask again when the next one is due
            self._next_check = leases.next_turn_at(self.engine, LEASE, interval, min(interval, 1.0))
            return
        self._backlog = report.more
        self._next_check = time.time() if report.more else report.started + interval

    def due_in(self) -> float:
        """Seconds until tick() may start a poll (the worker loop sleeps no longer than that)."""
        if not self.enabled or (self.thread is not None and self.thread.is_alive()):
            return float("inf")
        return max(0.0, self._next_check - time.time())

    def join(self, timeout: float) -> None:
        """Wait for a poll in progress (shutdown)."""
        if self.thread is not None:
            self.thread.join(timeout)
