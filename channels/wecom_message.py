"""WeCom application messages (应用消息): the text WeCom shows, one message/send call for up to 1,000 members,
and what its answer means for each of them. Knows nothing of the ledger (channels/message_round.py marks it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import wecom_api

MAX_USERS = 1000  # touser: at most 1,000 userids per call
TEXT_BYTES = 2048  # text content: at most 2,048 bytes
ELLIPSIS = "…"
DUPLICATE_CHECK_SECONDS = 1800
NOT_VISIBLE = "not a member of the app's visible range"
NO_LICENCE = "no licence"
TRANSIENT = (-1, 45009, 45033, 45011)  # busy, frequency, concurrency: back off and try again
# Configuration, not a moment's trouble: explained (`check`, `status`) and not retried (reference/wecom-facts.md,
# wecom-messages-signin.md).
EXPLAINED = {
    60020: "this server's IP is not trusted (60020): apps created after 2022-06-20 need it in the app's "
           "企业可信IP (应用管理 > the app > 企业可信IP; it takes about a minute to apply)",
    48002: "the API is not allowed for this app (48002): message/send needs the self-built app's own Secret "
           "in WECOM_APP_SECRET and the app enabled",
    81013: "no valid recipient (81013): none of them is within the app's 可见范围 (visible range) or licensed",
    82001: "no valid recipient (82001): the recipient list was empty",
    301002: "the access token is not this app's (301002): WECOM_APP_SECRET must be the Secret of the app whose "
            "AgentId is WECOM_AGENT_ID, and the agent must be within the visible range",
    40001: "the app's secret is wrong (40001): copy the Secret from 应用管理 > the app into WECOM_APP_SECRET",
    40013: "the corp id is unknown (40013): copy 企业ID from 我的企业 > 企业信息 into WECOM_CORP_ID",
    40056: "the agent id is wrong (40056): copy the app's AgentId into WECOM_AGENT_ID",
    50001: "the redirect domain is not trusted (50001)",
}


def text_content(title: str, body: str) -> str:
    """The title, a blank line and the body, cut on a character boundary to 2,048 bytes with a visible …."""
    text = f"{title}\n\n{body}" if body else title
    return cut(text, TEXT_BYTES)


def cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` UTF-8 bytes, else its longest character prefix that fits with … after it."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    room = limit - len(ELLIPSIS.encode("utf-8"))
    return data[:room].decode("utf-8", "ignore") + ELLIPSIS


def request_body(agent_id: int, userids: list[str], content: str) -> dict:
    """message/send's body; built the same way every time, so a resend of the same content to the same
    members is the same request and WeCom's duplicate check drops it within 1,800 s."""
    return {"touser": "|".join(userids), "msgtype": "text", "agentid": agent_id, "text": {"content": content},
            "safe": 0, "enable_duplicate_check": 1, "duplicate_check_interval": DUPLICATE_CHECK_SECONDS}


@dataclass(frozen=True)
class CallOutcome:
    """What one call means for its members: `failed` userid (as given) → reason, the rest sent; or, when the
    call as a whole did not go, `transient` / `permanent` with the reason for all."""
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    transient: str | None = None
    permanent: str | None = None
    msgid: str = ""


def explain(errcode: int | None) -> str | None:
    """The admin's words for a configuration error of message/send, or None."""
    return EXPLAINED.get(errcode) if errcode is not None else None


def send(client: wecom_api.WeComClient, agent_id: int, userids: list[str], content: str) -> CallOutcome:
    """One message/send call for up to 1,000 members; never raises for WeCom's or the network's faults.
    The token is refreshed once on 40014/42001 (WeComClient.call)."""
    assert 0 < len(userids) <= MAX_USERS
    try:
        answer = client.call("post", "message/send", data=request_body(agent_id, userids, content))
    except wecom_api.WeComError as exc:
        if exc.errcode in EXPLAINED:
            return CallOutcome(permanent=EXPLAINED[exc.errcode])
        if exc.errcode in wecom_api.TOKEN_REJECTED:  # even a freshly fetched token: the app's settings are wrong
            return CallOutcome(permanent=f"WeCom rejected a freshly fetched app token (errcode {exc.errcode}): "
                                         "check WECOM_CORP_ID and WECOM_APP_SECRET")
        if exc.permanent and exc.errcode not in TRANSIENT:
            return CallOutcome(permanent=f"message/send refused: {exc}")
        return CallOutcome(transient=str(exc))
    return read_answer(answer, userids)


def read_answer(answer: dict, userids: list[str]) -> CallOutcome:
    """A successful answer: `invaliduser` / `unlicenseduser` (|-joined, lower-cased by WeCom) failed, the rest
    sent; never read as all-sent or all-failed when it names some."""
    invalid = _userids(answer.get("invaliduser"))
    unlicensed = _userids(answer.get("unlicenseduser"))
    sent, failed = [], {}
    for userid in userids:
        key = userid.lower()
        if key in invalid:
            failed[userid] = NOT_VISIBLE
        elif key in unlicensed:
            failed[userid] = NO_LICENCE
        else:
            sent.append(userid)
    return CallOutcome(sent=sent, failed=failed, msgid=str(answer.get("msgid") or ""))


def _userids(value) -> set[str]:
    if isinstance(value, list):
        value = "|".join(map(str, value))
    return {part.strip().lower() for part in str(value or "").split("|") if part.strip()}
