"""Which MariaDB the suite runs its MySQL tests against: TEST_MYSQL_URL, else the local server if it answers."""
from __future__ import annotations

import os
from functools import lru_cache

import sqlalchemy as sa

LOCAL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
MYSQL_HINT = ("MariaDB tests skipped: set TEST_MYSQL_URL=mysql+pymysql://user@host:3306/test, or run MariaDB "
              "on 127.0.0.1:3306 (root, no password); REQUIRE_MYSQL=1 makes a missing server fail the run")


def require_mysql() -> bool:
    return os.environ.get("REQUIRE_MYSQL") == "1"


@lru_cache(maxsize=1)
def server_url() -> tuple[str | None, str]:
    """(URL of a MariaDB server that answers, or None; what was tried and what happened)."""
    url = os.environ.get("TEST_MYSQL_URL") or LOCAL_URL
    where = "TEST_MYSQL_URL" if os.environ.get("TEST_MYSQL_URL") else f"the local server ({LOCAL_URL})"
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        return None, f"{where} does not answer: {exc.orig.__class__.__name__}"
    finally:
        engine.dispose()
    return url, f"MariaDB at {sa.engine.make_url(url).render_as_string(hide_password=True)} ({where})"
