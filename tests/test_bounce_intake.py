"""Bounce intake over IMAP against a real Dovecot (tests/support/dovecot.py): what is read, what is marked,
what is never touched, where the poll stands across restarts, a dropped connection, a 25 MB message.

The handler here is a stand-in that reads an `X-Test-Kind` header (the real classification is
bounces/handle.py's and has its own tests; tests/test_bounces_end_to_end.py runs both together)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest
import trustme

import config
from bounces import intake
from devtools.latency_proxy import LatencyProxy
from store import leases, mailbox
from store.db import make_engine
from store.migrate import ensure_schema
from support.dovecot import PASSWORD, Dovecot, skip_without_mail_servers
from support.env import base_env

REPORTS = ("hard", "soft", "sender_blocked", "delayed", "unmatched")


@dataclass(frozen=True)
class Outcome:
    kind: str
    is_bounce: bool
    duplicate: bool
    delivery_id: int | None = None
    digest_id: int | None = None
    reason: str = ""


class FakeHandler:
    """process_message's contract: idempotent (a report counts once, by its Message-ID), never raises."""

    def __init__(self):
        self.calls: list[str] = []  # Message-IDs in the order they were handed over
        self.counted: dict[str, str] = {}  # Message-ID → kind, once each
        self.sizes: list[int] = []

    def __call__(self, engine, settings, raw: bytes, *, source: str = "file") -> Outcome:
        assert source == "imap"
        headers = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        fields = dict(line.split(": ", 1) for line in headers.split("\r\n") if ": " in line)
        message_id, kind = fields.get("Message-ID", "?"), fields.get("X-Test-Kind", "ignored")
        self.calls.append(message_id)
        self.sizes.append(len(raw))
        duplicate = message_id in self.counted
        self.counted.setdefault(message_id, kind)
        return Outcome(kind, kind in REPORTS, duplicate)


def message(n: int, kind: str = "hard", body: bytes = b"text\r\n") -> bytes:
    return (f"From: MAILER-DAEMON@relay.test\r\nTo: bounces@bounce.test\r\nSubject: message {n}\r\n"
            f"Message-ID: <m{n}@relay.test>\r\nX-Test-Kind: {kind}\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def imap(ca):
    skip_without_mail_servers()
    with Dovecot(ca) as server:
        yield server


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


def settings_for(imap, url: str | None = None, **env) -> config.Settings:
    values = imap.env(SMTP_TIMEOUT_SECONDS="5", **env)
    if url:
        values["BOUNCE_IMAP_URL"] = url
    return config.from_env(base_env(**values))


def run(settings, engine, handler, owner="test", **kwargs) -> intake.PollReport:
    """One poll, due now whatever ran before (the lease's interval is the test's to skip)."""
    report = intake.poll(settings, engine, owner, handler=handler, backlog=True, **kwargs)
    assert report is not None, "the poll did not get its turn"
    return report


def test_reports_are_marked_seen_and_nothing_else_is_touched(imap, engine, caplog):
    kinds = ["hard", "ignored", "soft", "ignored", "sender_blocked", "ignored", "unmatched", "delayed"]
    for n, kind in enumerate(kinds):
        imap.append(message(n, kind), flags=r"\Flagged" if kind == "ignored" and n == 3 else "")
    before = imap.snapshot()
    handler = FakeHandler()
    with caplog.at_level(logging.INFO, logger="wecom_mailer.bounces"):
        report = run(settings_for(imap), engine, handler)
    assert report.error is None and report.seen == len(kinds) and report.reports == 5 and report.left_alone == 3
    after = imap.snapshot()
    assert set(after) == set(before), "a message disappeared"
    for uid, (flags, size) in before.items():
        kind = kinds[uid - 1]
        if kind == "ignored":
            assert after[uid] == (flags, size), f"message {uid} ({kind}) was altered"
        else:
            assert after[uid] == (tuple(sorted((*flags, r"\Seen"))), size)
    assert mailbox.position(engine, settings_for(imap).bounce_imap.key).last_uid == len(kinds)
    line = [r.getMessage() for r in caplog.records if "new message(s)" in r.getMessage()]
    assert len(line) == 1 and "8 new message(s)" in line[0] and "5 report(s)" in line[0], line
    assert PASSWORD not in caplog.text

    again = run(settings_for(imap), engine, handler)
    assert again.seen == 0 and len(handler.calls) == len(kinds), "a message was read twice"
    imap.append(message(99, "hard"))
    assert run(settings_for(imap), engine, handler).seen == 1 and handler.calls[-1] == "<m99@relay.test>"


def test_reports_move_to_the_done_folder_others_stay(imap, engine):
    for n, kind in enumerate(["hard", "ignored", "soft", "ignored"]):
        imap.append(message(n, kind))
    before = imap.snapshot()
    settings = settings_for(imap, BOUNCE_IMAP_DONE_FOLDER="退信/已处理")  # created on first use, in UTF-7
    report = run(settings, engine, FakeHandler())
    assert report.error is None and report.moved == 2
    assert imap.snapshot() == {2: before[2], 4: before[4]}
    assert [flags for flags, _ in imap.snapshot("退信/已处理").values()] == [(r"\Seen",), (r"\Seen",)]


def test_implicit_tls_works_and_a_wrong_password_is_named_without_it(imap, engine, ca):
    imap.append(message(1))
    url = imap.url(implicit_tls=True)
    assert run(settings_for(imap, url), engine, FakeHandler()).seen == 1
    wrong = config.from_env(base_env(**{**imap.env(), "BOUNCE_IMAP_PASSWORD": "Wrong-Secret-1234"}))
    report = run(wrong, engine, FakeHandler())
    assert "refused the login" in report.error and "Wrong-Secret-1234" not in report.error
    untrusted = config.from_env(base_env(**{**imap.env(), "SMTP_CA_FILE": ""}))
    report = run(untrusted, engine, FakeHandler())
    assert "certificate was refused" in report.error and "SMTP_CA_FILE" in report.error


def test_a_restart_mid_folder_reads_each_message_once(imap, engine, monkeypatch):
    for n in range(10):
        imap.append(message(n, "soft" if n % 2 else "ignored"))
    monkeypatch.setattr(intake, "BATCH_MESSAGES", 3)
    handler = FakeHandler()

    class Killed(BaseException):
        """The process dies in the middle of a batch (after handling message 5 of 10)."""

    def dying(engine_, settings_, raw, *, source="file"):
        outcome = handler(engine_, settings_, raw, source=source)
        if len(handler.calls) == 5:
            raise Killed
        return outcome
    with pytest.raises(Killed):
        intake.poll(settings_for(imap), engine, "first", handler=dying)
    assert mailbox.position(engine, settings_for(imap).bounce_imap.key).last_uid == 3  # the first batch
    # The next process takes over once the dead one's lease has run out.
    report = intake.poll(settings_for(imap), engine, "second", handler=handler, now=time.time() + 3600)
    assert report is not None and report.error is None and report.last_uid == 10
    assert handler.calls.count("<m4@relay.test>") == 2  # its batch was in hand: read again, counted once
    assert all(handler.calls.count(f"<m{n}@relay.test>") == 1 for n in (0, 1, 2, 6, 7, 8, 9))
    assert sorted(handler.counted) == sorted(f"<m{n}@relay.test>" for n in range(10))
    assert [flags for flags, _ in imap.snapshot().values()] == [() if n % 2 == 0 else (r"\Seen",)
                                                                for n in range(10)]


def test_a_connection_dropped_mid_fetch_stops_the_poll_and_the_next_one_resumes(imap, engine, monkeypatch):
    body = b"x" * 60_000 + b"\r\n"
    for n in range(12):
        imap.append(message(n, "hard" if n % 3 == 0 else "ignored", body))
    monkeypatch.setattr(intake, "BATCH_MESSAGES", 4)
    handler = FakeHandler()
    with LatencyProxy(("127.0.0.1", imap.port)) as proxy:
        settings = settings_for(imap, f"imap://bounces@bounce.test@127.0.0.1:{proxy.port}/INBOX")
        proxy.cut_after(400_000)  # in the second batch's bodies (each batch is ~240 KB)
        report = run(settings, engine, handler)
        assert proxy.cuts == 1 and report.error and "broke" in report.error, report.error
        assert report.last_uid == 4 and len(handler.calls) == 4  # the first batch, processed and flagged
        report = run(settings, engine, handler)
    assert report.error is None and report.last_uid == 12
    assert sorted(handler.calls) == sorted(f"<m{n}@relay.test>" for n in range(12)), "a message was skipped"
    assert [flags for flags, _ in imap.snapshot().values()] == [(r"\Seen",) if n % 3 == 0 else ()
                                                                for n in range(12)]


def test_a_25_mb_message_is_read_only_in_part_and_never_lost(imap, engine, caplog):
    big = b"A" * 76 + b"\r\n"
    imap.append(message(1, "ignored", big * (25 * 1024 * 1024 // len(big))))
    imap.append(message(2, "hard", big * (3 * 1024 * 1024 // len(big))))  # a bounce returning a big message
    imap.append(message(3, "hard"))
    before = imap.snapshot()
    handler = FakeHandler()
    with caplog.at_level(logging.WARNING, logger="wecom_mailer.bounces"):
        report = run(settings_for(imap), engine, handler)
    assert report.error is None and report.large == 2 and report.seen == 3
    assert max(handler.sizes) <= intake.MAX_MESSAGE_BYTES
    after = imap.snapshot()
    assert after[1] == before[1] and after[2][0] == (r"\Seen",) and after[3][0] == (r"\Seen",)
    assert "UID 1 is" in caplog.text and "only its first" in caplog.text


def test_a_new_uidvalidity_reads_the_folder_again(imap, engine, caplog):
    for n in range(3):
        imap.append(message(n, "hard"))
    handler, settings = FakeHandler(), settings_for(imap)
    run(settings, engine, handler)
    key = settings.bounce_imap.key
    saved = mailbox.position(engine, key)
    mailbox.save_position(engine, key, saved.uidvalidity - 1, saved.last_uid, time.time())
    with caplog.at_level(logging.WARNING, logger="wecom_mailer.bounces"):
        report = run(settings, engine, handler)
    assert report.seen == 3 and report.duplicates == 3 and "UIDVALIDITY changed" in caplog.text
    assert mailbox.position(engine, key).uidvalidity == saved.uidvalidity


def test_one_process_at_a_time(imap, engine):
    imap.append(message(1))
    settings = settings_for(imap)
    assert leases.take_turn(engine, intake.LEASE, "other", 0, 60, time.time()).round is not None
    assert intake.poll(settings, engine, "me", handler=FakeHandler(), backlog=True) is None
    assert imap.snapshot()[1][0] == ()


POSTFIX_DSN = (b"From: Mail Delivery System <MAILER-DAEMON@mx.corp.example>\r\nTo: it@corp.example\r\n"
               b"Subject: Undelivered Mail Returned to Sender\r\nMessage-Id: <dsn-worker@mx.corp.example>\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n"
               b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\n<gone@corp.example>: unknown user\r\n"
               b"\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.corp.example\r\n\r\n"
               b"Final-Recipient: rfc822; gone@corp.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
               b"Diagnostic-Code: X-Postfix; unknown user: \"gone@corp.example\"\r\n"
               b"\r\n--b1\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: it@corp.example\r\n"
               b"Message-ID: <not-ours@corp.example>\r\n\r\n--b1--\r\n")


def test_the_delivery_worker_polls_the_mailbox_by_itself(imap, standin, tmp_path):
    import app as app_module
    import services
    from devtools.waiting import wait_until

    imap.append(b"From: colleague@corp.example\r\nTo: it@corp.example\r\nSubject: lunch\r\n"
                b"Message-ID: <lunch@corp.example>\r\n\r\nNoodles at noon?\r\n")
    imap.append(POSTFIX_DSN)  # a real-format report that names none of our deliveries: unmatched, still a report
    env = base_env(**imap.env(BOUNCE_POLL_SECONDS="0.2"), WECOM_API_BASE=standin.api_base,
                   DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", MAIL_FILE_DIR=str(tmp_path / "out"))
    parts = services.of(app_module.create_app(env))
    worker = parts.make_worker(parts.settings)
    worker.start()
    try:
        wait_until(lambda: imap.snapshot()[2][0] == (r"\Seen",), timeout=30, what="the worker's poll to mark the DSN")
    finally:
        worker.shutdown()
    assert imap.snapshot()[1][0] == ()
    assert mailbox.position(parts.engine, parts.settings.bounce_imap.key).last_uid == 2


def test_a_server_without_starttls_never_sees_the_password(engine, tmp_path):
    """imap:// must upgrade to TLS before logging in: a server that does not offer STARTTLS is refused."""
    import socket
    import threading

    received = []
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LOGIN] plain only\r\n")
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    received.append(data)
                    tag = data.split(b" ", 1)[0]
                    conn.sendall(tag + b" OK done\r\n")
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    settings = config.from_env(base_env(BOUNCE_IMAP_URL=f"imap://bounces@127.0.0.1:{port}/INBOX",
                                        BOUNCE_IMAP_PASSWORD="Never-On-The-Wire-42", SMTP_TIMEOUT_SECONDS="5"))
    report = run(settings, engine, FakeHandler())
    thread.join(10)
    listener.close()
    assert "does not offer STARTTLS" in report.error and "imaps://" in report.error
    assert b"Never-On-The-Wire-42" not in b"".join(received)


def test_check_says_where_the_poll_stands_and_changes_nothing(imap, engine):
    from bounces.mailbox_check import mailbox_line

    imap.append(message(1, "hard"))
    imap.append(message(2, "ignored"))
    settings = settings_for(imap, BOUNCE_IMAP_DONE_FOLDER="Done")
    ok, line = mailbox_line(settings, engine)
    assert ok and "2 message(s)" in line and "not read yet" in line and "moved to Done" in line, line
    assert [flags for flags, _ in imap.snapshot().values()] == [(), ()]  # EXAMINE: nothing changed
    run(settings, engine, FakeHandler())
    ok, line = mailbox_line(settings, engine)
    assert ok and "read up to UID 2 of 2" in line and "last poll" in line and "ok: 2 message(s)" in line, line
    wrong = config.from_env(base_env(**{**imap.env(), "BOUNCE_IMAP_PASSWORD": "Wrong-Secret-1234"}))
    ok, line = mailbox_line(wrong, engine)
    assert not ok and "refused the login" in line and "Wrong-Secret-1234" not in line


def test_a_server_that_never_answers_times_out(engine):
    """Every socket operation is bounded by SMTP_TIMEOUT_SECONDS: a silent server ends the poll, named."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never speaks
        port = silent.getsockname()[1]
        settings = config.from_env(base_env(BOUNCE_IMAP_URL=f"imaps://bounces@127.0.0.1:{port}/INBOX",
                                            BOUNCE_IMAP_PASSWORD="pw", SMTP_TIMEOUT_SECONDS="1"))
        report = run(settings, engine, FakeHandler())
        assert "cannot reach the IMAP server" in report.error and "timed out" in report.error, report.error
