"""WECOM_MESSAGE at expansion: which channels an event's rows are written for. `off` and `fallback` write
email rows (fallback adds a WeCom row later, for each member email did not reach: channels/message_round);
`all` adds a WeCom row for every member; `only` writes WeCom rows instead of email ones."""
from __future__ import annotations

from store.channel_rows import wecom_address


def ledger_rows(mode: str, rows: list[dict]) -> list[dict]:
    """The delivery rows to write for one event, given its email rows (one per member)."""
    for row in rows:
        row.setdefault("channel", "email")
    if mode not in ("all", "only"):
        return rows
    messages = [{"userid": r["userid"], "name": r["name"], "address": wecom_address(r["userid"]),
                 "address_source": None, "status": "pending", "reason": None, "channel": "wecom"}
                for r in rows]
    return messages if mode == "only" else rows + messages
