"""The WeCom stand-in's self-built app (自建应用), issue 21: agent/get and message/send, every call recorded,
WeCom's duplicate check and its invaliduser / unlicenseduser answers. A mixin of devtools.wecom_standin's
WeComStandIn (which answers gettoken for the app's secret too and routes these paths here)."""
from __future__ import annotations

import json
import time


def _json(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class AppMessages:
    """The app's state and handlers; WeComStandIn calls _init_messages() and routes _message_routes()."""

    # --- the self-built app (自建应用): app token, agent/get, message/send (issue 21) -------------------------
    # Its own module so the sign-in endpoints (issue 22) can sit beside it. gettoken above answers the app's
    # secret too (its tokens are remembered in app_tokens); message/send needs such a token (else 301002).

    def _init_messages(self) -> None:
        self.app_secret: str | None = None
        self.agent_id: int | None = None
        self.app_tokens: set[str] = set()
        self.visible: set[str] | None = None  # userids (lower case) in the app's 可见范围; None: every member
        self.visible_parties: list[int] = []  # agent/get's allow_partys (default: every known department)
        self.unlicensed: set[str] = set()
        self.message_calls: list[dict] = []  # every message/send request, parsed, with what became of it
        self.delivered: list[tuple[str, str]] = []  # (userid, content) per message a member actually got
        self.on_message = None  # called with the request after it is recorded, before the answer (tests kill here)
        self._seen_bodies: dict[bytes, int] = {}  # duplicate check: request body → first call's index

    def enable_app(self, agent_id: int, app_secret: str, visible: set[str] | None = None,
                   unlicensed: set[str] = frozenset(), visible_parties: list[int] | None = None) -> None:
        """Create the self-built app: its AgentId and Secret, who is in its 可见范围 and who has no licence."""
        with self._lock:
            self.agent_id, self.app_secret = agent_id, app_secret
            self.visible = None if visible is None else {u.lower() for u in visible}
            self.unlicensed = {u.lower() for u in unlicensed}
            self.visible_parties = list(visible_parties) if visible_parties is not None else []

    def messages_to(self, userid: str) -> list[str]:
        """The contents `userid` received, in order."""
        with self._lock:
            return [content for who, content in self.delivered if who == userid.lower()]

    def _message_routes(self) -> dict:
        return {("POST", "message/send"): self._message_send, ("GET", "agent/get"): self._agent_get}

    def _app_token(self, query: dict) -> bool:
        with self._lock:
            return query.get("access_token", "") in self.app_tokens

    def _agent_get(self, query: dict, _body: bytes) -> bytes:
        if not self._app_token(query):
            return _json({"errcode": 301002, "errmsg": "not allow operate another agent with this accesstoken"})
        if _int(query.get("agentid")) != self.agent_id:
            return _json({"errcode": 40056, "errmsg": "invalid agentid"})
        with self._lock:
            parties = self.visible_parties or sorted({*self._members, *self.children})
            users = sorted(self.visible or ())
        return _json({"errcode": 0, "errmsg": "ok", "agentid": self.agent_id, "name": "通讯录变更通知",
                      "allow_userinfos": {"user": [{"userid": u} for u in users]},
                      "allow_partys": {"partyid": parties}, "allow_tags": {"tagid": []}, "close": 0})

    def _message_send(self, query: dict, body: bytes) -> bytes:
        if not self._app_token(query):
            return _json({"errcode": 301002, "errmsg": "not allow operate another agent with this accesstoken"})
        try:
            request = json.loads(body or b"{}")
            touser = [u for u in str(request.get("touser") or "").split("|") if u]
            content = request["text"]["content"]
        except (ValueError, TypeError, KeyError):
            return _json({"errcode": 47001, "errmsg": "data format error"})
        if request.get("agentid") != self.agent_id:
            return _json({"errcode": 40056, "errmsg": "invalid agentid"})
        if len(touser) > 1000 or len(content.encode("utf-8")) > 2048:
            return _json({"errcode": 40058, "errmsg": "too many users or content too long"})
        with self._lock:
            members = {m["userid"].lower() for ms in self._members.values() for m in ms}
            invalid = [u.lower() for u in touser if u.lower() not in members
                       or (self.visible is not None and u.lower() not in self.visible)]
            unlicensed = [u.lower() for u in touser if u.lower() in self.unlicensed and u.lower() not in invalid]
            duplicate = bool(request.get("enable_duplicate_check")) and body in self._seen_bodies
            self._seen_bodies.setdefault(body, len(self.message_calls))
            good = [u.lower() for u in touser if u.lower() not in invalid and u.lower() not in unlicensed]
            self.message_calls.append({"touser": touser, "content": content, "request": request,
                                       "duplicate": duplicate, "invalid": invalid, "unlicensed": unlicensed,
                                       "at": time.monotonic()})
            if not duplicate:
                self.delivered.extend((u, content) for u in good)
        if self.on_message is not None:
            self.on_message(request)
        if not good:
            return _json({"errcode": 81013, "errmsg": "user & party & tag all invalid",
                          "invaliduser": "|".join(invalid), "unlicenseduser": "|".join(unlicensed)})
        return _json({"errcode": 0, "errmsg": "ok", "invaliduser": "|".join(invalid),
                      "unlicenseduser": "|".join(unlicensed), "msgid": f"msg{len(self.message_calls)}"})

