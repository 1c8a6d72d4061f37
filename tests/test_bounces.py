"""Bounces end to end in the service (docs/bounces.md): the mail that went out names its delivery; a report
about it bounces that delivery and suppresses that address only; a suppressed address is not mailed again
(the next source is tried, else `address suppressed: …`); forged, foreign and replayed reports change nothing."""
from __future__ import annotations

import logging
import time

import pytest
import sqlalchemy as sa

from bounces import handle
from store import schema, suppressions
from support import rows
from support.bounces import load

VICTIM = "user0003@corp.example"
UNKNOWN_REASON = "5.1.1 <user0003@corp.example>: Recipient address rejected: User unknown in local recipient table"


def sent_to(sink, address):
    """The last message the SMTP server accepted for `address`."""
    return [m for m in sink.messages if m["X-RcptTo"] == address][-1]


def delivery(engine, address):
    return rows(engine, schema.deliveries, schema.deliveries.c.address == address)[-1]


def report(sink, name, rcpt=VICTIM, report_id=None, *, verp=True, headers=True):
    """A corpus report about the message `rcpt` received: its VERP tag (from the envelope sender) and ENVID,
    and its Message-ID in the returned headers, as asked."""
    message = sent_to(sink, rcpt)
    mail_from = message["X-MailFrom"]
    tag = mail_from.partition("+")[2].partition("@")[0] if verp and "+" in mail_from else ""
    msgid = message["Message-ID"] if headers else "<CAF0000@mail.example.com>"
    return load(name, rcpt=rcpt, tag=tag, msgid=msgid, report_id=f"{report_id or name}.{time.monotonic_ns()}")


def process(service, raw, **kwargs):
    return handle.process_message(service.engine, service.parts.settings, raw, **kwargs)


def suppressed(engine):
    return {r.address: r for r in rows(engine, schema.suppressions)}


def test_every_message_says_it_is_automatic_and_names_its_delivery(department, poster, smtp_sink):
    poster("zhangsan")
    department.drain()
    message = sent_to(smtp_sink, VICTIM)
    assert message["Auto-Submitted"] == "auto-generated"
    row = delivery(department.engine, VICTIM)
    assert message["Message-ID"].startswith(f"<wm-d{row.id}-") and message["X-MailFrom"] == "it@corp.example"


@pytest.mark.parametrize("verp, headers", [(True, False), (False, True)], ids=["VERP only", "returned headers only"])
def test_a_hard_bounce_bounces_the_delivery_suppresses_the_address_and_the_next_event_skips_it(
        department, poster, smtp_sink, verp, headers):
    worker = department.make_worker(bounce_address="bounces@corp.example") if verp else None
    poster("zhangsan")
    department.drain(worker)
    if verp:
        assert sent_to(smtp_sink, VICTIM)["X-MailFrom"].startswith("bounces+d")
    outcome = process(department, report(smtp_sink, "postfix-user-unknown.eml", verp=verp, headers=headers))
    row = delivery(department.engine, VICTIM)
    assert (outcome.kind, outcome.delivery_id, outcome.suppressed) == ("hard", row.id, True)
    assert (row.status, row.reason) == ("bounced", UNKNOWN_REASON)
    assert suppressed(department.engine)[VICTIM].source == "bounce"
    others = {d.address: d.status for d in rows(department.engine, schema.deliveries) if d.address != VICTIM}
    assert set(others.values()) == {"sent"} and len(others) == 9

    before = len(smtp_sink.messages)
    poster("lisi", n=1)
    department.drain(worker)
    mailed = [m["X-RcptTo"] for m in smtp_sink.messages[before:]]
    assert VICTIM not in mailed and len(mailed) == 9
    skipped = [d for d in rows(department.engine, schema.deliveries) if d.event_id == 2 and d.status == "skipped"]
    assert [d.userid for d in skipped] == ["user0003"]
    assert skipped[0].reason.startswith("address suppressed: 5.1.1 <user0003@corp.example>")


def test_a_replayed_report_counts_once(department, poster, smtp_sink):
    poster("zhangsan")
    department.drain()
    raw = report(smtp_sink, "postfix-mailbox-full.eml")
    first, second = process(department, raw), process(department, raw)
    assert (first.kind, first.duplicate, second.kind, second.duplicate) == ("soft", False, "soft", True)
    assert len(rows(department.engine, schema.soft_bounces)) == 1
    assert len(rows(department.engine, schema.bounce_reports)) == 1


def test_soft_bounces_suppress_at_the_limit_counting_one_per_day(department, poster, smtp_sink):
    poster("zhangsan")
    department.drain()
    day = 86400.0
    noon = 1796097600.0  # 2026-12-01 12:00 in Asia/Shanghai (TIMEZONE): an hour later is the same day
    for n, at in enumerate((noon, noon + 3600, noon + day)):
        outcome = process(department, report(smtp_sink, "postfix-mailbox-full.eml", report_id=f"r{n}"), now=at)
        assert not outcome.suppressed, (n, outcome)  # the second the same day is not counted
    outcome = process(department, report(smtp_sink, "postfix-mailbox-full.eml", report_id="r9"), now=noon + 2 * day)
    assert outcome.suppressed and outcome.reason.startswith("3 soft bounces within 7 days, the last: 4.2.2")
    assert VICTIM in suppressed(department.engine)
    assert delivery(department.engine, VICTIM).status == "sent"  # soft: the delivery itself arrived nowhere yet


@pytest.mark.parametrize("name", ["postfix-qq-throttled.eml", "postfix-spf.eml", "postfix-delayed.eml"])
def test_sender_blocked_and_delayed_reports_touch_no_address(department, poster, smtp_sink, name):
    poster("zhangsan")
    department.drain()
    outcome = process(department, report(smtp_sink, name))
    assert outcome.kind in ("sender_blocked", "delayed") and outcome.delivery_id is not None
    assert suppressed(department.engine) == {} and rows(department.engine, schema.soft_bounces) == []
    assert delivery(department.engine, VICTIM).status == "sent"


def test_a_forged_message_id_matches_nothing_changes_nothing_and_warns_once(department, poster, smtp_sink, caplog):
    poster("zhangsan")
    department.drain()
    real = sent_to(smtp_sink, VICTIM)["Message-ID"]
    forged = real[:-len("@corp.example>") - 3] + ("aaa" if not real.endswith("aaa@corp.example>") else "bbb") \
        + "@corp.example>"
    raw = load("postfix-user-unknown.eml", rcpt=VICTIM, msgid=forged)
    with caplog.at_level(logging.INFO, logger="wecom_mailer.bounces"):
        outcome = process(department, raw)
    assert (outcome.kind, outcome.delivery_id) == ("unmatched", None) and "wrong MAC" in outcome.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "wecom_mailer.bounces"]
    assert len(warnings) == 1 and "wrong MAC" in warnings[0].getMessage()
    assert suppressed(department.engine) == {} and delivery(department.engine, VICTIM).status == "sent"
    stored = rows(department.engine, schema.bounce_reports)
    assert [r.kind for r in stored] == ["unmatched"] and stored[0].raw  # kept for the admin


def test_a_report_about_an_address_we_never_mailed_changes_nothing(department, poster, smtp_sink):
    poster("zhangsan")
    department.drain()
    raw = report(smtp_sink, "postfix-user-unknown.eml").replace(VICTIM.encode(), b"stranger@corp.example")
    outcome = process(department, raw)
    assert outcome.kind == "unmatched" and "stranger@corp.example" in outcome.reason
    assert suppressed(department.engine) == {}
    assert {d.status for d in rows(department.engine, schema.deliveries)} == {"sent"}


def test_a_report_naming_another_members_delivery_affects_only_that_deliverys_address(
        department, poster, smtp_sink):
    """A 退信 quoting user0005's Message-ID while its text talks of user0003: the tag decides, and only
    user0005's delivery and address change; a DSN whose Final-Recipient disagrees with the tag changes nothing."""
    poster("zhangsan")
    department.drain()
    other = "user0005@corp.example"
    raw = load("qq-tuixin.eml", rcpt=VICTIM, msgid=sent_to(smtp_sink, other)["Message-ID"])
    outcome = process(department, raw)
    assert (outcome.kind, outcome.address) == ("hard", other)
    assert set(suppressed(department.engine)) == {other}
    assert delivery(department.engine, VICTIM).status == "sent"
    seventh = sent_to(smtp_sink, "user0007@corp.example")["Message-ID"].encode()
    mixed = report(smtp_sink, "postfix-user-unknown.eml", rcpt=VICTIM).replace(
        sent_to(smtp_sink, VICTIM)["Message-ID"].encode(), seventh)
    assert process(department, mixed).kind == "unmatched"
    assert set(suppressed(department.engine)) == {other}


def test_not_bounces_are_ignored_and_not_stored(department, poster, smtp_sink):
    poster("zhangsan")
    department.drain()
    msgid = sent_to(smtp_sink, VICTIM)["Message-ID"]
    for name in ("auto-reply-zh.eml", "ordinary.eml", "flufl-qmail_08.eml"):
        outcome = process(department, load(name, msgid=msgid))
        assert (outcome.kind, outcome.is_bounce) == ("ignored", False), name
    assert rows(department.engine, schema.bounce_reports) == [] and suppressed(department.engine) == {}


def test_a_25_mb_message_and_a_broken_mime_tree_are_bounded(department):
    huge = (b"From: MAILER-DAEMON@corp.example\r\nSubject: Undelivered Mail\r\nContent-Type: text/plain\r\n\r\n"
            + b"550 5.1.1 user unknown " * (25 * 1024 * 1024 // 23))
    started = time.monotonic()
    outcome = process(department, huge)
    assert outcome.kind == "unmatched" and time.monotonic() - started < 20
    broken = b"Content-Type: multipart/report; boundary=\"x\r\nFrom: postmaster@\r\n\r\n--x\r\n\xff\x00--"
    assert process(department, broken).kind in ("ignored", "unmatched")
    assert suppressed(department.engine) == {}


def test_a_digest_bounce_applies_to_every_change_it_carried(department):
    engine, now = department.engine, time.time()
    with engine.begin() as conn:
        digest_id = conn.execute(schema.digests.insert().values(
            address=VICTIM, status="sent", due_at=now, attempts=1, created_at=now, changes=2)).inserted_primary_key[0]
        conn.execute(schema.deliveries.insert(), [
            {"event_id": n, "userid": "user0003", "address": VICTIM, "status": "sent", "digest_id": digest_id,
             "attempts": 1, "next_attempt_at": 0} for n in (101, 102)])
    from bounces import tags
    tag = tags.make(tags.service_key(engine, department.parts.settings), "g", digest_id)
    outcome = process(department, load("postfix-user-unknown.eml", rcpt=VICTIM, tag=tag,
                                       msgid=f"<wm-{tag}@corp.example>"))
    assert (outcome.kind, outcome.digest_id) == ("hard", digest_id)
    assert [d.status for d in rows(engine, schema.deliveries, schema.deliveries.c.digest_id == digest_id)] == \
        ["bounced", "bounced"]


def test_a_bounced_guess_falls_through_to_the_address_book_and_is_never_guessed_again(
        service, standin, poster_for_guesses, smtp_sink):
    engine, post = service.engine, poster_for_guesses
    post("zhangsan")
    guess = sent_to(smtp_sink, VICTIM)
    assert delivery(engine, VICTIM).address_source == "pattern"
    outcome = process(service, load("postfix-user-unknown.eml", rcpt=VICTIM, msgid=guess["Message-ID"]))
    assert outcome.kind == "hard"
    assert [(g.userid, g.address) for g in rows(engine, schema.bad_guesses)] == [("user0003", VICTIM)]
    post("lisi", n=1)
    assert sent_to(smtp_sink, "user0003@book.example")  # the address book, the next source
    assert suppressions.remove(engine, VICTIM)  # an admin lifts the suppression: still not guessed again
    with engine.begin() as conn:
        conn.execute(schema.address_book.delete())
    post("wangwu", n=2)
    last = [d for d in rows(engine, schema.deliveries) if d.event_id == 3 and d.userid == "user0003"]
    assert last[0].status == "skipped" and last[0].reason.startswith("address suppressed: the EMAIL_PATTERN guess")


@pytest.fixture
def poster_for_guesses(service, standin, crypto):
    """Members without WeCom addresses, EMAIL_SOURCES=wecom,pattern,directory; user0003 in the address book."""
    from devtools.wecom_standin import make_members
    from support import CREATED_AT, DEPARTMENT, change_xml, signed_post

    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT, email=False))
    with service.engine.begin() as conn:
        conn.execute(schema.address_book.insert().values(userid="user0003", email="user0003@book.example",
                                                         updated_at=time.time()))
    worker = service.make_worker(email_sources=("wecom", "pattern", "directory"), email_pattern="{userid}@corp.example")
    service.drain(worker)
    client = service.test_client()

    def post(userid, n=0):
        xml = change_xml("create_user", userid, create_time=CREATED_AT + n)
        assert signed_post(client, crypto, xml).data == b"success"
        service.drain(worker)
    return post


def test_a_refusal_at_rcpt_ends_like_a_dsn_and_throttling_suppresses_nobody(department, poster, smtp_sink):
    smtp_sink.reject(VICTIM, "550 5.1.1 <user0003@corp.example>: Recipient address rejected: User unknown")
    smtp_sink.reject("user0004@corp.example", "550 Connection frequency limited")
    poster("zhangsan")
    department.drain()
    row = delivery(department.engine, VICTIM)
    assert (row.status, row.reason) == ("bounced", "5.1.1 <user0003@corp.example>: Recipient address rejected: "
                                                   "User unknown")
    assert {a: s.source for a, s in suppressed(department.engine).items()} == {VICTIM: "rcpt"}
    assert delivery(department.engine, "user0004@corp.example").status == "retry"  # throttled: waits, not suppressed


def test_a_suppressed_address_falls_through_to_the_next_source_else_the_member_is_skipped(sqlite_url):
    import config
    from store import addressbook, db, migrate
    from support import base_env
    from wecom_api import Member

    engine = db.make_engine(sqlite_url)
    migrate.upgrade(engine)
    settings = config.from_env(base_env(EMAIL_PATTERN="{userid}@corp.example"))
    with engine.begin() as conn:
        conn.execute(schema.address_book.insert().values(userid="zs", email="zs@book.example", updated_at=0))
        suppressions.suppress(conn, "ZS@wecom.example", "5.1.1 user unknown", "bounce", 1796097600.0)
    member = Member("zs", email="zs@wecom.example")
    [choice] = addressbook.choose(settings, engine, [member])
    assert (choice.address, choice.source) == ("zs@book.example", "directory")
    with engine.begin() as conn:
        suppressions.suppress(conn, "zs@book.example", "5.1.1 user unknown", "rcpt", 1796097600.0)
        suppressions.suppress(conn, "zs@corp.example", "3 soft bounces within 7 days", "bounce", 1796097600.0)
    [choice] = addressbook.choose(settings, engine, [member])
    assert choice.address is None
    assert choice.reason == "address suppressed: 5.1.1 user unknown (bounce, since 2026-12-01 12:00)"
