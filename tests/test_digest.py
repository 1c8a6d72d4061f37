"""The per-recipient backoff digest: a burst is at most two mails per person, every change reaches every
member exactly once, quiet hours hold changes until they end. The worker's clock is moved by hand, so no
test waits for a window."""
from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa

from store import schema
from support import count, rows
from support.digests import (MEMBERS, SHANGHAI, T0, Clock, changes_received, digest_worker, mails_by_recipient,
                             text)


def burst(service, worker, clock, poster, count_: int = 30, spread: float = 3.0) -> list[str]:
    """`count_` create_user events within `spread` seconds, each expanded as it arrives."""
    userids = [f"new{i:03d}" for i in range(count_)]
    for n, userid in enumerate(userids):
        poster(userid, n=n)
        service.drain(worker)
        clock.advance(spread / count_)
    return userids


def test_a_burst_is_at_most_two_mails_per_member_and_every_change_reaches_each_once(
        department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=5)
    userids = burst(department, worker, clock, poster)
    assert len(smtp_sink.messages) == 10  # the first change went to everyone at once; the rest are held
    assert count(department.engine, schema.deliveries, schema.deliveries.c.status == "held") == 29 * 10

    clock.advance(2.5)  # the window since each member's first mail has ended
    department.drain(worker)

    mails = mails_by_recipient(smtp_sink.messages)
    assert sorted(mails) == MEMBERS and {len(m) for m in mails.values()} == {2}
    seen = changes_received(smtp_sink.messages)
    assert seen == {(member, userid): 1 for member in MEMBERS for userid in userids}
    for member, (first, digest) in mails.items():
        assert first["Subject"] == "新增成员" and text(first).endswith("新增成员 ID：new000")
        assert digest["Subject"] == "通讯录变更汇总：29 项 (29 contact changes)"
        assert text(digest).startswith("2023-11-15 06:13:21 至 2023-11-15 06:13:49 共有 29 项通讯录变更：\n"
                                       "29 contact changes from 2023-11-15 06:13:21 to 2023-11-15 06:13:49:\n\n"
                                       "新增成员\n新增时间：2023-11-15 06:13:21\n 新增成员 ID：new001\n\n"
                                       + "-" * 40 + "\n\n新增成员\n")
    deliveries = rows(department.engine, schema.deliveries)
    assert len(deliveries) == 300 and {d.status for d in deliveries} == {"sent"}
    assert {e.status for e in rows(department.engine, schema.events)} == {"done"}
    assert [(d.status, d.changes) for d in rows(department.engine, schema.digests)] == [("sent", 29)] * 10

    # An isolated change long after the burst goes at once: no window to wait for.
    clock.advance(3600)
    poster("later")
    department.drain(worker)
    assert len(smtp_sink.messages) == 30
    assert {m["Subject"] for m in smtp_sink.messages[20:]} == {"新增成员"}
    assert count(department.engine, schema.deliveries, schema.deliveries.c.status == "held") == 0


def test_the_event_log_line_counts_who_got_it_at_once_and_who_is_held(department, poster, caplog):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    caplog.set_level("INFO", logger="wecom_mailer")
    poster("first")
    department.drain(worker)
    poster("second")
    department.drain(worker)
    lines = [r.getMessage() for r in caplog.records if r.name == "wecom_mailer.worker"]
    assert any(" create_user userid=first: 10 sent, 0 skipped (no address), 0 failed" in line for line in lines)
    assert any(" create_user userid=second: 0 sent at once, 10 held for digest, 0 skipped" in line
               for line in lines)
    [second] = [e for e in rows(department.engine, schema.events) if e.user_id == "second"]
    assert second.status == "held" and second.held_rows == 10 and second.lease_owner is None

    clock.advance(61)
    department.drain(worker)
    digest_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("digest ")]
    assert len(digest_lines) == 10
    assert any(line.startswith("digest ") and " to user0001@corp.example: 1 change(s), "
               f"events {second.id}: sent in " in line for line in digest_lines)
    [second] = [e for e in rows(department.engine, schema.events) if e.user_id == "second"]
    assert (second.status, second.held_rows, second.reason) == ("done", 0, "10 sent")


def test_a_single_held_change_goes_as_its_own_mail(department, poster, smtp_sink):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    poster("first")
    department.drain(worker)
    poster("user0004", "update_user")
    department.drain(worker)
    clock.advance(60)
    department.drain(worker)
    later = smtp_sink.messages[10:]
    assert len(later) == 10 and {m["Subject"] for m in later} == {"更新成员"}
    assert text(later[0]) == "更新时间：2023-11-15 06:13:20\n 更新成员 ID：user0004"


def test_window_zero_is_one_mail_per_change_as_before(department, poster, smtp_sink):
    worker = digest_worker(department, Clock(T0), digest_window=0)
    for n in range(30):
        poster(f"new{n:03d}", n=n)
    department.drain(worker)
    mails = mails_by_recipient(smtp_sink.messages)
    assert sorted(mails) == MEMBERS and {len(m) for m in mails.values()} == {30}
    assert {m["Subject"] for m in smtp_sink.messages} == {"新增成员"}
    assert count(department.engine, schema.recipients) == count(department.engine, schema.digests) == 0


# --- quiet hours -------------------------------------------------------------------------------------

def local(hour: int, minute: int = 0, second: int = 0, day: int = 5) -> float:
    return datetime(2024, 3, day, hour, minute, second, tzinfo=SHANGHAI).timestamp()


@pytest.mark.parametrize("window", [0, 60])
def test_changes_in_quiet_hours_go_as_one_mail_when_they_end_and_a_change_outside_goes_at_once(
        department, poster, smtp_sink, window):
    clock = Clock(local(23, 0))
    worker = digest_worker(department, clock, digest_window=window, quiet_hours=(22 * 60, 8 * 60))
    for n in range(5):
        poster(f"night{n}", n=n)
        department.drain(worker)
        clock.advance(600)
    assert smtp_sink.messages == []
    clock.now = local(7, 59, 59, day=6)
    department.drain(worker)
    assert smtp_sink.messages == []

    clock.now = local(8, 0, 1, day=6)
    department.drain(worker)
    mails = mails_by_recipient(smtp_sink.messages)
    assert sorted(mails) == MEMBERS and {len(m) for m in mails.values()} == {1}
    assert {m["Subject"] for m in smtp_sink.messages} == {"通讯录变更汇总：5 项 (5 contact changes)"}
    assert set(changes_received(smtp_sink.messages).values()) == {1}

    clock.now = local(12, 0, day=6)
    poster("noon")
    department.drain(worker)
    assert len(smtp_sink.messages) == 20 and smtp_sink.messages[-1]["Subject"] == "新增成员"


# --- what a digest says -------------------------------------------------------------------------------

def _set_template(service, change_type: str, title: str, body: str) -> None:
    with service.engine.begin() as conn:
        conn.execute(sa.text("UPDATE ipaas_email_template SET email_title = :t, email_body = :b "
                             "WHERE change_type = :c"), {"t": title, "b": body, "c": change_type})


def _two_held(department, poster, change_type: str = "create_user"):
    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    poster("first")
    department.drain(worker)
    poster("held1", change_type, n=1)
    poster("held2", change_type, n=2)
    department.drain(worker)
    clock.advance(60)
    return worker


def test_the_digest_row_of_the_template_table_is_used(department, poster, smtp_sink):
    _set_template(department, "digest", "{count} 项变更 {first_time}", "共 {count} 项，至 {last_time}：\\n{changes}")
    worker = _two_held(department, poster)
    department.drain(worker)
    digest = smtp_sink.messages[-1]
    assert digest["Subject"] == "2 项变更 2023-11-15 06:13:21"
    assert text(digest) == ("共 2 项，至 2023-11-15 06:13:22：\n新增成员\n新增时间：2023-11-15 06:13:21\n 新增成员 ID：held1"
                            "\n\n" + "-" * 40 + "\n\n新增成员\n新增时间：2023-11-15 06:13:22\n 新增成员 ID：held2")


def test_a_broken_digest_template_falls_back_to_the_built_in_text_and_says_why(department, poster, smtp_sink):
    _set_template(department, "digest", "{count} changes", "{changes} {nosuch}")
    worker = _two_held(department, poster)
    department.drain(worker)
    digest = smtp_sink.messages[-1]
    assert digest["Subject"] == "通讯录变更汇总：2 项 (2 contact changes)"
    assert "新增成员 ID：held1" in text(digest) and "新增成员 ID：held2" in text(digest)
    reasons = {d.reason for d in rows(department.engine, schema.digests)}
    assert len(reasons) == 1 and "{nosuch}" in reasons.pop()


def test_without_a_digest_row_the_built_in_text_is_used(department, poster, smtp_sink):
    with department.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ipaas_email_template WHERE change_type = 'digest'"))
    worker = _two_held(department, poster)
    department.drain(worker)
    assert smtp_sink.messages[-1]["Subject"] == "通讯录变更汇总：2 项 (2 contact changes)"
    assert {d.reason for d in rows(department.engine, schema.digests)} == {None}


def test_a_change_whose_own_template_is_gone_is_listed_bare_and_its_event_says_why(department, poster, smtp_sink):
    worker = _two_held(department, poster, "update_user")
    with department.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ipaas_email_template WHERE change_type = 'update_user'"))
    department.drain(worker)
    digest = smtp_sink.messages[-1]
    assert text(digest).endswith("update_user · held1 · 2023-11-15 06:13:21\n\n" + "-" * 40 +
                                 "\n\nupdate_user · held2 · 2023-11-15 06:13:22")
    held = [e for e in rows(department.engine, schema.events) if e.user_id.startswith("held")]
    assert [e.status for e in held] == ["done", "done"]
    assert all(e.reason.startswith("10 sent; listed in a digest by change type, userid and time: no template "
                                   "for change_type 'update_user'") for e in held)


def test_status_and_metrics_show_held_deliveries_and_when_their_digest_goes(department, poster, monkeypatch):
    from ops import metrics

    monkeypatch.setattr(metrics, "GAUGE_SECONDS", 0)  # every scrape reads the outbox again

    clock = Clock(T0)
    worker = digest_worker(department, clock, digest_window=60)
    poster("first")
    department.drain(worker)
    poster("held1", "update_user", n=1)
    department.drain(worker)
    held = [e for e in rows(department.engine, schema.events) if e.user_id == "held1"][0]

    result = department.test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    held_line = next(line for line in lines if " update_user " in line)
    assert held_line.split()[-3:] == ["held", "10", "held"]
    assert "          10 held for digest until 2024-03-05 10:01:00" in lines
    assert lines[-1] == ("digest: 10 deliveries held for 10 recipient(s), the next digest at 2024-03-05 10:01:00")
    result = department.test_cli_runner().invoke(args=["status", "--event", str(held.id)])
    assert result.output.count("held for digest until 2024-03-05 10:01:00") == 10

    body = metrics.exposition(department.engine)[0].decode()
    assert "wecom_mailer_held_deliveries 10.0" in body
    assert 'wecom_mailer_deliveries{status="held"} 10.0' in body
    clock.advance(60)
    department.drain(worker)
    body = metrics.exposition(department.engine)[0].decode()
    assert "wecom_mailer_held_deliveries 0.0" in body
    assert 'wecom_mailer_digests_total{outcome="sent"}' in body


def test_check_says_which_text_the_digests_use(make_app, tmp_path):
    import dataclasses

    import services
    import templates_repo
    from ops import checks

    parts = services.of(make_app())
    settings = dataclasses.replace(parts.settings, digest_window=60)
    templates_repo.seed_templates(parts.template_engine, settings.template_table, settings.template_app)
    assert checks.template_rows(parts.template_engine, settings)[1].endswith("; digests use its 'digest' row")
    with parts.template_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ipaas_email_template WHERE change_type = 'digest'"))
    ok, line = checks.template_rows(parts.template_engine, settings)
    assert ok and "no 'digest' row: digests use the built-in text" in line
    off = dataclasses.replace(settings, digest_window=0)
    assert "digest" not in checks.template_rows(parts.template_engine, off)[1]


def test_a_digest_records_the_saved_version_of_its_digest_row(department, poster, smtp_sink):
    """What people received has an answer for digests too (issue 22): the saved version of the 'digest' row its
    wrapper was composed from (each change inside keeps its own event's version)."""
    from store import template_versions

    title, body = "{count} 项变更", "{changes}"
    _set_template(department, "digest", title, body)
    version = template_versions.add(department.engine, "tencent-wechat", "digest", title, body, "zhangsan")
    worker = _two_held(department, poster)
    department.drain(worker)
    assert smtp_sink.messages[-1]["Subject"] == "2 项变更"
    sent = [d for d in rows(department.engine, schema.digests) if d.status == "sent"]  # one per member
    assert len(sent) == len(MEMBERS) and {d.template_version for d in sent} == {version}
