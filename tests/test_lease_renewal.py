"""The lease on an event in hand is renewed while a slow message is in flight: a second worker takes nothing over."""
from __future__ import annotations

import threading

import pytest

from devtools.wecom_standin import make_members
from support import DEPARTMENT, change_xml, delivery_rows, event_rows, signed_post, wait_until
from support.smtp_server import SlowSink

LEASE_SECONDS = 1.0  # renewed every third of it
DATA_SECONDS = 2.5  # the relay answers DATA after longer than two whole leases


@pytest.fixture
def smtp_sink():
    """The service's SMTP server (conftest's service_env uses this one): slow to answer DATA."""
    with SlowSink(DATA_SECONDS) as sink:
        yield sink


def test_a_message_slower_than_the_lease_keeps_the_event_from_a_second_worker(service, standin, smtp_sink, crypto):
    standin.set_members(DEPARTMENT, make_members(1, DEPARTMENT))
    assert signed_post(service.test_client(), crypto, change_xml("create_user", "user0001")).data == b"success"
    first = service.make_worker(lease_seconds=LEASE_SECONDS)
    second = service.make_worker(lease_seconds=LEASE_SECONDS)
    outcome = {}
    sending = threading.Thread(target=lambda: outcome.setdefault("busy", first.run_once()), daemon=True)
    sending.start()
    assert smtp_sink.in_data.wait(10), "the first worker's message never reached DATA"
    assert event_rows(service.engine)[0].lease_owner == first.owner

    def second_worker_finds_nothing_until_the_message_is_accepted():
        assert not second.run_once(), "a second worker took over the event while its message was in flight"
        return smtp_sink.messages
    # Bounded: the sink accepts after DATA_SECONDS; the second worker tries every 50 ms until then, so also
    # after the first worker's lease would have run out twice had it not been renewed.
    wait_until(second_worker_finds_nothing_until_the_message_is_accepted, timeout=DATA_SECONDS + 10,
               what="the slow message to be accepted")
    sending.join(timeout=10)
    assert not sending.is_alive() and outcome == {"busy": True}

    assert [m["X-RcptTo"] for m in smtp_sink.messages] == ["user0001@corp.example"]
    [event] = event_rows(service.engine)
    assert (event.status, event.lease_owner) == ("done", None)
    [delivery] = delivery_rows(service.engine)
    assert (delivery.status, delivery.attempts) == ("sent", 1)
    assert not second.run_once() and len(smtp_sink.messages) == 1
