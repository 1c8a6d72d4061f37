"""Start-up refuses, in one line with the fix, a database it must not touch: migrated by a newer release
(rolling upgrades), or on a server whose settings break the outbox's promises (store/server.py)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from store import db, migrate, server
from support import count
from store.schema import events


def _refusal(make_app, capsys, **env) -> str:
    with pytest.raises(SystemExit) as info:
        make_app(**env)
    assert info.value.code == 4  # gunicorn's "app failed to load": the arbiter stops, no respawn loop
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wecom-mailer:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_database_migrated_past_our_head_is_refused_naming_both_revisions(make_app, capsys, db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    line = _refusal(make_app, capsys, DATABASE_URL=db_url)
    assert "schema revision 0099_from_the_future" in line and f"its newest is {migrate.head_revision()}" in line
    assert "run that release or a newer one" in line
    with pytest.raises(migrate.SchemaTooNew):
        migrate.upgrade(engine)
    assert migrate.current_revision(engine) == "0099_from_the_future"  # untouched
    assert count(engine, events) == 0


def test_a_known_older_revision_is_upgraded_as_before(make_app, db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0006'"))
    assert "0006" in migrate.known_revisions()
    migrate.refuse_unknown("0006")  # no error


BAD_SERVERS = [
    # (settings as read_settings returns them, words the problem must contain)
    ({"isolation": "SERIALIZABLE"}, "transaction isolation is SERIALIZABLE"),
    ({"isolation": "READ-UNCOMMITTED"}, "SET GLOBAL transaction_isolation='REPEATABLE-READ'"),
    ({"autocommit": 1}, "autocommit is on inside a transaction"),
    ({"engines": {"wm_events": "MyISAM"}}, "ALTER TABLE wm_events ENGINE=InnoDB"),
    ({"read_only": 1}, "point DATABASE_URL at the primary"),
    ({"innodb_read_only": 1}, "the server is read-only"),
    ({"isolation": "READ-COMMITTED", "log_bin": 1, "binlog_format": "STATEMENT"}, "binlog_format='ROW'"),
]
GOOD = {"isolation": "REPEATABLE-READ", "autocommit": 0, "read_only": 0, "innodb_read_only": 0, "log_bin": 1,
        "binlog_format": "MIXED", "engines": {"wm_events": "InnoDB", "wm_deliveries": "InnoDB"}}


@pytest.mark.parametrize("changed,expected", BAD_SERVERS, ids=[e for _, e in BAD_SERVERS])
def test_each_setting_that_breaks_a_promise_is_named_with_its_fix(changed, expected):
    assert server.problems(GOOD) == []
    assert server.problems({**GOOD, "isolation": "READ-COMMITTED"}) == []
    [problem] = server.problems({**GOOD, **changed})
    assert expected in problem


def test_the_real_servers_settings_pass(mysql_url):
    engine = db.make_engine(mysql_url)
    migrate.upgrade(engine)
    settings = server.read_settings(engine)
    assert settings["isolation"] in server.GOOD_ISOLATION and str(settings["autocommit"]) == "0"
    assert set(settings["engines"].values()) == {"InnoDB"} and "wm_events" in settings["engines"]
    server.verify(engine)


def test_a_session_at_serializable_stops_start_up_in_one_line(make_app, capsys, mysql_url):
    # As a server whose global isolation is SERIALIZABLE: every connection of the service starts in it.
    url = f"{mysql_url}?init_command=SET+SESSION+TRANSACTION+ISOLATION+LEVEL+SERIALIZABLE"
    line = _refusal(make_app, capsys, DATABASE_URL=url)
    assert "state database setting breaks a promise: transaction isolation is SERIALIZABLE" in line
    assert "transaction-isolation=REPEATABLE-READ" in line
