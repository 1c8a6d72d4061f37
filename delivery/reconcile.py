"""Reconciliation: every RECONCILE_SECONDS one process lists each watched department and announces, through
the outbox like a callback, the joins and leaves whose callback never came.

Level-triggered, as a Kubernetes controller is: a callback is a hint, the periodic comparison of the listing
with the announced membership (store/membership.py) is the guarantee. A change is acted on when two
consecutive listings show it, three when a listing drops more than half of the announced members at once;
a failed or empty listing is never acted on.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import DBAPIError

import wecom
import wecom_api
from templates_repo import TIME_FORMAT
from store import leases, membership
from store.db import StateUnavailable

log = logging.getLogger("wecom_mailer.reconcile")
LEASE = "reconcile"
CONFIRMING_LISTINGS = 2
CONFIRMING_LISTINGS_AFTER_A_MASS_DROP = 3
RETRY_AFTER_DB_ERROR_SECONDS = 30.0


@dataclass(frozen=True)
class Due:
    """A change two (or three) consecutive listings confirmed."""

    department_id: int
    kind: str  # join | leave
    userid: str
    name: str
    since: float  # the first listing that showed it
    member: wecom_api.Member | None  # as listed (joins)


@dataclass(frozen=True)
class Comparison:
    """One listing of a department against its announced membership."""

    observations: dict[str, dict]  # userid → what this listing observed (kind, listings, since, name)
    due: list[Due]
    dropped: int  # announced members this listing lacks
    announced: int  # announced members

    @property
    def mass_drop(self) -> bool:
        return self.dropped * 2 > self.announced


def compare(department_id: int, listing: dict[str, wecom_api.Member], joined: dict[str, str],
            previous: dict[str, object], now: float) -> Comparison:
    """Who is listed but not announced (join), announced but not listed (leave), for how many listings."""
    dropped = [userid for userid in joined if userid not in listing]
    needed = {"join": CONFIRMING_LISTINGS,
              "leave": CONFIRMING_LISTINGS_AFTER_A_MASS_DROP if len(dropped) * 2 > len(joined)
              else CONFIRMING_LISTINGS}
    differences = [("join", userid, member.name, member) for userid, member in listing.items()
                   if userid not in joined] + [("leave", userid, joined[userid], None) for userid in dropped]
    observations, due = {}, []
    for kind, userid, name, member in differences:
        before = previous.get(userid)
        listings, since = (before.listings + 1, before.since) if before is not None and before.kind == kind \
            else (1, now)
        observations[userid] = {"userid": userid, "kind": kind, "listings": listings, "since": since,
                                "name": name[:255]}
        if listings >= needed[kind]:
            due.append(Due(department_id, kind, userid, name, since, member))
    return Comparison(observations, due, len(dropped), len(joined))


@dataclass
class RoundReport:
    """What one round did."""

    round: int
    started: float
    listed: dict[int, int] = field(default_factory=dict)  # department → members listed
    failed: dict[int, str] = field(default_factory=dict)  # department → why its listing was not used
    failure_kinds: list[str] = field(default_factory=list)  # listing (WeCom refused or failed) | empty
    seeded: list[int] = field(default_factory=list)
    announced: list[tuple[int, str, str]] = field(default_factory=list)  # (event id, change type, userid)
    waiting: list[str] = field(default_factory=list)  # userids whose own event is still open

    def outcome(self) -> str:
        parts = [f"department {d}: {why}" for d, why in self.failed.items()]
        parts.append(f"{len(self.announced)} change(s) announced")
        return ("failed: " if self.failed else "ok: ") + "; ".join(parts)


def run_round(settings, engine, client, owner: str, now: float | None = None, metrics=None,
              stop: threading.Event | None = None) -> RoundReport | None:
    """One round, if it is due and no other process has it (None otherwise)."""
    now = time.time() if now is None else now
    interval = settings.reconcile_seconds
    turn = leases.take_turn(engine, LEASE, owner, interval, max(interval, settings.lease_seconds), now)
    if turn.round is None:
        return None
    report = RoundReport(turn.round, now)
    try:
        comparisons = {}
        for department_id in settings.department_ids:
            if stop is not None and stop.is_set():
                break
            comparison = _compare_department(settings, engine, client, department_id, report, now)
            if comparison is not None:
                comparisons[department_id] = comparison
        resolved = _announce(settings, engine, comparisons, report, now)
        for department_id, comparison in comparisons.items():
            kept = [row for userid, row in comparison.observations.items()
                    if (department_id, userid) not in resolved]
            membership.save_observations(engine, department_id, kept, report.round, now,
                                         report.listed[department_id])
        _summarise(report, metrics)  # before the lease is released: whoever sees it free sees the round counted
    finally:
        leases.finish_turn(engine, LEASE, owner, report.outcome())
    return report


def _summarise(report: RoundReport, metrics) -> None:
    """The round's one log line and its counters."""
    if metrics:
        metrics.reconcile_round("failed" if report.failed else "ok")
        for kind in report.failure_kinds:
            metrics.reconcile_failure(kind)
        for _, change_type, _ in report.announced:
            metrics.reconcile_event(change_type)
    listed = ", ".join(f"department {d} listed {n} member(s)" + (" and seeded" if d in report.seeded else "")
                       for d, n in report.listed.items()) or "nothing listed"
    log.info("reconciliation round %d: %s; %d change(s) announced, %d waiting for their own event, "
             "%d department(s) skipped", report.round, listed, len(report.announced), len(report.waiting),
             len(report.failed))


def _compare_department(settings, engine, client, department_id: int, report: RoundReport,
                        now: float) -> Comparison | None:
    """List one department and compare; None when there is nothing to act on (failed, empty, just seeded)."""
    try:
        members = client.list_members([department_id], settings.fetch_child)[department_id]
    except wecom_api.WeComError as exc:
        return _skip(report, department_id, "listing", f"listing failed: {exc}")
    listing = {member.userid: member for member in members}
    state = membership.department_state(engine, department_id)
    if state is None or bool(state.fetch_child) != settings.fetch_child:
        if not listing:
            return _skip(report, department_id, "empty", "the listing is empty; the department is seeded by its "
                                                          "first non-empty listing")
        membership.seed(engine, department_id, members, report.round, now, settings.fetch_child)
        report.seeded.append(department_id)
        report.listed[department_id] = len(listing)
        log.info("reconciliation: department %s seeded with its %d member(s)%s (nobody is announced for it)",
                 department_id, len(listing), "" if state is None else
                 f" again: WECOM_FETCH_CHILD is now {str(settings.fetch_child).lower()}")
        return None
    joined = membership.joined_members(engine, department_id)
    if not listing and joined:
        return _skip(report, department_id, "empty", f"the listing is empty while {len(joined)} member(s) are "
                                                      "announced: treated as a failed listing")
    comparison = compare(department_id, listing, joined, membership.observed(engine, department_id), now)
    report.listed[department_id] = len(listing)
    if comparison.mass_drop:
        leaving = [due for due in comparison.due if due.kind == "leave"]
        log.warning("reconciliation: department %s: this listing lacks %d of its %d announced members at once; %s",
                    department_id, comparison.dropped, comparison.announced,
                    f"a third listing confirms it: {len(leaving)} leave(s) announced" if leaving else
                    "not acted on until a third listing confirms it")
    return comparison


def _skip(report: RoundReport, department_id: int, kind: str, why: str) -> None:
    report.failed[department_id] = why
    report.failure_kinds.append(kind)
    log.warning("reconciliation round %d: department %s not reconciled, nothing announced for it: %s",
                report.round, department_id, why)
    return None


def _announce(settings, engine, comparisons: dict[int, Comparison], report: RoundReport,
              now: float) -> set[tuple[int, str]]:
    """One synthetic event per (userid, join/leave) for the departments that confirmed it; returns the
    (department, userid) pairs settled (announced now, or by a callback first)."""
    groups: dict[tuple[str, str], list[Due]] = {}
    for comparison in comparisons.values():
        for due in comparison.due:
            groups.setdefault((due.kind, due.userid), []).append(due)
    busy = membership.open_event_userids(engine, {userid for _, userid in groups})
    settled = set()
    for (kind, userid), dues in groups.items():
        if userid in busy:  # its callback was recorded and is on its way: that one announces it
            report.waiting.append(userid)
            continue
        departments = sorted(due.department_id for due in dues)
        event = _synthetic_event(settings, kind, userid, dues, report.round)
        event_id, won = membership.announce(engine, departments, userid, "joined" if kind == "join" else "left",
                                            dues[0].name, event["create_time"], event, now)
        settled.update((department_id, userid) for department_id in departments)
        if event_id is not None:
            report.announced.append((event_id, event["change_type"], userid))
            log.info("event %s %s userid=%s: recorded by reconciliation for department(s) %s (%s since %s)",
                     event_id, event["change_type"], userid, ",".join(map(str, won)),
                     "listed, not announced," if kind == "join" else "announced, not listed,",
                     local_time(event["create_time"], settings.tz))
    return settled


def _synthetic_event(settings, kind: str, userid: str, dues: list[Due], round_no: int) -> dict:
    """The wm_events row of an announcement: the XML WeCom would have sent, CreateTime = first seen/missed."""
    since = int(min(due.since for due in dues))
    departments = [due.department_id for due in dues]
    if kind == "join":
        member = dues[0].member
        listed_in = ",".join(map(str, member.departments)) or ",".join(map(str, departments))
        xml = wecom.event_xml("create_user", userid, settings.corp_id, listed_in, since, dues[0].name)
    else:
        xml = wecom.event_xml("delete_user", userid, settings.corp_id, "", since, dues[0].name)
    return {"dedup_key": membership.announcement_key(departments, userid, kind, round_no),
            "change_type": "create_user" if kind == "join" else "delete_user", "user_id": userid[:64],
            "create_time": since, "xml": xml, "status": "pending", "reason": None, "attempts": 0,
            "received_at": time.time(), "next_attempt_at": 0, "source": "reconcile"}


def local_time(epoch: float, tz) -> str:
    """A time as the operator reads it: in TIMEZONE, to the second."""
    return datetime.fromtimestamp(epoch, tz).strftime(TIME_FORMAT)


class Reconciler:
    """Runs a round in a thread of its own when one is due, so that a slow listing never holds up the
    deliveries of the worker whose loop calls tick() on every poll."""

    def __init__(self, settings, engine, client, owner: str, metrics=None, stop: threading.Event | None = None,
                 on_announced=None):
        self.settings, self.engine, self.client, self.owner = settings, engine, client, owner
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.on_announced = on_announced or (lambda: None)
        self.thread: threading.Thread | None = None
        self._next_check = 0.0

    def tick(self, idle: bool = True) -> None:
        """Start a round if one may be due (a time comparison; the database decides who runs it). While the
        worker is busy a round waits, for one interval at most: its listing's CPU would slow the sending."""
        interval = self.settings.reconcile_seconds
        if interval <= 0 or (self.thread is not None and self.thread.is_alive()):
            return
        if time.time() < self._next_check + (0 if idle else interval):
            return
        self.thread = threading.Thread(target=self._run, name="wecom-mailer-reconcile", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        interval = self.settings.reconcile_seconds
        try:
            report = run_round(self.settings, self.engine, self.client, self.owner, metrics=self.metrics,
                               stop=self.stop)
        except (DBAPIError, StateUnavailable) as exc:
            reason = exc.orig.__class__.__name__ if isinstance(exc, DBAPIError) else str(exc)
            log.warning("reconciliation: state database error, next try in %.0f s: %s",
                        min(interval, RETRY_AFTER_DB_ERROR_SECONDS), reason)
            self._next_check = time.time() + min(interval, RETRY_AFTER_DB_ERROR_SECONDS)
            return
        except Exception:
            log.exception("reconciliation round failed; trying again in one interval")
            self._next_check = time.time() + interval
            return
        if report is None:  # another process has the turn: ask again when the next one is due
            self._next_check = leases.next_turn_at(self.engine, LEASE, interval, min(interval, 1.0))
            return
        self._next_check = report.started + interval
        if report.announced:
            self.on_announced()

    def due_in(self) -> float:
        """Seconds until tick() may start a round (the worker loop sleeps no longer than that)."""
        if self.settings.reconcile_seconds <= 0 or (self.thread is not None and self.thread.is_alive()):
            return float("inf")
        return max(0.0, self._next_check - time.time())

    def join(self, timeout: float) -> None:
        """Wait for a round in progress (shutdown)."""
        if self.thread is not None:
            self.thread.join(timeout)
