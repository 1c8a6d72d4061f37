"""Templates: the original rows render as the original flow did; only plain placeholders; storage on both databases."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

import config
from store import db
from support import TEST_CORP_ID, base_env
from templates_repo import (DIGEST_ROW, ORIGINAL_ROWS, EmailTemplate, RenderError, event_values, load_template,
                            load_templates, render, render_email, seed_templates)
from wecom import ContactChange, event_xml, parse_event

SHANGHAI = ZoneInfo("Asia/Shanghai")
TABLE, APP = "ipaas_email_template", "tencent-wechat"
ORIGINAL = {change_type: EmailTemplate(title, body) for change_type, title, body in ORIGINAL_ROWS}


def change(change_type="create_user", user_id="zhangsan", create_time=1700000000, **extra_tags):
    """A parsed event; extra XML tags (Name="张三", Position=…) as WeCom would send them."""
    xml = event_xml(change_type, user_id, TEST_CORP_ID, departments="2,3", create_time=create_time)
    tags = "".join(f"<{tag}><![CDATA[{value}]]></{tag}>" for tag, value in extra_tags.items())
    return parse_event(xml.replace("</xml>", tags + "</xml>"))


@pytest.mark.parametrize("change_type, subject, body", [
    ("create_user", "新增成员", "新增时间：2023-11-15 06:13:20\n 新增成员 ID：zhangsan"),
    ("update_user", "更新成员", "更新时间：2023-11-15 06:13:20\n 更新成员 ID：zhangsan"),
    ("delete_user", "删除成员", "删除时间：2023-11-15 06:13:20\n 删除成员 ID：zhangsan"),
])
def test_original_rows_render_as_the_original_flow(change_type, subject, body):
    assert "\\n" in ORIGINAL[change_type].body  # stored as a two-character backslash-n
    assert render_email(ORIGINAL[change_type], change(change_type), SHANGHAI) == (subject, body)


@pytest.mark.parametrize("timezone, expected", [
    ("Asia/Shanghai", "2023-11-15 06:13:20"),
    ("UTC", "2023-11-14 22:13:20"),
    ("Europe/Berlin", "2023-11-14 23:13:20"),
])
def test_timezone_setting_changes_createtime(timezone, expected):
    settings = config.from_env(base_env(TIMEZONE=timezone))
    assert event_values(change(), settings.tz)["createtime"] == expected


def test_default_timezone_is_shanghai():
    assert event_values(change(), None)["createtime"] == "2023-11-15 06:13:20"


def test_every_member_field_and_change_type_are_placeholders():
    text = "{name}|{department}|{position}|{newuserid}|{bizmail}|{change_type}|{changetype}|{userid}"
    values = event_values(change("update_user", Name="张三", Position="工程师", NewUserID="zs", BizMail="zs@corp.example"), SHANGHAI)
    assert render(text, values) == "张三|2,3|工程师|zs|zs@corp.example|update_user|update_user|zhangsan"


def test_fields_the_event_lacks_render_empty():
    # Callbacks configured after 2022-08-15 carry only UserID and Department.
    bare = ContactChange("event", "change_contact", "delete_user", "zhangsan", None, fields={"userid": "zhangsan"})
    values = event_values(bare, SHANGHAI)
    assert render("[{name}][{position}][{mobile}][{department}][{createtime}]", values) == "[][][][][]"


@pytest.mark.parametrize("event_name, fallback, expected", [
    ("张三", "Zhang San (list)", "张三"),
    ("", "Zhang San (list)", "Zhang San (list)"),
    ("", "", ""),
])
def test_name_falls_back_to_the_member_list(event_name, fallback, expected):
    event = change(**({"Name": event_name} if event_name else {}))
    assert render("{name}", event_values(event, SHANGHAI, name_fallback=fallback)) == expected


def test_literal_braces_and_event_data_stay_literal():
    values = event_values(change(Position="a\\nb {userid}"), SHANGHAI)
    assert render("{{userid}} {position}", values) == "{userid} a\\nb {userid}"


def test_subject_is_one_line():
    template = EmailTemplate("新增\\n成员 {position}\r\nX", "body")
    subject, _ = render_email(template, change(Position="a\nBcc: evil@example.com"), SHANGHAI)
    assert "\n" not in subject and "\r" not in subject
    assert subject == "新增 成员 a Bcc: evil@example.com X"


@pytest.mark.parametrize("text, named", [
    ("{userid.__class__}", "{userid.__class__}"),
    ("{userid.__class__.__mro__}", "{userid.__class__.__mro__}"),
    ("{userid[0]}", "{userid[0]}"),
    ("{userid!r}", "{userid!r}"),
    ("{userid:>99999999}", "{userid:>99999999}"),
    ("{userid:{name}}", "{userid:{name}}"),
    ("{nosuch}", "{nosuch}"),
    ("{UserID}", "{UserID}"),
    ("{0}", "{0}"),
    ("{}", "{}"),
    ("时间：{createtime", "brace"),
    ("closing } alone", "brace"),
])
def test_anything_but_a_plain_known_name_is_a_render_error(text, named):
    with pytest.raises(RenderError) as caught:
        render_email(EmailTemplate("ok", text), change(), SHANGHAI)
    assert named in str(caught.value) or (named == "brace" and "{{" in str(caught.value))


# --- storage ---------------------------------------------------------------------------------

def test_seed_is_idempotent_and_load_reads_it(db_url):
    engine = db.make_engine(db_url)
    assert seed_templates(engine, TABLE, APP) == 4  # the original three and the digest's row
    assert seed_templates(engine, TABLE, APP) == 0
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT COUNT(*) FROM {TABLE}")).scalar_one() == 4
    for change_type, title, body in ORIGINAL_ROWS + (DIGEST_ROW,):  # Chinese round-trips (utf8mb4 on MariaDB)
        assert load_template(engine, TABLE, APP, change_type) == EmailTemplate(title, body)
    assert load_templates(engine, TABLE, APP) == {c: EmailTemplate(t, b) for c, t, b in ORIGINAL_ROWS + (DIGEST_ROW,)}
    subject, body = render_email(load_template(engine, TABLE, APP, "create_user"), change(), SHANGHAI)
    assert body == "新增时间：2023-11-15 06:13:20\n 新增成员 ID：zhangsan"


def test_load_filters_by_app_and_change_type(db_url):
    engine = db.make_engine(db_url)
    seed_templates(engine, "mail_templates", "other-app")
    assert load_template(engine, "mail_templates", APP, "create_user") is None
    assert load_template(engine, "mail_templates", "other-app", "update_party") is None
    assert seed_templates(engine, "mail_templates", APP) == 4  # another app gets its own rows
    assert load_template(engine, "mail_templates", APP, "delete_user").title == "删除成员"


def test_seed_fills_in_a_preexisting_table_without_a_unique_key(db_url):
    engine = db.make_engine(db_url)
    mysql = engine.dialect.name == "mysql"
    with engine.begin() as conn:  # an original table: surrogate key, no unique (app, change_type)
        conn.execute(sa.text(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY{' AUTO_INCREMENT' if mysql else ''}, "
                             "app VARCHAR(64), change_type VARCHAR(64), email_title VARCHAR(255), email_body TEXT)"
                             + (" CHARACTER SET utf8mb4" if mysql else "")))
        conn.execute(sa.text(f"INSERT INTO {TABLE} (app, change_type, email_title, email_body) "
                             "VALUES (:app, 'create_user', 'Custom', 'mine {userid}')"), {"app": APP})
    assert seed_templates(engine, TABLE, APP) == 3
    assert seed_templates(engine, TABLE, APP) == 0
    assert load_template(engine, TABLE, APP, "create_user") == EmailTemplate("Custom", "mine {userid}")
    assert load_template(engine, TABLE, APP, "update_user").title == "更新成员"


def test_seeded_table_is_utf8mb4_in_a_latin1_database(mysql_url):
    engine = db.make_engine(mysql_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER DATABASE `{engine.url.database}` CHARACTER SET latin1"))
    seed_templates(engine, TABLE, APP)
    assert load_template(engine, TABLE, APP, "update_user") == ORIGINAL["update_user"]


def test_concurrent_seeding_adds_each_row_once(db_url):
    engines = [db.make_engine(db_url) for _ in range(6)]
    with ThreadPoolExecutor(len(engines)) as pool:
        added = list(pool.map(lambda engine: seed_templates(engine, TABLE, APP), engines))
    assert sum(added) == 4
    with engines[0].connect() as conn:
        assert conn.execute(sa.text(f"SELECT COUNT(*) FROM {TABLE}")).scalar_one() == 4


def test_the_readmes_sql_adds_the_digest_row_as_seeding_would(mysql_url):
    """README shows the INSERT for an existing table: on MariaDB it stores exactly the seeded row."""
    import re

    from support import ROOT

    engine = db.make_engine(mysql_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {TABLE} (app VARCHAR(64), change_type VARCHAR(64), "
                             "email_title VARCHAR(255), email_body TEXT) CHARACTER SET utf8mb4"))
    readme = (ROOT / "README.md").read_text()
    [sql] = re.findall(r"```sql\n(INSERT INTO ipaas_email_template.*?;)\n```", readme, re.S)
    with engine.begin() as conn:
        conn.exec_driver_sql(sql.replace("%", "%%"))
    assert load_template(engine, TABLE, APP, "digest") == EmailTemplate(*DIGEST_ROW[1:])
    assert seed_templates(engine, TABLE, APP) == 3  # the original three; the digest row is there
