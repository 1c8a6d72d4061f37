"""Bounces end to end with real mail servers: the service sends through a private Postfix, Postfix refuses an
unknown user at final delivery and writes the real DSN to the envelope sender, virtual(8) delivers it into
the Maildir a private Dovecot serves over IMAP (STARTTLS), and the service's poll finds it.

Each test: the delivery becomes `bounced`, the address is suppressed, the next event does not mail it while
the other members still get theirs (with BOUNCE_ADDRESS's VERP tag, and without: matched by the returned
message's headers). The send-time path (refused at RCPT) ends in the same state; QQ's throttling answer,
relayed back as a DSN, suppresses nobody."""
from __future__ import annotations

import dataclasses
import re

import pytest
import sqlalchemy as sa
import trustme

import app as app_module
import services
import templates_repo
from bounces import intake
from devtools.waiting import wait_until
from devtools.wecom_standin import make_members
from store import suppressions
from store.schema import bounce_reports, deliveries
from support import DEPARTMENT, TEST_CORP_ID, base_env, signed_post
from support.dovecot import Dovecot, skip_without_mail_servers
from support.postfix import Postfix
from support.smtp_server import SmtpSink
import wecom

GOOD = ("user0001@corp.test", "user0002@corp.test")  # mailboxes Postfix delivers to
THROTTLED = "550 Connection frequency limited. http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022&&no=1000722"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def mail(ca):
    """Dovecot serving bounces@bounce.test, Postfix delivering into it; a stand-in remote for qq.test."""
    skip_without_mail_servers(postfix=True)
    with SmtpSink() as qq, Dovecot(ca) as dovecot, \
            Postfix(dovecot, mailboxes=GOOD, relays={"qq.test": qq.port}) as postfix:
        qq.reject("user0004@qq.test", THROTTLED)
        yield dataclasses.make_dataclass("Mail", ["dovecot", "postfix", "qq"])(dovecot, postfix, qq)


def make_service(mail, standin, mysql_url, third_member: str, **env):
    """The service on MariaDB, sending through the Postfix, reading the Dovecot mailbox; department 2 has
    user0001, user0002 (real mailboxes) and user0003 at `third_member`."""
    members = make_members(3, DEPARTMENT, domain="corp.test")  # user0003 is the one that bounces
    members[2]["email"] = third_member
    standin.set_members(DEPARTMENT, members)
    values = base_env(WECOM_API_BASE=standin.api_base, DATABASE_URL=mysql_url, RETRY_BACKOFF_SECONDS="0.05",
                      BOUNCE_POLL_SECONDS="0", **mail.postfix.env(), **mail.dovecot.env(), **env)
    flask_app = app_module.create_app(values)
    parts = services.of(flask_app)
    templates_repo.seed_templates(parts.template_engine, parts.settings.template_table, parts.settings.template_app)
    flask_app.parts = parts
    drain(flask_app)  # the member snapshot
    return flask_app


def drain(service, rounds: int = 200):
    worker = service.parts.make_worker(service.parts.settings)
    worker.ensure_snapshots()
    for _ in range(rounds):
        if not worker.run_once():
            return
    raise AssertionError(f"worker still busy after {rounds} rounds")


def post_change(service, crypto, change_type: str, n: int) -> None:
    xml = wecom.event_xml(change_type, "user0002", TEST_CORP_ID, str(DEPARTMENT), create_time=1700000000 + n)
    assert signed_post(service.test_client(), crypto, xml).data == b"success"
    drain(service)


def poll(service, expected_reports: int, mail) -> intake.PollReport:
    """Wait for Postfix's DSNs to land in the mailbox, then poll it once as the worker would."""
    wait_until(lambda: len(mail.postfix.delivered("bounces@bounce.test")) >= expected_reports, timeout=30,
               what=f"{expected_reports} DSN(s) in the bounce mailbox\n{mail.postfix.log[-3000:]}")
    report = intake.poll(service.parts.settings, service.parts.engine, "test", backlog=True)
    assert report is not None and report.error is None, report and report.error
    return report


def deliveries_to(engine, userid: str = "user0003") -> list:
    """The member's deliveries, one per event (a skipped one has no address)."""
    with engine.connect() as conn:
        return conn.execute(sa.select(deliveries).where(deliveries.c.userid == userid)
                            .order_by(deliveries.c.id)).all()


def attempts_to(postfix, address: str) -> int:
    """How many times the service handed Postfix a message for `address` (its log's queue entries)."""
    return len(re.findall(rf"to=<{re.escape(address)}>", postfix.log))


@pytest.mark.parametrize("verp", [True, False], ids=["verp", "returned-headers"])
def test_a_dsn_from_postfix_bounces_the_delivery_and_suppresses_the_address(mail, standin, mysql_url, crypto,
                                                                             verp):
    env = {"BOUNCE_ADDRESS": "bounces@bounce.test", "MAIL_FROM": "it@bounce.test"} if verp else \
        {"MAIL_FROM": "bounces@bounce.test"}
    service = make_service(mail, standin, mysql_url, "user0003@corp.test", **env)
    engine = service.parts.engine
    post_change(service, crypto, "create_user", 1)
    report = poll(service, 1, mail)
    assert report.kinds == {"hard": 1} and report.reports == 1
    dsn = mail.postfix.delivered("bounces@bounce.test")[0].read_text()
    assert ("bounces+" in dsn.split("\n\n")[0]) is verp  # the DSN went to the VERP-tagged envelope sender
    (bounced,) = deliveries_to(engine)
    assert bounced.status == "bounced" and "5.1.1" in bounced.reason, bounced
    assert "user0003@corp.test" in suppressions.suppressed(engine, ["user0003@corp.test"])
    assert [flags for flags, _ in mail.dovecot.snapshot().values()] == [(r"\Seen",)]

    post_change(service, crypto, "update_user", 2)
    first, second = deliveries_to(engine)
    assert second.status == "skipped" and second.reason.startswith("address suppressed:"), second
    assert attempts_to(mail.postfix, "user0003@corp.test") == 1  # never handed to the relay again
    for address in GOOD:
        wait_until(lambda: len(mail.postfix.delivered(address)) == 2, timeout=30, what=f"2 messages for {address}")
    assert poll(service, 1, mail).seen == 0  # the second event bounced nothing


def test_a_refusal_at_rcpt_ends_as_a_dsn_does(mail, standin, mysql_url, crypto):
    service = make_service(mail, standin, mysql_url, "user0003@refused.test", MAIL_FROM="bounces@bounce.test")
    engine = service.parts.engine
    post_change(service, crypto, "create_user", 1)
    (refused,) = deliveries_to(engine)
    assert refused.status == "bounced" and "5.1.1" in refused.reason, refused
    suppressed = suppressions.suppressed(engine, ["user0003@refused.test"])
    assert suppressed["user0003@refused.test"][2] == "rcpt"
    post_change(service, crypto, "update_user", 2)
    assert deliveries_to(engine)[1].reason.startswith("address suppressed:")
    assert mail.postfix.delivered("bounces@bounce.test") == []  # refused at RCPT: no DSN was written


def test_qq_throttling_relayed_as_a_dsn_suppresses_nobody(mail, standin, mysql_url, crypto):
    service = make_service(mail, standin, mysql_url, "user0004@qq.test", BOUNCE_ADDRESS="bounces@bounce.test",
                           MAIL_FROM="it@bounce.test")
    engine = service.parts.engine
    post_change(service, crypto, "create_user", 1)
    report = poll(service, 1, mail)
    assert report.kinds == {"sender_blocked": 1}, report.kinds
    dsn = mail.postfix.delivered("bounces@bounce.test")[0].read_text()
    assert "Connection frequency limited" in dsn and "Status: 5.0.0" in dsn  # as QQ's answer comes back
    assert suppressions.suppressed(engine, ["user0004@qq.test"]) == {}
    (delivery,) = deliveries_to(engine)
    assert delivery.status == "sent"  # the address is fine: the sender is the problem
    with engine.connect() as conn:
        kinds = conn.execute(sa.select(bounce_reports.c.kind)).scalars().all()
    assert kinds == ["sender_blocked"]
