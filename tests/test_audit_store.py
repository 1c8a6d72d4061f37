"""The audit log's store (store/audit.py): rows are appended, read newest first, filtered, and kept printable."""
from __future__ import annotations

import pytest

from store import audit, migrate
from store.db import make_engine


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_rows_come_back_newest_first_and_filter_by_actor_and_action(engine):
    audit.record(engine, "zhangsan", "sign-in", client="192.0.2.7")
    audit.record(engine, "zhangsan", "retry", target="event 17", detail="3 deliveries requeued")
    audit.record(engine, audit.CLI, "retry", target="failed", detail="5 deliveries requeued")
    assert [(e.actor, e.action) for e in audit.entries(engine)] == \
        [("cli", "retry"), ("zhangsan", "retry"), ("zhangsan", "sign-in")]
    assert [e.target for e in audit.entries(engine, actor="zhangsan", action="retry")] == ["event 17"]
    assert audit.entries(engine, actor="zhangsan")[-1].client == "192.0.2.7"
    assert audit.count(engine) == 3


def test_a_forged_line_or_a_long_detail_is_stored_as_one_short_printable_line(engine):
    audit.record(engine, "eve\n2026-01-01 admin sign-in", "template-save", target="t" * 1000,
                 detail="\x1b]0;owned\x07" + "x" * 1000)
    entry = audit.entries(engine)[0]
    assert "\n" not in entry.actor and "\x1b" not in entry.detail and "\x07" not in entry.detail
    assert len(entry.target) <= 255 and len(entry.detail) <= 255 and entry.detail.endswith("…")
