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
import time

import pytest
import sqlalchemy as sa
import trustme

import app as app_module
import services
import templates_repo
from bounces import handle, intake
from devtools.latency_proxy import LatencyProxy
from devtools.waiting import wait_until
from devtools.wecom_standin import make_members
from store import suppressions
from store.schema import bounce_reports, deliveries, soft_bounces
from support import DEPARTMENT, ROOT, TEST_CORP_ID, base_env, signed_post
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


@pytest.fixture
def make_service(standin, mysql_url):
    """make_service(mail, third_member, **env): the service (below); its engines are closed after the test."""
    made = []

    def make(mail, third_member: str, **env):
        made.append(build_service(mail, standin, mysql_url, third_member, **env))
        return made[-1]
    yield make
    for service in made:
        service.parts.engine.dispose()
        service.parts.template_engine.dispose()


def build_service(mail, standin, mysql_url, third_member: str, **env):
    """The service on MariaDB, sending through the Postfix, reading the Dovecot mailbox; department 2 has
    user0001, user0002 (real mailboxes) and user0003 at `third_member`."""
    members = make_members(3, DEPARTMENT, domain="corp.test")  # user0003 is the one that bounces
    members[2]["email"] = third_member
    standin.set_members(DEPARTMENT, members)
    values = base_env(**{"WECOM_API_BASE": standin.api_base, "DATABASE_URL": mysql_url,
                         "RETRY_BACKOFF_SECONDS": "0.05", "BOUNCE_POLL_SECONDS": "0", **mail.postfix.env(),
                         **mail.dovecot.env(), **env})
    flask_app = app_module.create_app(values)
    parts = services.of(flask_app)
    templates_repo.seed_templates(parts.template_engine, parts.settings.template_table, parts.settings.template_app)
    flask_app.parts = parts
    drain(flask_app)  # the member snapshot
    return flask_app


def drain(service, rounds: int = 200):
    worker = service.parts.make_worker(service.parts.settings)
    worker.ensure_snapshots()
    try:
        for _ in range(rounds):
            if not worker.run_once():
                return
        raise AssertionError(f"worker still busy after {rounds} rounds")
    finally:
        if worker.smtp_pool is not None:
            worker.smtp_pool.close()


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
def test_a_dsn_from_postfix_bounces_the_delivery_and_suppresses_the_address(mail, make_service, crypto, verp):
    env = {"BOUNCE_ADDRESS": "bounces@bounce.test", "MAIL_FROM": "it@bounce.test"} if verp else \
        {"MAIL_FROM": "bounces@bounce.test"}
    service = make_service(mail, "user0003@corp.test", **env)
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


def test_a_refusal_at_rcpt_ends_as_a_dsn_does(mail, make_service, crypto):
    service = make_service(mail, "user0003@refused.test", MAIL_FROM="bounces@bounce.test")
    engine = service.parts.engine
    post_change(service, crypto, "create_user", 1)
    (refused,) = deliveries_to(engine)
    assert refused.status == "bounced" and "5.1.1" in refused.reason, refused
    suppressed = suppressions.suppressed(engine, ["user0003@refused.test"])
    assert suppressed["user0003@refused.test"][2] == "rcpt"
    post_change(service, crypto, "update_user", 2)
    assert deliveries_to(engine)[1].reason.startswith("address suppressed:")
    assert mail.postfix.delivered("bounces@bounce.test") == []  # refused at RCPT: no DSN was written


def test_qq_throttling_relayed_as_a_dsn_suppresses_nobody(mail, make_service, crypto):
    service = make_service(mail, "user0004@qq.test", BOUNCE_ADDRESS="bounces@bounce.test",
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
    from ops.bounce_checks import bounce_lines

    warnings = [line for ok, line in bounce_lines(engine, service.parts.settings) if not ok]
    assert any(line.startswith("sender blocked: 1 report(s)") and "frequency limited" in line for line in warnings), \
        warnings  # what `check` prints (and /admin's banner shows)


CORPUS = ROOT / "tests" / "data" / "bounces"


def test_a_full_mailbox_bounce_survives_a_dropped_link_and_a_restart_counted_once(ca, make_service, crypto,
                                                                                     monkeypatch):
    """Postfix gives up on `452 4.2.2 Mailbox full` at once (maximal_queue_lifetime = 0) and returns the real
    soft DSN into a mailbox that already holds ordinary mail and auto-replies. The first poll loses its link
    mid-fetch, the second dies before flagging the DSN; the third finishes. The soft bounce counts once; the
    other mail is exactly as it was."""
    skip_without_mail_servers(postfix=True)
    monkeypatch.setattr(intake, "BATCH_MESSAGES", 2)
    with SmtpSink() as remote, Dovecot(ca) as dovecot, \
            Postfix(dovecot, mailboxes=GOOD, relays={"qq.test": remote.port}, maximal_queue_lifetime="0") as postfix, \
            LatencyProxy(("127.0.0.1", dovecot.port)) as proxy:
        remote.reject("full@qq.test", "452 4.2.2 Mailbox full")
        mail = dataclasses.make_dataclass("Mail", ["dovecot", "postfix", "qq"])(dovecot, postfix, remote)
        others = [CORPUS / "ordinary.eml", CORPUS / "auto-reply-zh.eml"] * 3
        for path in others:
            raw = path.read_bytes()
            dovecot.append(raw.replace(b"\n\n", b"\n\n" + b"padding line\n" * 3000, 1))  # ~40 KB each
        dovecot.append(others[0].read_bytes(), flags=r"\Flagged")
        before = dovecot.snapshot()
        service = make_service(mail, "full@qq.test", BOUNCE_ADDRESS="bounces@bounce.test",
                               MAIL_FROM="it@bounce.test",
                               BOUNCE_IMAP_URL=f"imap://bounces@bounce.test@127.0.0.1:{proxy.port}/INBOX")
        engine, settings = service.parts.engine, service.parts.settings
        post_change(service, crypto, "create_user", 1)
        wait_until(lambda: len(postfix.delivered("bounces@bounce.test")) == len(before) + 1, timeout=30,
                   what=f"the soft DSN\n{postfix.log[-3000:]}")

        proxy.cut_after(120_000)  # in the second batch's bodies (each batch is ~80 KB)
        first = intake.poll(settings, engine, "first", backlog=True)
        assert proxy.cuts == 1 and first.error and "broke" in first.error and 0 < first.last_uid < 8, first

        class Killed(BaseException):
            pass

        def dies_after_the_dsn(engine_, settings_, raw, *, source="file"):
            outcome = handle.process_message(engine_, settings_, raw, source=source)
            if outcome.is_bounce:
                raise Killed  # processed and stored, not yet flagged, position not moved past it
            return outcome
        with pytest.raises(Killed):
            intake.poll(settings, engine, "second", handler=dies_after_the_dsn, backlog=True,
                        now=time.time() + 3600)  # the first one's lease has run out
        third = intake.poll(settings, engine, "third", backlog=True, now=time.time() + 7200)
        assert third.error is None and third.duplicates == 1 and third.kinds["soft"] == 1, third  # read again, known
        after = dovecot.snapshot()

    with engine.connect() as conn:
        assert conn.execute(sa.select(bounce_reports.c.kind)).scalars().all() == ["soft"]
        assert conn.execute(sa.select(soft_bounces.c.address)).scalars().all() == ["full@qq.test"]
    assert suppressions.suppressed(engine, ["full@qq.test"]) == {}  # one soft bounce is below BOUNCE_SOFT_LIMIT
    dsn_uid = max(after)
    assert {uid: after[uid] for uid in before} == before, "ordinary mail or an auto-reply was altered"
    assert after[dsn_uid][0] == (r"\Seen",)
