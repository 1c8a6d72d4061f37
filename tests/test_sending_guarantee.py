"""The promise of the sending path: a message's content reaches the server only after the outcome of the
previous message on that connection is marked in the database, so a crash repeats at most one message per
connection. The SMTP server itself checks it, message by message."""
from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

import services
import templates_repo
from devtools.wecom_standin import make_members
from store import db, outbox, schema
from support import DEPARTMENT, base_env, change_xml, signed_post
from support.smtp_server import SmtpSink

MEMBERS = 200


class MarkWitness:
    """on_data hook: for each message, was the previous message of the same connection marked sent already?"""

    def __init__(self, engine):
        self.engine = engine
        self.previous: dict[tuple, str] = {}  # connection (peer) → the address of its last message
        self.seen: list[tuple[str, str | None]] = []  # (previous address, its delivery status then)
        self._lock = threading.Lock()

    def __call__(self, session, envelope) -> None:
        peer = tuple(session.peer)
        before = self.previous.get(peer)
        if before is not None:
            with self.engine.connect() as conn:  # autocommit: sees whatever is committed now
                status = conn.execute(sa.select(schema.deliveries.c.status)
                                      .where(schema.deliveries.c.address == before)).scalar()
            with self._lock:
                self.seen.append((before, status))
        self.previous[peer] = envelope.rcpt_tos[0]


@pytest.mark.parametrize("connections", [1, 4])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_every_message_goes_out_only_after_the_previous_one_on_its_connection_is_marked_sent(
        standin, db_url, tmp_path, monkeypatch, connections, pipelining):
    standin.set_members(DEPARTMENT, make_members(MEMBERS, DEPARTMENT))
    # Marks that take their time: a message sent without waiting for the previous mark would find it unmarked.
    real_write = outbox.DeliveryMarks._execute

    def slow_write(self, statement, parameters):
        time.sleep(0.004)
        real_write(self, statement, parameters)

    monkeypatch.setattr(outbox.DeliveryMarks, "_execute", slow_write)
    import app as app_module

    witness_engine = db.autocommit_engine(db.make_engine(db_url))
    witness = MarkWitness(witness_engine)
    with SmtpSink(pipelining=pipelining, on_data=witness) as sink:
        flask_app = app_module.create_app(base_env(
            WECOM_API_BASE=standin.api_base, DATABASE_URL=db_url, MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1",
            SMTP_PORT=sink.port, SMTP_SECURITY="none", SMTP_CONNECTIONS=connections))
        parts = services.of(flask_app)
        templates_repo.seed_templates(parts.template_engine, parts.settings.template_table, parts.settings.template_app)
        assert signed_post(flask_app.test_client(), parts.crypto, change_xml("create_user", "user0001")).data == \
            b"success"
        worker = parts.make_worker()
        worker.ensure_snapshots()
        while worker.run_once():
            pass
        worker.smtp_pool.close()

        assert len(sink.messages) == MEMBERS
        assert len({m["X-Peer"] for m in sink.messages}) == connections
    assert len(witness.seen) == MEMBERS - connections  # every message but the first of each connection
    unmarked = [(address, status) for address, status in witness.seen if status != "sent"]
    assert unmarked == []
