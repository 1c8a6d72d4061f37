"""WeCom application messages beside email (issue 21): who gets which channel, calls of up to 1,000 members,
invaliduser / unlicenseduser, errors, the limits, the digest per person per channel."""
from __future__ import annotations

import collections

import pytest
import sqlalchemy as sa

from channels import fallback, wecom_message
from delivery import expand as expand_module
from devtools.wecom_standin import make_members
from store import schema
from support.admin import post_login
from support import DEPARTMENT, rows
from support.digests import T0, Clock
from support.messages import post, received


def by_channel(engine) -> dict[str, collections.Counter]:
    """channel → Counter of (userid, status) over every delivery."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for d in rows(engine, schema.deliveries):
        out[d.channel][(d.userid, d.status)] += 1
    return out


def test_fallback_reaches_each_member_once_by_email_or_wecom(messaging, standin, smtp_sink, crypto, monkeypatch):
    """10 members: 3 without any address, 1 whose address is suppressed: 6 emails and 4 WeCom messages."""
    members = make_members(10, DEPARTMENT)
    for member in members[:3]:
        member["email"] = ""
    standin.set_members(DEPARTMENT, members)
    service = messaging("fallback")
    service.drain()

    # A suppressed address as the bounce feature writes it at expansion: skipped, `address suppressed: …`.
    real = expand_module.outbox.expand_event

    def suppressing(engine, event_id, owner, subject, body, rows_, **kw):
        for row in rows_:
            if row["userid"] == "user0004":
                row.update(status="skipped", address=None,
                           reason="address suppressed: 5.1.1 user unknown since 2024-03-05 10:00")
        return real(engine, event_id, owner, subject, body, rows_, **kw)
    monkeypatch.setattr(expand_module.outbox, "expand_event", suppressing)

    post(service, crypto, "user0003")
    service.drain()

    mailed = sorted(m["X-RcptTo"] for m in smtp_sink.messages)
    assert mailed == [f"user{i:04d}@corp.example" for i in range(5, 11)]
    assert received(standin) == {f"user{i:04d}": 1 for i in range(1, 5)}
    [call] = standin.message_calls
    assert call["request"]["enable_duplicate_check"] == 1 and call["request"]["safe"] == 0
    assert call["content"].startswith("新增成员\n\n新增时间：") and call["content"].endswith("新增成员 ID：user0003")
    channels = by_channel(service.engine)
    assert channels["wecom"] == {(f"user{i:04d}", "sent"): 1 for i in range(1, 5)}
    assert sum(channels["email"].values()) == 10
    [event] = rows(service.engine, schema.events)
    assert event.status == "done"

    # A bounce hours later turns a sent email into `bounced`: that member, too, is then told in WeCom, once.
    with service.engine.begin() as conn:
        conn.execute(schema.deliveries.update().where(schema.deliveries.c.userid == "user0007",
                                                      schema.deliveries.c.channel == "email")
                     .values(status="bounced", reason="5.1.1 user unknown"))
    worker = service.make_worker()
    assert fallback.sweep(worker, force=True) == 1 and fallback.sweep(worker, force=True) == 0
    service.drain(worker)
    assert received(standin)["user0007"] == 1 and len(standin.message_calls) == 2
    assert len(smtp_sink.messages) == 6
    [event] = rows(service.engine, schema.events)
    assert event.status == "done"


def test_only_sends_2500_members_in_three_calls_and_fails_exactly_the_invalid_ones(
        messaging, standin, smtp_sink, crypto):
    members = make_members(2500, DEPARTMENT)
    invalid = {f"User{i:04d}" for i in (7, 1500, 1501, 2222, 2500)}  # WeCom answers them in lower case
    for member in members:
        if member["userid"].capitalize() in invalid:
            member["userid"] = member["userid"].capitalize()
    standin.set_members(DEPARTMENT, members)
    standin.enable_app(standin.agent_id, standin.app_secret,
                       visible={m["userid"] for m in members} - invalid, unlicensed={"user0042"})
    service = messaging("only")
    service.drain()
    post(service, crypto, "user0003")
    service.drain()

    assert not smtp_sink.messages
    assert len(standin.message_calls) == 3 and [len(c["touser"]) for c in standin.message_calls] == [1000, 1000, 500]
    assert received(standin) == {m["userid"]: 1 for m in members if m["userid"] not in invalid | {"user0042"}}
    deliveries = rows(service.engine, schema.deliveries)
    assert len(deliveries) == 2500 and {d.channel for d in deliveries} == {"wecom"}
    failed = {d.userid: d.reason for d in deliveries if d.status == "failed"}
    assert failed == {**{u: "not a member of the app's visible range" for u in invalid},
                      "user0042": "no licence"}
    assert collections.Counter(d.status for d in deliveries) == {"sent": 2494, "failed": 6}


def test_45009_is_retried_on_the_backoff_schedule_and_nothing_is_lost(messaging, standin, crypto):
    clock = Clock(T0)
    service = messaging("only", RETRY_BACKOFF_SECONDS="2")
    worker = service.make_worker()
    worker.clock = clock
    service.drain(worker)
    limited = {"errcode": 45009, "errmsg": "api freq out of limit"}
    standin.script("message/send", ("forever", limited))
    post(service, crypto, "user0003")
    service.drain(worker)
    delays = []
    while clock.now - T0 < 10:  # WeCom answers 45009 for 10 s
        [d] = {r.next_attempt_at for r in rows(service.engine, schema.deliveries)}
        delays.append(d - clock.now)
        clock.now = d
        service.drain(worker)
    assert delays[:3] == [2, 4, 8]  # RETRY_BACKOFF_SECONDS doubling per attempt
    standin.clear_script()
    clock.now = max(r.next_attempt_at for r in rows(service.engine, schema.deliveries))
    service.drain(worker)
    assert received(standin) == {f"user{i:04d}": 1 for i in range(1, 6)}
    assert {(r.status, r.attempts) for r in rows(service.engine, schema.deliveries)} == {("sent", len(delays) + 2)}


def test_the_daily_limit_defers_to_the_next_day_and_resumes(messaging, standin, crypto):
    clock = Clock(T0)
    service = messaging("only", WECOM_MESSAGE_MAX_PER_DAY="3")
    worker = service.make_worker()
    worker.clock = clock
    service.drain(worker)
    post(service, crypto, "user0003")
    service.drain(worker)
    assert sum(received(standin).values()) == 3
    waiting = [d for d in rows(service.engine, schema.deliveries) if d.status == "retry"]
    assert len(waiting) == 2 and {d.attempts for d in waiting} == {0}
    assert all("daily limit 3 reached (WECOM_MESSAGE_MAX_PER_DAY), resumes at 2024-03-06 00:00" in d.reason
               for d in waiting)
    clock.advance(3600)  # the same day: still waiting
    service.drain(worker)
    assert sum(received(standin).values()) == 3
    clock.now = waiting[0].next_attempt_at  # midnight in TIMEZONE
    service.drain(worker)
    assert received(standin) == {f"user{i:04d}": 1 for i in range(1, 6)}
    assert {d.status for d in rows(service.engine, schema.deliveries)} == {"sent"}


@pytest.mark.parametrize("mode", ["only", "all"])
def test_a_burst_of_30_reaches_a_wecom_only_member_in_at_most_3_messages_each_change_once(
        messaging, standin, smtp_sink, crypto, mode):
    """The digest window per person per channel: with `all`, the mails and the messages each carry every change."""
    from support.digests import changes_received, mails_by_recipient

    clock = Clock(T0)
    service = messaging(mode)
    worker = service.make_worker(digest_window=5)
    worker.clock = clock
    service.drain(worker)
    userids = [f"new{i:03d}" for i in range(30)]
    for n, userid in enumerate(userids):
        post(service, crypto, userid, n=n)
        service.drain(worker)
        clock.advance(0.1)
    clock.advance(10)
    service.drain(worker)
    for member in (f"user{i:04d}" for i in range(1, 6)):
        contents = standin.messages_to(member)
        assert 1 <= len(contents) <= 3
        told = collections.Counter(u for c in contents for u in userids if f"ID：{u}\n" in c + "\n")
        assert told == {u: 1 for u in userids}, member
    assert {d.status for d in rows(service.engine, schema.deliveries)} == {"sent"}
    if mode == "all":
        members = [f"user{i:04d}@corp.example" for i in range(1, 6)]
        assert {len(m) for m in mails_by_recipient(smtp_sink.messages).values()} == {2}
        assert changes_received(smtp_sink.messages) == {(m, u): 1 for m in members for u in userids}
    else:
        assert not smtp_sink.messages


def test_the_per_member_limit_is_never_passed(messaging, standin, crypto):
    """30 a minute per member: without a digest window, the 31st change in a minute waits for a slot. Two
    workers (two owners, as two processes) take turns: the count lives in the state database, not in either."""
    clock = Clock(T0)
    service = messaging("only")
    workers = [service.make_worker(), service.make_worker()]
    for worker in workers:
        worker.clock = clock
    worker = workers[0]
    service.drain(worker)
    for n in range(31):
        post(service, crypto, f"new{n:03d}", n=n)
        service.drain(workers[n % 2])
        clock.advance(0.5)
    assert len(standin.messages_to("user0001")) == 30
    waiting = [d for d in rows(service.engine, schema.deliveries) if d.status == "retry"]
    assert len(waiting) == 5 and all("30 a minute" in d.reason for d in waiting)
    clock.advance(61)
    service.drain(worker)
    assert len(standin.messages_to("user0001")) == 31


@pytest.mark.parametrize("errcode,words", [(60020, "企业可信IP"), (48002, "not allowed"), (301002, "not this app's")])
def test_configuration_errors_fail_with_the_explanation(messaging, standin, crypto, errcode, words):
    service = messaging("only")
    service.drain()
    standin.script("message/send", {"errcode": errcode, "errmsg": "scripted"})
    post(service, crypto, "user0003")
    service.drain()
    deliveries = rows(service.engine, schema.deliveries)
    assert {d.status for d in deliveries} == {"failed"} and all(words in d.reason for d in deliveries)
    assert len(standin.message_calls) == 0  # scripted: the one call never reached the handler


def test_an_expired_app_token_is_refreshed_once(messaging, standin, crypto):
    service = messaging("only")
    service.drain()
    standin.expire_tokens()
    post(service, crypto, "user0003")
    service.drain()
    assert received(standin) == {f"user{i:04d}": 1 for i in range(1, 6)}


def test_text_is_cut_on_a_character_boundary_with_a_visible_ellipsis():
    content = wecom_message.text_content("标题", "变" * 2000)
    assert len(content.encode("utf-8")) <= 2048 and content.endswith("…") and content.startswith("标题\n\n变")
    assert wecom_message.text_content("t", "b") == "t\n\nb"
    assert wecom_message.cut("ab", 2048) == "ab"


def test_check_verifies_the_app_and_counts_members_by_channel(messaging, standin, tmp_path):
    from ops import checks

    members = make_members(6, DEPARTMENT)
    members[0]["email"] = members[1]["email"] = ""
    standin.set_members(DEPARTMENT, members)
    standin.enable_app(standin.agent_id, standin.app_secret)
    service = messaging("fallback")
    lines = [(ok, line) for ok, line in checks.run_all(service.parts)]
    text = "\n".join(line for _, line in lines)
    assert (True, "WeCom app token (WECOM_APP_SECRET): access token obtained") in lines
    assert any(ok and line.startswith(f"WeCom agent {standin.agent_id} (agent/get): ") for ok, line in lines)
    assert (True, f"WeCom messages, department {DEPARTMENT}: within the app's 可见范围") in lines
    assert (True, f"channels, department {DEPARTMENT} (WECOM_MESSAGE=fallback): 4 by email, 2 by WeCom message, "
                  "0 by neither") in lines, text

    # Two members outside the visible range, one of them without an address: reached by neither, and why.
    standin.enable_app(standin.agent_id, standin.app_secret, visible={"user0002", "user0003", "user0004"},
                       visible_parties=[99])
    lines = checks.run_all(service.parts)
    assert (False, f"channels, department {DEPARTMENT} (WECOM_MESSAGE=fallback): 4 by email, 1 by WeCom message, "
                   "1 by neither (1 outside the app's 可见范围)") in lines
    assert any(not ok and "3 of 6 member(s) outside the app's 可见范围" in line for ok, line in lines)

    standin.script("agent/get", {"errcode": 60020, "errmsg": "not allow to access from your ip"})
    lines = checks.run_all(service.parts)
    assert any(not ok and "企业可信IP" in line and "60020" in line for ok, line in lines)


def test_status_admin_and_metrics_show_both_channels(messaging, standin, crypto):
    from prometheus_client import REGISTRY

    from ops import report
    from support.env import TEST_ADMIN_TOKEN

    members = make_members(4, DEPARTMENT)
    members[0]["email"] = ""
    standin.set_members(DEPARTMENT, members)
    standin.enable_app(standin.agent_id, standin.app_secret, visible={"user0002", "user0003", "user0004"})
    service = messaging("fallback", ADMIN_TOKEN=TEST_ADMIN_TOKEN, ADMIN_COOKIE_SECURE="false")
    service.drain()
    sample = {"outcome": "failed", "channel": "wecom"}
    before = REGISTRY.get_sample_value("wecom_mailer_deliveries_total", sample) or 0
    post(service, crypto, "user0003")
    service.drain()
    assert REGISTRY.get_sample_value("wecom_mailer_deliveries_total", sample) == before + 1

    lines = report.status_lines(service.engine, service.parts.settings.tz)
    assert "channels: email: 3 sent, 1 skipped; wecom: 1 failed" in lines
    assert "  WeCom messages: 1 × no valid recipient (81013): none of them is within the app's 可见范围 " \
           "(visible range) or licensed" in lines

    client = service.test_client()
    assert post_login(client, TEST_ADMIN_TOKEN).status_code == 302
    page = client.get("/admin/").get_data(as_text=True)
    assert 'id="channel-summary"' in page and "企业微信应用消息 WeCom messages" in page and "81013" in page
    [event] = rows(service.engine, schema.events)
    detail = client.get(f"/admin/events/{event.id}").get_data(as_text=True)
    assert "企业微信 wecom" in detail and "wecom:user0001" in detail


def test_an_email_refused_for_good_is_followed_by_a_wecom_message_in_the_same_round(
        messaging, standin, smtp_sink, crypto):
    smtp_sink.reject("user0002@corp.example")  # 550 5.1.1 at RCPT: bounced, the address suppressed (issue 20)
    service = messaging("fallback")
    service.drain()
    post(service, crypto, "user0003")
    worker = service.make_worker()
    assert worker.run_once()  # one round: the email fails, the message goes
    assert received(standin) == {"user0002": 1}
    channels = by_channel(service.engine)
    assert channels["email"][("user0002", "bounced")] == 1 and channels["wecom"] == {("user0002", "sent"): 1}
    service.drain(worker)
    assert received(standin) == {"user0002": 1} and len(smtp_sink.messages) == 4
