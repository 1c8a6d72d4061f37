"""Addresses: the source chain in configured order, and the CSV import into the address book."""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

import config
from store import db, migrate, schema
from mailer import address_problem
from store.addressbook import CHUNK, ImportResult, import_csv, resolve
from support import base_env
from wecom_api import Member


@pytest.fixture
def state(sqlite_url):
    engine = db.make_engine(sqlite_url)
    migrate.upgrade(engine)
    return engine


@pytest.fixture
def db_state(db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    return engine


def book(engine, **emails):
    with engine.begin() as conn:
        conn.execute(schema.address_book.insert(),
                     [{"userid": u, "email": e, "updated_at": time.time()} for u, e in emails.items()])


def book_rows(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.address_book.c.userid, schema.address_book.c.email)).all())


def settings(**env):
    return config.from_env(base_env(**env))


@pytest.mark.parametrize("env, member, expected", [
    ({}, Member("zs", email="zs@wecom.example", biz_mail="zs@biz.example"), "zs@wecom.example"),
    ({}, Member("zs", biz_mail="zs@biz.example"), "zs@biz.example"),
    ({}, Member("inbook"), "inbook@book.example"),
    ({"EMAIL_PATTERN": "{userid}@corp.example"}, Member("zs"), "zs@corp.example"),
    ({}, Member("zs"), None),  # no pattern: the pattern source is off
    ({"EMAIL_SOURCES": "directory,wecom"}, Member("inbook", email="x@wecom.example"), "inbook@book.example"),
    ({"EMAIL_SOURCES": "wecom,directory"}, Member("inbook", email="x@wecom.example"), "x@wecom.example"),
    ({"EMAIL_SOURCES": "wecom"}, Member("inbook"), None),
    ({}, Member("inbook", email="not-an-address", biz_mail="zs@@biz"), "inbook@book.example"),
    ({}, Member("zs", email="zs@corp.example\r\nBcc: x@evil.example"), None),
    ({"EMAIL_PATTERN": "{userid}@corp.example"}, Member("张三"), None),  # invalid address: absent
    ({"EMAIL_PATTERN": "{userid}@corp.example"}, Member("InBook"), "inbook@book.example"),
])
def test_source_chain(state, env, member, expected):
    book(state, inbook="inbook@book.example")
    assert resolve(settings(**env), state, [member]) == [(member, expected)]


def test_directory_is_one_query_per_chunk(state):
    members = [Member(f"u{i}") for i in range(CHUNK * 2 + 1)]
    book(state, **{f"u{i}": f"u{i}@book.example" for i in range(0, len(members), 2)})
    statements = []
    sa.event.listen(state, "before_cursor_execute", lambda *args: statements.append(args[2]))
    resolved = resolve(settings(), state, members)
    # The address book, then the suppressions of the 501 addresses found (bounces, issue 20): per CHUNK each.
    assert len([s for s in statements if "wm_address_book" in s]) == 3
    assert len([s for s in statements if "wm_suppressions" in s]) == 2
    assert len(statements) == 5
    assert [address for _, address in resolved][:3] == ["u0@book.example", None, "u2@book.example"]


def test_no_members_no_query(state):
    statements = []
    sa.event.listen(state, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert resolve(settings(), state, []) == []
    assert statements == []


@pytest.mark.parametrize("address, valid", [
    ("zhangsan@corp.example", True),
    ("zhang.san+it@mail.corp.example", True),
    ("not-an-address", False),
    ("a@b", False),
    ("", False),
    ("张三@corp.example", False),
    ("Zhang San <zs@corp.example>", False),
    ("zs@corp.example\n", False),
    ("zs@corp..example", False),
    (".zs@corp.example", False),
    ("a,b@corp.example", False),
    ("x" * 65 + "@corp.example", False),
])
def test_one_address_rule_decides_what_the_address_book_keeps_and_what_is_sent(address, valid):
    assert (address_problem(address) is None) is valid


# --- import ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, encoding", [
    ("userid,email\nzhangsan,zs@corp.example\nlisi,ls@corp.example\n", "utf-8"),
    ("帐号,邮箱\nzhangsan,zs@corp.example\nlisi,ls@corp.example\n", "utf-8"),
    ("姓名,账号,邮箱\n张三,zhangsan,zs@corp.example\n李四,lisi,ls@corp.example\n", "utf-8-sig"),
    (" Email , UserID \nzs@corp.example,zhangsan\nls@corp.example,lisi\n", "utf-8"),
    ("姓名,账号,邮箱\r\n张三,zhangsan,zs@corp.example\r\n李四,lisi,ls@corp.example\r\n", "gb18030"),
    ("zhangsan,zs@corp.example\nlisi,ls@corp.example\n", "utf-8"),  # no header row
    ("\ufeffzhangsan,zs@corp.example\n\nlisi , ls@corp.example \n", "utf-8"),
])
def test_import_accepts_headers_encodings_and_no_header(db_state, tmp_path, content, encoding):
    path = tmp_path / "addresses.csv"
    path.write_bytes(content.encode(encoding))
    assert import_csv(db_state, path) == ImportResult(2, 0, 0, ())
    assert book_rows(db_state) == {"zhangsan": "zs@corp.example", "lisi": "ls@corp.example"}


def test_reimport_counts_updated_and_unchanged(db_state, tmp_path):
    path = tmp_path / "addresses.csv"
    path.write_text("userid,email\nzhangsan,zs@corp.example\nlisi,ls@corp.example\n", encoding="utf-8")
    assert import_csv(db_state, path) == ImportResult(2, 0, 0, ())
    assert import_csv(db_state, path) == ImportResult(0, 0, 0, ())
    path.write_text("userid,email\nZhangSan,zhang.san@corp.example\nlisi,ls@corp.example\nwangwu,ww@corp.example\n",
                    encoding="utf-8")
    assert import_csv(db_state, path) == ImportResult(1, 1, 0, ())
    assert book_rows(db_state) == {"zhangsan": "zhang.san@corp.example", "lisi": "ls@corp.example",
                                   "wangwu": "ww@corp.example"}


def test_rejected_lines_are_numbered(db_state, tmp_path):
    path = tmp_path / "addresses.csv"
    path.write_text("userid,email\nzhangsan,zs@corp.example\n\n,nobody@corp.example\nlisi,not-an-address\n"
                    f"wangwu\n{'x' * 65},x@corp.example\n", encoding="utf-8")
    result = import_csv(db_state, path)
    assert (result.added, result.updated, result.rejected) == (1, 0, 4)
    assert result.errors == ("line 4: empty userid", "line 5: 'not-an-address' is not an email address",
                             "line 6: '' is not an email address",
                             f"line 7: userid '{'x' * 20}'… is longer than 64 bytes")
    assert book_rows(db_state) == {"zhangsan": "zs@corp.example"}


@pytest.mark.parametrize("content, says", [
    (b"", "empty"),
    (b"name,mail\nzhangsan,zs@corp.example\n", "no userid and email columns"),
    (b"userid,phone\nzhangsan,123\n", "no userid and email columns"),
    (b"zhangsan\n", "no userid and email columns"),
    (b"\xff\xfe\x00\x00\x80", "neither UTF-8 nor GB18030"),
])
def test_unreadable_files_raise_with_the_expected_headers(state, tmp_path, content, says):
    path = tmp_path / "addresses.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=says) as caught:
        import_csv(state, path)
    assert "userid/帐号/账号" in str(caught.value) and "email/邮箱" in str(caught.value)


def test_missing_file_raises(state, tmp_path):
    with pytest.raises(ValueError, match="cannot read .*expected"):
        import_csv(state, tmp_path / "nope.csv")


def test_large_import_is_batched(state, tmp_path):
    path = tmp_path / "addresses.csv"
    path.write_text("userid,email\n" + "".join(f"u{i},u{i}@corp.example\n" for i in range(2000)), encoding="utf-8")
    statements = []
    sa.event.listen(state, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert import_csv(state, path).added == 2000
    assert len(statements) <= 2000 // CHUNK + 2
