"""An address suppressed while mail to it waits (docs/bounces.md, "The next source"): the delivery waiting to
be retried is skipped, the digest collecting for it fails, both with `address suppressed: …`, neither is
handed to the relay, and with WECOM_MESSAGE=fallback the member is told in WeCom instead, once."""
from __future__ import annotations

import time

from channels import fallback
from store import schema, suppressions
from support import rows
from support.digests import T0, Clock, changes_received, mails_by_recipient
from support.messages import post, received

VICTIM = "user0002@corp.example"


def suppress(service, reason: str = "5.1.1 user unknown") -> None:
    """What a hard bounce of another mail to VICTIM (or an admin) does meanwhile."""
    with service.engine.begin() as conn:
        assert suppressions.suppress(conn, VICTIM, reason, "bounce", now=time.time())


def emails_to(service, address: str) -> list:
    return rows(service.engine, schema.deliveries, schema.deliveries.c.address == address)


def test_a_delivery_waiting_to_be_retried_is_skipped_and_its_member_gets_a_wecom_message(
        messaging, standin, smtp_sink, crypto):
    smtp_sink.reject(VICTIM, "451 4.3.0 try again later")  # refused for now: the delivery waits
    service = messaging("fallback")
    service.drain()
    post(service, crypto, "new001")
    worker = service.drain()
    [waiting] = emails_to(service, VICTIM)
    assert waiting.status == "retry" and "451" in waiting.reason
    assert received(standin) == {}  # a retry is no reason yet to message anyone

    suppress(service)
    smtp_sink.accept(VICTIM)  # the relay would take it now: the suppression alone must keep it back
    wait = waiting.next_attempt_at - time.time()
    assert wait < 5, waiting  # RETRY_BACKOFF_SECONDS=0.05 here
    time.sleep(max(wait, 0) + 0.05)  # its turn has come
    service.drain(worker)

    [skipped] = emails_to(service, VICTIM)
    assert skipped.status == "skipped" and skipped.reason.startswith("address suppressed: 5.1.1 user unknown")
    assert VICTIM not in mails_by_recipient(smtp_sink.messages)
    assert len(smtp_sink.messages) == 4  # the other four members, once each
    assert received(standin) == {"user0002": 1}
    service.drain(worker)
    assert received(standin) == {"user0002": 1}
    assert [e.status for e in rows(service.engine, schema.events)] == ["done"]


def test_a_digest_collecting_for_an_address_suppressed_meanwhile_fails_and_its_member_gets_a_wecom_message(
        messaging, standin, smtp_sink, crypto):
    clock = Clock(T0)
    service = messaging("fallback")
    worker = service.make_worker(digest_window=60)
    worker.clock = clock
    service.drain(worker)
    post(service, crypto, "first")
    service.drain(worker)  # the first change goes at once; each member's window opens
    post(service, crypto, "held1", n=1)
    post(service, crypto, "held2", n=2)
    service.drain(worker)  # held for the window
    assert len(smtp_sink.messages) == 5

    suppress(service)
    clock.advance(61)
    service.drain(worker)

    mails = mails_by_recipient(smtp_sink.messages)
    assert len(mails[VICTIM]) == 1  # the first change only: the digest was never handed to the relay
    assert {len(m) for a, m in mails.items() if a != VICTIM} == {2}
    assert set(changes_received(smtp_sink.messages).values()) == {1}
    [digest] = [d for d in rows(service.engine, schema.digests) if d.address == VICTIM]
    assert digest.status == "failed" and digest.reason.startswith("address suppressed: 5.1.1 user unknown")
    carried = [d for d in emails_to(service, VICTIM) if d.status != "sent"]
    assert [(d.status, d.reason.startswith("address suppressed:")) for d in carried] == [("failed", True)] * 2

    # Not silenced: the fallback's sweep finds those two and tells the member in WeCom, each change once (the
    # second within the WeCom channel's own digest window, which the first message opened).
    assert fallback.sweep(worker, force=True) == 2
    for _ in range(3):
        service.drain(worker)
        clock.advance(61)
    contents = standin.messages_to("user0002")
    assert [sum(f"ID：{u}" in c for c in contents) for u in ("held1", "held2")] == [1, 1], contents
    assert set(received(standin)) == {"user0002"} and len(contents) <= 2
    assert {e.status for e in rows(service.engine, schema.events)} == {"done"}
