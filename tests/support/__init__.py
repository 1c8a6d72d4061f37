"""The test harness: the test corp, callbacks, the SMTP server, processes, waiting, and reading the state.

Fixtures live in tests/conftest.py; everything a test imports lives here (never `from conftest import`).
"""
from support.callbacks import CREATED_AT, change_xml, signed_post
from support.env import (DEPARTMENT, ROOT, TEST_ADMIN_TOKEN, TEST_AES_KEY, TEST_CORP_ID, TEST_SECRET,
                         TEST_TOKEN, base_env)
from support.state import count, delivery_rows, event_rows, rows
from devtools.waiting import wait_until
from devtools.ports import free_port

__all__ = ["CREATED_AT", "DEPARTMENT", "ROOT", "TEST_ADMIN_TOKEN", "TEST_AES_KEY", "TEST_CORP_ID", "TEST_SECRET",
           "TEST_TOKEN", "base_env", "change_xml", "count", "delivery_rows", "event_rows", "free_port", "rows",
           "signed_post", "wait_until"]
