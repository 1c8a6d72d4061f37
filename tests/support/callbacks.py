"""Callbacks as WeCom sends them: encrypted, signed, posted to an app or a running service."""
from __future__ import annotations

from urllib.parse import urlencode

import wecom
from support.env import DEPARTMENT, TEST_CORP_ID

CREATED_AT = 1700000000  # 2023-11-15 06:13:20 in Asia/Shanghai


def change_xml(change_type: str = "create_user", userid: str = "user0003", departments: str = str(DEPARTMENT),
               create_time: int = CREATED_AT, **extra) -> str:
    """A contact-change event's plaintext XML, as WeCom would send it for the test corp."""
    return wecom.event_xml(change_type, userid, TEST_CORP_ID, departments, create_time=create_time, **extra)


def signed_post(client, crypto, xml, path="/wecom/callback", **query_overrides):
    """POST `xml` to a Flask test client, encrypted and signed as WeCom would; returns the response."""
    packet = crypto.encrypt(xml)
    query = dict(packet["query"], **query_overrides)
    return client.post(f"{path}?{urlencode(query)}", data=packet["body"], content_type="text/xml")
