"""A template test sent to oneself, through the outbox like any change: one event (source `test`) already
rendered, with one delivery. The worker sends it as it sends every event; status pages show it as a test."""
from __future__ import annotations

import secrets
import time

from sqlalchemy.engine import Engine

from store.db import with_retries
from store.schema import deliveries, events

SOURCE = "test"
SUBJECT_MARK = "[测试 Test] "


def enqueue(engine: Engine, change_type: str, xml: str, subject: str, body: str, userid: str, name: str,
            address: str, version_subquery=None) -> int:
    """Queue the test mail to `address`; returns the event id. The subject is marked as a test."""
    now = time.time()

    def write():
        with engine.begin() as conn:
            event_id = conn.execute(events.insert(), {
                "dedup_key": "test-" + secrets.token_hex(16), "change_type": change_type[:32],
                "user_id": userid[:64], "departments": "", "create_time": int(now), "xml": xml,
                "status": "sending", "reason": f"template test sent by {userid}"[:200],
                "subject": SUBJECT_MARK + subject, "body": body, "attempts": 0, "received_at": now,
                "next_attempt_at": 0, "source": SOURCE, "held_rows": 0}).inserted_primary_key[0]
            if version_subquery is not None:
                conn.execute(events.update().where(events.c.id == event_id).values(template_version=version_subquery))
            conn.execute(deliveries.insert(), {"event_id": event_id, "userid": userid[:64], "name": name[:255],
                                               "address": address, "status": "pending", "attempts": 0,
                                               "next_attempt_at": 0})
            return event_id
    return with_retries(write)
