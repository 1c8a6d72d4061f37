"""The scenario: a change to a watched department → every member gets the rendered email, exactly once."""
from __future__ import annotations

import sqlalchemy as sa

from store import schema
import wecom
from support import DEPARTMENT, TEST_CORP_ID, event_rows, signed_post, wait_until
from devtools.wecom_standin import make_members

CREATED_AT = 1700000000  # 2023-11-15 06:13:20 in Asia/Shanghai


def change(change_type, userid="user0003", departments=str(DEPARTMENT), **extra):
    return wecom.event_xml(change_type, userid, TEST_CORP_ID, departments, create_time=CREATED_AT, **extra)


def text(message) -> str:
    """The body as the member reads it (SMTP carries CRLF line ends)."""
    return message.get_content().replace("\r\n", "\n").rstrip("\n")


def delivery_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.deliveries).order_by(schema.deliveries.c.id)).all()


def mailed(sink) -> list[str]:
    """Who received a message (the SMTP envelope's recipient), one entry per message, sorted."""
    return sorted(m["X-RcptTo"] for m in sink.messages)


def addresses(*userids) -> list[str]:
    return sorted(f"{u}@corp.example" for u in userids)


MEMBERS = [f"user{i:04d}" for i in range(1, 6)]  # the stand-in's department 2


EXPECTED = {
    "create_user": ("新增成员", "新增时间：2023-11-15 06:13:20\n 新增成员 ID：user0003"),
    "update_user": ("更新成员", "更新时间：2023-11-15 06:13:20\n 更新成员 ID：user0003"),
    "delete_user": ("删除成员", "删除时间：2023-11-15 06:13:20\n 删除成员 ID：user0003"),
}


def test_each_change_type_mails_every_member_once_with_the_original_template(service, smtp_sink, crypto):
    client = service.test_client()
    service.drain()  # the start-up snapshot: department 2 has user0001..user0005
    for change_type, (subject, body) in EXPECTED.items():
        assert signed_post(client, crypto, change(change_type)).data == b"success"
        service.drain()
        batch = [m for m in smtp_sink.messages if m["Subject"] == subject]
        assert sorted(m["X-RcptTo"] for m in batch) == [f"user{i:04d}@corp.example" for i in range(1, 6)]
        for message in batch:
            assert text(message) == body
            assert message["To"].addresses[0].addr_spec == message["X-RcptTo"]
            assert message["Date"] and message["Message-ID"]
    assert len(smtp_sink.messages) == 15
    assert [r.status for r in event_rows(service.engine)] == ["done"] * 3


def test_the_same_callback_again_sends_no_second_email(service, smtp_sink, crypto):
    client = service.test_client()
    xml = change("create_user")
    signed_post(client, crypto, xml)
    service.drain()
    signed_post(client, crypto, xml)  # WeCom's retry of the same event
    service.drain()
    assert mailed(smtp_sink) == addresses(*MEMBERS)
    assert len(event_rows(service.engine)) == 1


def test_new_member_is_among_the_recipients(service, standin, smtp_sink, crypto):
    service.drain()
    newcomer = {"userid": "wangwu", "name": "王五", "department": [DEPARTMENT], "email": "wangwu@corp.example"}
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [newcomer])
    signed_post(service.test_client(), crypto, change("create_user", "wangwu"))
    service.drain()
    assert mailed(smtp_sink) == addresses(*MEMBERS, "wangwu")  # each member once, the newcomer too


def test_deleted_member_is_recognised_from_the_snapshot_and_not_mailed(service, standin, smtp_sink, crypto):
    service.drain()  # snapshot knows user0005
    standin.set_members(DEPARTMENT, make_members(4, DEPARTMENT))  # user0005 has left
    delete = wecom.event_xml("delete_user", "user0005", TEST_CORP_ID, create_time=CREATED_AT)  # carries UserID only
    signed_post(service.test_client(), crypto, delete)
    service.drain()
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == [f"user{i:04d}@corp.example" for i in range(1, 5)]
    assert "删除成员 ID：user0005" in text(smtp_sink.messages[0])


def test_member_moving_out_of_the_department_is_noticed(service, standin, smtp_sink, crypto):
    service.drain()  # the snapshot knows user0002 as a member of department 2
    moved = make_members(5, DEPARTMENT)
    mover = moved.pop(1)
    standin.set_members(DEPARTMENT, moved)
    standin.set_members(9, [{**mover, "department": [9]}])
    signed_post(service.test_client(), crypto, change("update_user", "user0002", departments="9"))
    service.drain()
    # Recognised from the snapshot; mailed to the department as it is now listed, without the one who left.
    assert mailed(smtp_sink) == addresses("user0001", "user0003", "user0004", "user0005")
    assert all(text(m) == "更新时间：2023-11-15 06:13:20\n 更新成员 ID：user0002" for m in smtp_sink.messages)
    assert event_rows(service.engine)[0].status == "done"


def test_change_outside_the_watched_department_is_ignored_under_department_scope(service, smtp_sink, crypto):
    service.drain()
    signed_post(service.test_client(), crypto, change("create_user", "stranger", departments="9"))
    service.drain()
    assert smtp_sink.messages == []
    [row] = event_rows(service.engine)
    assert row.status == "ignored" and "watched department" in row.reason


def test_corp_scope_notifies_the_department_of_any_change(service, smtp_sink, crypto):
    worker = service.make_worker(notify_scope="corp")
    signed_post(service.test_client(), crypto, change("create_user", "stranger", departments="9"))
    service.drain(worker)
    assert mailed(smtp_sink) == addresses(*MEMBERS)
    assert "新增成员 ID：stranger" in text(smtp_sink.messages[0])


def test_missing_template_skips_the_event_with_the_reason(service, smtp_sink, crypto):
    with service.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ipaas_email_template WHERE change_type = 'update_user'"))
    signed_post(service.test_client(), crypto, change("update_user"))
    service.drain()
    [row] = event_rows(service.engine)
    assert row.status == "skipped" and "no template for change_type 'update_user'" in row.reason
    assert smtp_sink.messages == []


def test_template_injection_is_a_recorded_render_error_and_the_worker_lives_on(service, smtp_sink, crypto):
    with service.engine.begin() as conn:
        conn.execute(sa.text("UPDATE ipaas_email_template SET email_body = :b WHERE change_type = 'create_user'"),
                     {"b": "{userid.__class__.__mro__}"})
    client = service.test_client()
    signed_post(client, crypto, change("create_user"))
    signed_post(client, crypto, change("update_user"))
    worker = service.drain()
    rows = event_rows(service.engine)
    assert rows[0].status == "failed" and "template error" in rows[0].reason and "userid.__class__" in rows[0].reason
    assert rows[1].status == "done"
    assert mailed(smtp_sink) == addresses(*MEMBERS) and {m["Subject"] for m in smtp_sink.messages} == {"更新成员"}
    assert not worker.stop.is_set()


def test_name_with_crlf_adds_no_header(service, standin, smtp_sink, crypto):
    evil = {"userid": "mallory", "name": "Mallory\r\nBcc: victim@evil.example", "department": [DEPARTMENT],
            "email": "mallory@corp.example"}
    standin.set_members(DEPARTMENT, [evil])
    signed_post(service.test_client(), crypto, change("create_user", "mallory"))
    service.drain()
    [message] = smtp_sink.messages
    assert message["Bcc"] is None and message["X-RcptTo"] == "mallory@corp.example"


def test_member_without_address_is_skipped_with_the_reason(service, standin, smtp_sink, crypto):
    standin.set_members(DEPARTMENT, make_members(3, DEPARTMENT) + make_members(1, DEPARTMENT, prefix="noaddr",
                                                                                 email=False))
    signed_post(service.test_client(), crypto, change("create_user", "user0001"))
    service.drain()
    rows = delivery_rows(service.engine)
    assert sorted((r.userid, r.status, r.reason) for r in rows) == [
        ("noaddr0001", "skipped", "no address"), ("user0001", "sent", None), ("user0002", "sent", None),
        ("user0003", "sent", None)]
    assert event_rows(service.engine)[0].status == "done"


def test_smtp_451_is_retried_and_delivered_once(service, smtp_sink, crypto):
    smtp_sink.fail_next(1)
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()  # first round: one 451, then retried after the (short test) backoff
    wait_until(lambda: service.drain() and len(smtp_sink.messages) == 5, timeout=10)
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == [f"user{i:04d}@corp.example" for i in range(1, 6)]
    retried = [r for r in delivery_rows(service.engine) if r.attempts == 2]
    assert len(retried) == 1 and retried[0].status == "sent"


def test_smtp_550_fails_that_recipient_only(service, smtp_sink, crypto):
    smtp_sink.reject("user0002@corp.example", "550 5.6.0 message refused")  # 5.1.1 bounces (test_bounces.py)
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    rows = {r.userid: r for r in delivery_rows(service.engine)}
    assert rows["user0002"].status == "failed" and "550" in rows["user0002"].reason
    assert [rows[u].status for u in ("user0001", "user0003", "user0004", "user0005")] == ["sent"] * 4
    assert mailed(smtp_sink) == addresses("user0001", "user0003", "user0004", "user0005")
    assert event_rows(service.engine)[0].status == "done"


def test_expired_token_is_refreshed_once_and_the_mail_goes_out(service, standin, smtp_sink, crypto):
    service.drain()  # the start-up snapshot: the first token, one listing
    assert (standin.tokens_issued, standin.calls["user/list"]) == (1, 1)
    standin.expire_tokens()
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == [f"user{i:04d}@corp.example" for i in range(1, 6)]
    # The event's listing: rejected with the expired token, one new token, listed again.
    assert standin.tokens_issued == 2 and standin.calls["gettoken"] == 2
    assert standin.calls["user/list"] == 3


def test_invalid_token_forever_fails_the_event_with_a_clear_reason(service, standin, smtp_sink, crypto):
    standin.script("user/list", ("forever", {"errcode": 40014, "errmsg": "invalid access_token"}))
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    [row] = event_rows(service.engine)
    assert row.status == "failed" and "40014" in row.reason
    assert smtp_sink.messages == []
    # Two listings (the start-up snapshot, then the event), each refreshed once: the snapshot's first token
    # and its refresh, then the event's refresh of the stored (rejected) one; two user/list calls each.
    assert standin.tokens_issued == 3 and standin.calls["gettoken"] == 3
    assert standin.calls["user/list"] == 4


def test_rate_limit_is_retried_later_and_delivered(service, standin, smtp_sink, crypto):
    service.drain()
    standin.script("user/list", {"errcode": 45009, "errmsg": "api freq out of limit"})
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    assert event_rows(service.engine)[0].status == "pending" and "45009" in event_rows(service.engine)[0].reason
    wait_until(lambda: service.drain() and len(smtp_sink.messages) == 5, timeout=10)
    assert event_rows(service.engine)[0].status == "done"


def test_untrusted_ip_fails_with_the_trusted_ip_hint(service, standin, smtp_sink, crypto):
    service.drain()
    standin.script("user/list", {"errcode": 60020, "errmsg": "not allow to access from your ip"})
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    [row] = event_rows(service.engine)
    assert row.status == "failed" and "60020" in row.reason and "可信IP" in row.reason
    assert smtp_sink.messages == []


def test_fetch_child_covers_a_new_member_of_a_sub_department(service, standin, smtp_sink, crypto):
    standin.children = {DEPARTMENT: [21]}
    standin.set_members(21, [{"userid": "child1", "name": "子部门", "department": [21], "email": "child1@corp.example"}])
    worker = service.make_worker(fetch_child=True)
    service.drain(worker)  # snapshot covers department 2 and its sub-department 21
    signed_post(service.test_client(), crypto, change("create_user", "child1", departments="21"))
    service.drain(worker)
    assert mailed(smtp_sink) == addresses(*MEMBERS, "child1")


def test_logs_name_each_member_mailed_and_count_the_event(service, smtp_sink, crypto, caplog):
    caplog.set_level("INFO")
    signed_post(service.test_client(), crypto, change("create_user"))
    service.drain()
    mailed = [r.getMessage() for r in caplog.records if r.name == "wecom_mailer.mailer" and r.levelname == "INFO"]
    assert len(mailed) == 5 and "mailed 王芳 <user0001@corp.example>" in mailed[0]
    assert any("create_user userid=user0003: 5 sent, 0 skipped (no address), 0 failed" in r.getMessage()
               for r in caplog.records if r.name == "wecom_mailer.worker")


def test_thirty_two_connections_mail_everyone_once_and_record_over_one_database_connection(
        service, standin, smtp_sink, crypto):
    # SMTP_CONNECTIONS goes up to 32; the state database pool holds 15. The outcomes of all connections are
    # recorded over one database connection (whichever thread records takes it in turn), never one each.
    standin.set_members(DEPARTMENT, make_members(200, DEPARTMENT))
    worker = service.make_worker(smtp_connections=32)
    service.drain(worker)  # the member snapshot
    held, most = set(), [0]

    def checkout(dbapi_connection, record, proxy):
        held.add(id(record))
        most[0] = max(most[0], len(held))

    def checkin(dbapi_connection, record):
        held.discard(id(record))

    sa.event.listen(service.engine, "checkout", checkout)
    sa.event.listen(service.engine, "checkin", checkin)
    try:
        assert signed_post(service.test_client(), crypto, change("create_user", "user0199")).data == b"success"
        service.drain(worker)
    finally:
        sa.event.remove(service.engine, "checkout", checkout)
        sa.event.remove(service.engine, "checkin", checkin)
    assert sorted(m["X-RcptTo"] for m in smtp_sink.messages) == sorted(f"user{i:04d}@corp.example"
                                                                       for i in range(1, 201))
    assert most[0] <= 4  # the marks' connection, the lease and the round's own reads; not one per connection
