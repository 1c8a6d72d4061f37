"""The digest when things go wrong: a refused digest is retried with what was held meanwhile, a dead
worker's digest is taken over, a permanent refusal fails what it carried; two expansions at one moment
never both send at once. Each change still reaches each member exactly once."""
from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest

import wecom
from delivery.digest import id_ranges, quiet_until
from store import db, digests, migrate, outbox, recording, schema
from store.recipients import Hold
from support import change_xml, count, rows
from support.digests import MEMBERS, SHANGHAI, T0, Clock, changes_received, digest_worker, mails_by_recipient


def held_once(department, poster, clock, worker, *userids) -> None:
    """A first change to everyone at once, then `userids` held; the window then ends."""
    poster("first")
    department.drain(worker)
    for n, userid in enumerate(userids, 1):
        poster(userid, n=n)
    department.drain(worker)
    clock.advance(60)


def open_digest(engine, address: str):
    [digest] = [d for d in rows(engine, schema.digests) if d.address == address and d.status == "collecting"]
    return digest


def test_a_refused_digest_is_retried_and_carries_what_was_held_meanwhile(department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    held_once(department, poster, clock, worker, "held1")
    smtp_sink.fail_next(1, "451 4.3.0 try again later")
    department.drain(worker)
    [refused] = [d for d in rows(department.engine, schema.digests) if d.status == "collecting"]
    assert refused.attempts == 1 and "451" in refused.reason and refused.due_at > clock.now
    poster("held2", n=2)  # joins the refused digest; the others' windows are running: new digests
    department.drain(worker)
    clock.advance(1)  # the retry's backoff (RETRY_BACKOFF_SECONDS=0.05 here)
    department.drain(worker)
    clock.advance(60)
    department.drain(worker)

    assert set(changes_received(smtp_sink.messages).values()) == {1}
    assert len(changes_received(smtp_sink.messages)) == 10 * 3
    mails = mails_by_recipient(smtp_sink.messages)
    assert len(mails[refused.address]) == 2  # the first change, then one digest with both held ones
    assert {len(m) for a, m in mails.items() if a != refused.address} == {3}
    assert [d.attempts for d in rows(department.engine, schema.digests) if d.id == refused.id] == [2]
    assert count(department.engine, schema.deliveries, schema.deliveries.c.status != "sent") == 0


def test_what_is_held_while_a_digest_is_in_flight_joins_it_when_it_must_be_retried(department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    held_once(department, poster, clock, worker, "held1")
    address = MEMBERS[0]
    in_flight = digests.claim(department.engine, open_digest(department.engine, address).id, address, "other",
                              30, clock.now)
    assert [c.user_id for c in in_flight.changes] == ["held1"]
    poster("held2", n=2)
    department.drain(worker)  # held2 waits in a new digest; none goes to this member while one is in flight
    assert address not in mails_by_recipient(smtp_sink.messages[10:])
    newer = open_digest(department.engine, address)
    assert newer.id != in_flight.id

    values = {"attempts": 1, "first_attempt_at": clock.now}
    assert digests.release(department.engine, in_flight, "other", clock.now, "451 try again later", values)
    assert [d.status for d in rows(department.engine, schema.digests) if d.id == newer.id] == ["merged"]
    department.drain(worker)
    [digest] = mails_by_recipient(smtp_sink.messages[10:])[address]
    assert "held1" in digest.get_content() and "held2" in digest.get_content()
    assert set(changes_received(mails_by_recipient(smtp_sink.messages)[address]).values()) == {1}


def test_a_dead_workers_digest_is_taken_over_when_its_lease_runs_out(department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    held_once(department, poster, clock, worker, "held1", "held2")
    address = MEMBERS[3]
    assert digests.claim(department.engine, open_digest(department.engine, address).id, address, "dead", 30,
                         clock.now)
    department.drain(worker)
    assert len(smtp_sink.messages) == 19 and address not in mails_by_recipient(smtp_sink.messages[10:])
    clock.advance(31)  # the dead worker's lease has run out
    department.drain(worker)
    assert len(smtp_sink.messages) == 20
    assert set(changes_received(smtp_sink.messages).values()) == {1}
    assert {d.status for d in rows(department.engine, schema.digests)} == {"sent"}
    assert {e.status for e in rows(department.engine, schema.events)} == {"done"}


def test_a_permanently_refused_digest_fails_what_it_carried_and_a_retry_sends_them_one_by_one(
        department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    refused = MEMBERS[1]
    poster("first")
    department.drain(worker)
    smtp_sink.reject(refused, "550 5.6.0 message refused")  # 5.1.1 would bounce and suppress it
    poster("held1", n=1)
    poster("held2", n=2)
    department.drain(worker)
    clock.advance(60)
    department.drain(worker)
    failed = [d for d in rows(department.engine, schema.deliveries) if d.status == "failed"]
    assert [(d.address, d.reason) for d in failed] == [(refused, "550 5.6.0 message refused")] * 2
    events = rows(department.engine, schema.events)
    assert [(e.status, e.reason) for e in events[1:]] == [("done", "1 failed, 9 sent")] * 2

    smtp_sink.accept(refused)
    assert outbox.requeue(department.engine) == (0, 2)
    clock.now = time.time() + 1  # requeued now, on the real clock
    department.drain(worker)
    assert [m["X-RcptTo"] for m in smtp_sink.messages[-2:]] == [refused] * 2
    assert set(changes_received(smtp_sink.messages).values()) == {1}


def test_held_deliveries_still_go_after_the_digest_is_turned_off(department, poster, smtp_sink):
    clock = Clock(T0)
    held_once(department, poster, clock, digest_worker(department, clock, digest_window=60), "held1")
    department.drain(digest_worker(department, clock, digest_window=0))
    assert len(smtp_sink.messages) == 20 and set(changes_received(smtp_sink.messages).values()) == {1}


def test_two_expansions_at_one_moment_never_both_send_at_once(db_url):
    """The Novu trap (duplicates when events land in the same second): each address's row is locked."""
    engine = db.make_engine(db_url)
    migrate.ensure_schema(engine)
    for round_ in range(5):
        addresses = [f"r{round_}m{i}@corp.example" for i in range(20)]
        ids = []
        for userid in ("a", "b"):
            xml = change_xml("create_user", f"{userid}{round_}")
            ids.append(recording.record_event(engine, xml, wecom.parse_event(xml), "pending")[0])
            assert outbox.claim_event(engine, f"owner-{userid}", 30, now=T0) is not None
        start = threading.Barrier(2)

        def expand(event_id: int, owner: str) -> bool:
            start.wait(timeout=10)
            rows_ = [{"userid": a.split("@")[0], "name": "", "address": a, "status": "pending"} for a in addresses]
            return outbox.expand_event(engine, event_id, owner, "s", "b", rows_, now=T0, hold=Hold(T0, 60))

        results = []
        threads = [threading.Thread(target=lambda e=e, o=o: results.append(expand(e, o)))
                   for e, o in zip(ids, ("owner-a", "owner-b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == [True, True]
        statuses = [(d.address, d.status) for d in rows(engine, schema.deliveries) if d.event_id in ids]
        assert sorted(statuses) == sorted([(a, "pending") for a in addresses] + [(a, "held") for a in addresses])
    engine.dispose()


@pytest.mark.parametrize("local, quiet, ends", [
    ("23:00", (22 * 60, 8 * 60), "2024-03-06 08:00"),
    ("03:30", (22 * 60, 8 * 60), "2024-03-05 08:00"),
    ("22:00", (22 * 60, 8 * 60), "2024-03-06 08:00"),
    ("08:00", (22 * 60, 8 * 60), None),
    ("21:59", (22 * 60, 8 * 60), None),
    ("12:00", (22 * 60, 8 * 60), None),
    ("02:00", (60, 6 * 60), "2024-03-05 06:00"),
    ("00:30", (60, 6 * 60), None),
    ("06:00", (60, 6 * 60), None),
])
def test_quiet_hours_end_where_they_should(local, quiet, ends):
    hour, minute = map(int, local.split(":"))
    now = datetime(2024, 3, 5, hour, minute, tzinfo=SHANGHAI).timestamp()
    until = quiet_until(now, quiet, SHANGHAI)
    assert (datetime.fromtimestamp(until, SHANGHAI).strftime("%Y-%m-%d %H:%M") if until else None) == ends


def test_event_ids_in_a_digest_log_line_are_short_ranges():
    assert id_ranges([9, 3, 4, 5, 12, 13, 7, 5]) == "3-5,7,9,12-13"
