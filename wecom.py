"""WeCom: callback crypto, contact-change events, and the server API client."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import requests
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as _defused_fromstring
from wechatpy.crypto.cryptography import WeChatCipher
from wechatpy.enterprise import WeChatClient
from wechatpy.enterprise.crypto import WeChatCrypto
from wechatpy.exceptions import WeChatClientException


MEMBER_CHANGES = ("create_user", "update_user", "delete_user")
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts '²', which int() refuses


class CallbackRejected(Exception):
    """A callback we refuse: `reason` is short and safe to send back and log (no secrets)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


# --- callback crypto -------------------------------------------------------------------------

def signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """WeCom msg_signature: sha1 hex over the four strings sorted."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()


class CallbackCrypto:
    """Verify and decrypt (and, for `simulate` and tests, encrypt) WeCom callbacks.

    Signature first, in constant time, inside a timestamp window; XML only after that. wechatpy's
    own `check_signature`/`decrypt_message` compare with `!=`, parse before verifying and accept bad
    padding, so only its AES cipher and its encryptor are used here.
    """

    def __init__(self, token: str, encoding_aes_key: str, corp_id: str, max_skew: int = 300):
        self.token = token
        self.corp_id = corp_id
        self.max_skew = max_skew
        self._key = base64.b64decode(encoding_aes_key + "=")
        self._cipher = WeChatCipher(self._key)
        self._encryptor = WeChatCrypto(token, encoding_aes_key, corp_id)

    def check(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str,
              now: float | None = None) -> None:
        """Raise CallbackRejected unless the timestamp is fresh and the signature matches."""
        if not _DIGITS.fullmatch(timestamp):
            raise CallbackRejected("timestamp is not a number")
        now = time.time() if now is None else now
        if abs(now - int(timestamp)) > self.max_skew:
            raise CallbackRejected("timestamp outside the replay window")
        expected = signature(self.token, timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected.encode(), msg_signature.lower().encode("utf-8", "replace")):
            raise CallbackRejected("signature mismatch", status=403)

    def decrypt(self, encrypted: str) -> str:
        """Decrypt one `Encrypt` value, checking padding, length and the receive id."""
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            raise CallbackRejected("ciphertext is not base64") from None
        if not raw or len(raw) % 16:
            raise CallbackRejected("ciphertext length is not a whole number of AES blocks")
        plain = self._cipher.decrypt(raw)
        pad = plain[-1]
        if not 1 <= pad <= 32 or plain[-pad:] != bytes([pad]) * pad or len(plain) - pad < 20:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)")
        content = plain[16:-pad]
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)")
        try:
            message = content[4:4 + length].decode("utf-8")
            receive_id = content[4 + length:].decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackRejected("ciphertext does not decrypt (wrong EncodingAESKey?)") from None
        if not hmac.compare_digest(receive_id.encode(), self.corp_id.encode()):
            raise CallbackRejected("message is for another corp id", status=403)
        return message

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The GET URL check: the decrypted echostr."""
        self.check(msg_signature, timestamp, nonce, echostr)
        return self.decrypt(echostr)

    def open_envelope(self, body: bytes, msg_signature: str, timestamp: str, nonce: str) -> str:
        """The POST event: the decrypted XML. Nothing of the body is parsed as XML before the signature holds.

        The signature covers the Encrypt value only, and nothing else of the envelope is used, so the value is
        cut out of the raw body (in linear time) rather than parsed: no XML parser ever sees an
        unauthenticated body. Only the decrypted, authenticated event is parsed (parse_event, DTDs refused).
        """
        if not body.strip():
            raise CallbackRejected("empty body")
        if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
            raise CallbackRejected("XML with a DTD or entities is refused")
        encrypted = _encrypt_value(body)
        self.check(msg_signature, timestamp, nonce, encrypted)
        return self.decrypt(encrypted)

    def encrypt(self, message: str, timestamp: str | None = None, nonce: str | None = None) -> dict:
        """Encrypt and sign `message` as WeCom would: the query parameters and the POST body."""
        timestamp = timestamp or str(int(time.time()))
        nonce = nonce or str(int.from_bytes(os.urandom(4), "big"))
        reply = self._encryptor.encrypt_message(message, nonce, timestamp)
        encrypted = _text(parse_xml(reply.encode()), "Encrypt")
        query = {"msg_signature": signature(self.token, timestamp, nonce, encrypted),
                 "timestamp": timestamp, "nonce": nonce}
        body = (f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName><AgentID><![CDATA[]]></AgentID>"
                f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>")
        return {"query": query, "body": body.encode(), "encrypted": encrypted}


def _encrypt_value(body: bytes) -> str:
    """The text of the envelope's one <Encrypt> element (CDATA or plain), without parsing the body."""
    count = body.count(b"<Encrypt>")
    if count > 1:
        raise CallbackRejected("more than one Encrypt element")
    start = body.find(b"<Encrypt>") + len(b"<Encrypt>")
    end = body.find(b"</Encrypt>", start)
    if count == 0 or end < 0:
        raise CallbackRejected("no Encrypt element")
    value = body[start:end].strip()
    if value.startswith(b"<![CDATA[") and value.endswith(b"]]>"):
        value = value[len(b"<![CDATA["):-len(b"]]>")].strip()
    if b"<" in value or b"&" in value or b"]]>" in value:
        raise CallbackRejected("Encrypt must hold plain base64 text")
    if not value:
        raise CallbackRejected("no Encrypt element")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackRejected("Encrypt must hold plain base64 text") from None


def parse_xml(data: bytes | str) -> Element:
    """Parse XML with DTDs, entities and external references refused."""
    try:
        return _defused_fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise CallbackRejected("XML with a DTD or entities is refused") from None
    except Exception:  # ParseError and friends: anything that is not well-formed XML
        raise CallbackRejected("body is not XML") from None


def _text(root: Element, tag: str) -> str | None:
    node = root.find(tag)
    return None if node is None or node.text is None else node.text.strip()


# --- contact-change events --------------------------------------------------------------------

# Member fields of a contact event, by XML tag; `fields` of ContactChange keeps them in lower case.
MEMBER_FIELDS = ("UserID", "NewUserID", "Name", "Department", "MainDepartment", "IsLeaderInDept",
                 "DirectLeader", "Position", "Mobile", "Gender", "Email", "BizMail", "Status",
                 "Avatar", "Alias", "Telephone", "Address")


@dataclass(frozen=True)
class ContactChange:
    """One decrypted WeCom callback, reduced to what the service uses."""

    msg_type: str
    event: str
    change_type: str
    user_id: str
    create_time: int | None
    departments: tuple[int, ...] = ()
    fields: dict = field(default_factory=dict)

    @property
    def is_member_change(self) -> bool:
        return self.msg_type == "event" and self.event == "change_contact" and self.change_type in MEMBER_CHANGES

    @property
    def name(self) -> str:
        return self.fields.get("name", "")


def parse_event(xml: str) -> ContactChange:
    """Parse decrypted event XML; raise CallbackRejected when a member change lacks its UserID."""
    root = parse_xml(xml.encode("utf-8"))
    msg_type = _text(root, "MsgType") or ""
    event = _text(root, "Event") or ""
    change_type = _text(root, "ChangeType") or ""
    fields = {}
    for tag in MEMBER_FIELDS:
        value = _text(root, tag)
        if value is not None:
            fields[tag.lower()] = value
    create_time = _text(root, "CreateTime")
    departments = tuple(int(d) for d in (fields.get("department") or "").split(",") if _DIGITS.fullmatch(d.strip()))
    change = ContactChange(
        msg_type=msg_type, event=event, change_type=change_type, user_id=fields.get("userid", ""),
        create_time=int(create_time) if create_time and _DIGITS.fullmatch(create_time) else None,
        departments=departments, fields=fields)
    if change.is_member_change and not change.user_id:
        raise CallbackRejected(f"{change_type} event without UserID")
    return change


def event_xml(change_type: str, user_id: str, corp_id: str, departments: str = "",
              create_time: int | None = None, name: str = "") -> str:
    """A contact-change event as WeCom sends it (for `simulate`, the demo and tests)."""
    parts = [f"<ToUserName><![CDATA[{corp_id}]]></ToUserName>",
             "<FromUserName><![CDATA[sys]]></FromUserName>",
             f"<CreateTime>{create_time or int(time.time())}</CreateTime>",
             "<MsgType><![CDATA[event]]></MsgType>",
             "<Event><![CDATA[change_contact]]></Event>",
             f"<ChangeType><![CDATA[{change_type}]]></ChangeType>",
             f"<UserID><![CDATA[{user_id}]]></UserID>"]
    if name:
        parts.append(f"<Name><![CDATA[{name}]]></Name>")
    if departments and change_type != "delete_user":
        parts.append(f"<Department><![CDATA[{departments}]]></Department>")
    return "<xml>" + "".join(parts) + "</xml>"


@dataclass(frozen=True)
class Member:
    """A department member as the WeCom API lists them (addresses may be withheld: empty)."""

    userid: str
    name: str = ""
    departments: tuple[int, ...] = ()
    email: str = ""
    biz_mail: str = ""


# --- server API client ------------------------------------------------------------------------

TOKEN_REJECTED = (40014, 42001)  # invalid / expired access_token: fetch one and retry, once
LIST_ID_PAGE = 10000  # user/list_id's largest page
LIST_ID_MAX_PAGES = 100  # a million members; a cursor that never ends is a server fault, not a loop
TRANSIENT = {
    -1: "WeCom is busy",
    45009: "WeCom's API call limit is reached (blocked for a minute or an hour)",
    45011: "WeCom's API call frequency limit is reached",
    45033: "too many concurrent WeCom API calls",
}
PERMANENT = {
    40001: "the secret is wrong: copy the Secret from 管理工具 > 通讯录同步 again into WECOM_CONTACT_SECRET",
    40013: "the corp id is unknown: copy 企业ID from 我的企业 > 企业信息 into WECOM_CORP_ID",
    48002: "this secret may not call {api}: use the 通讯录同步 Secret in WECOM_CONTACT_SECRET, "
           "or allow the API for the app in the WeCom admin console",
    48009: "{api} is refused for the contact-sync secret from this server's IP",
    60011: "the secret has no permission for this department: widen the app's 可见范围 to include "
           "WECOM_DEPARTMENT_ID, or use the 通讯录同步 Secret",
    60020: "this server's IP is not trusted: add its public IP to the app's 企业可信IP in the WeCom admin "
           "console (it takes about a minute to apply)",
    60123: "the department does not exist: check WECOM_DEPARTMENT_ID against 通讯录 > 部门",
}


class WeComError(Exception):
    """A failed WeCom API call: `permanent` says whether retrying later can help; no secrets in str()."""

    def __init__(self, message: str, errcode: int | None = None, permanent: bool = False):
        super().__init__(message)
        self.errcode = errcode
        self.permanent = permanent


class _WeChatClient(WeChatClient):
    """wechatpy's client on the configured base; 1.8.18 hard-codes the public host for gettoken."""

    def __init__(self, corp_id: str, secret: str, api_base: str, timeout: tuple[float, float]):
        self.API_BASE_URL = api_base
        # auto_retry re-fetches and re-issues without bound; WeComClient retries once itself.
        super().__init__(corp_id, secret, timeout=timeout, auto_retry=False)

    def fetch_access_token(self) -> dict:
        res = self._http.get(self.API_BASE_URL + "gettoken", timeout=self.timeout,
                             params={"corpid": self.corp_id, "corpsecret": self.secret})
        res.raise_for_status()
        return self._handle_result(res)


def token_key(corp_id: str, secret: str) -> str:
    """The key an access token is stored under: a digest, so the secret itself is never stored."""
    return hashlib.sha256(f"{corp_id}\0{secret}".encode()).hexdigest()[:64]


class MemoryTokens:
    """Access tokens kept in this process only (store/tokens.py shares them between processes)."""

    def __init__(self):
        self.tokens: dict[str, tuple[str, float]] = {}

    def get(self, key: str) -> tuple[str, float] | None:
        return self.tokens.get(key)

    def put(self, key: str, token: str, expires_at: float) -> None:
        self.tokens[key] = (token, expires_at)


class WeComClient:
    """The WeCom server API: an access token shared through `token_store`, and department members."""

    def __init__(self, settings, token_store=None, observe=None, timeout: tuple[float, float] | None = None):
        # (connect, read) seconds; the read timeout is WECOM_TIMEOUT_SECONDS (default 15).
        timeout = timeout or (min(5.0, settings.wecom_timeout), settings.wecom_timeout)
        self.api_base = settings.api_base
        self.token_store = token_store or MemoryTokens()
        self.observe = observe or (lambda api, errcode: None)
        self.timeout = timeout
        self._secret = settings.contact_secret
        self._key = token_key(settings.corp_id, settings.contact_secret)
        self._wechat = _WeChatClient(settings.corp_id, settings.contact_secret, settings.api_base, timeout)
        # watched department → the department ids its last listing covered (itself and, with fetch_child,
        # its descendants): the scope check matches an event's Department list against these.
        self.covered: dict[int, tuple[int, ...]] = {}

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._wechat._http.close()

    def check_token(self) -> None:
        """Fetch a fresh access token: proves the corp id, the secret and the route to WeCom."""
        self._fetch_token()

    def list_members(self, department_ids, fetch_child: bool = False) -> dict[int, list[Member]]:
        """Members of each watched department (and its sub-departments with fetch_child), one per userid."""
        listed: dict[int, list[Member]] = {}  # one user/list call per department per invocation
        dept_users = None  # userid → departments from user/list_id, once user/list answered 48009
        result = {}
        for watched in department_ids:
            wanted = self._subtree(watched) if fetch_child else (watched,)
            self.covered[watched] = wanted
            if dept_users is None:
                try:
                    for department in wanted:
                        if department not in listed:
                            listed[department] = self._user_list(department)
                except WeComError as exc:
                    if exc.errcode != 48009:
                        raise
                    dept_users = self._dept_users()
            if dept_users is None:
                members = [member for department in wanted for member in listed[department]]
            else:
                members = [Member(userid, departments=departments) for userid, departments in dept_users.items()
                           if not set(wanted).isdisjoint(departments)]
            result[watched] = _unique(members)
        return result

    def _user_list(self, department_id: int) -> list[Member]:
        page = self._call("get", "user/list", params={"department_id": department_id})
        return [_member(user) for user in page.get("userlist") or []]

    def _subtree(self, department_id: int) -> tuple[int, ...]:
        """The department and all its descendants (department/simplelist recurses)."""
        page = self._call("get", "department/simplelist", params={"id": department_id})
        ids = [int(d["id"]) for d in page.get("department_id") or []]
        return tuple(dict.fromkeys([department_id, *ids]))

    def _dept_users(self) -> dict[str, tuple[int, ...]]:
        """Every member's departments from user/list_id (no names or addresses), page by page."""
        departments: dict[str, list[int]] = {}
        cursor = ""
        for _ in range(LIST_ID_MAX_PAGES):
            body = {"cursor": cursor, "limit": LIST_ID_PAGE} if cursor else {"limit": LIST_ID_PAGE}
            page = self._call("post", "user/list_id", data=body)
            for row in page.get("dept_user") or []:
                departments.setdefault(row["userid"], []).append(int(row["department"]))
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return {userid: tuple(ids) for userid, ids in departments.items()}
        raise WeComError(f"user/list_id kept paging past {LIST_ID_MAX_PAGES} pages; will retry later")

    def _call(self, method: str, api: str, params: dict | None = None, **kwargs) -> dict:
        """One API call with the shared token; on 40014/42001 refresh at most once and re-issue once."""
        rejected = errcode = None
        for _ in range(2):
            token = self._token(rejected)
            query = {**(params or {}), "access_token": token}
            try:
                return self._attempt(api, lambda: getattr(self._wechat, method)(api, params=query, **kwargs),
                                     token)
            except WeComError as exc:
                if exc.errcode not in TOKEN_REJECTED:
                    raise
                rejected, errcode = token, exc.errcode
        raise WeComError(f"WeCom rejected a freshly fetched access token (errcode {errcode}) for {api}: "
                         "check WECOM_CORP_ID and WECOM_CONTACT_SECRET", errcode, permanent=True)

    def _token(self, rejected: str | None = None) -> str:
        """The shared token unless it expires within a minute or was just rejected; else a fresh one."""
        stored = self.token_store.get(self._key)
        if stored and stored[0] != rejected and stored[1] - 60 > time.time():
            return stored[0]
        return self._fetch_token()  # another process may have refreshed it already: then `stored` differs

    def _fetch_token(self) -> str:
        result = self._attempt("gettoken", self._wechat.fetch_access_token)
        token = result.get("access_token")
        if not token:
            raise WeComError(f"WeCom gettoken at {self.api_base} answered without an access_token; will retry")
        self.token_store.put(self._key, token, time.time() + int(result.get("expires_in") or 7200))
        return token

    def _attempt(self, api: str, send, token: str | None = None) -> dict:
        """One HTTP call: the decoded answer, or WeComError; each call is reported to `observe` once."""
        try:
            result = send()
        except requests.Timeout:
            raise self._failed(api, "timeout", f"WeCom {api} did not answer in time; will retry") from None
        except (requests.HTTPError, WeChatClientException) as exc:
            if getattr(exc, "errcode", None) is None:
                raise self._http_failed(api, getattr(exc.response, "status_code", 0)) from None
            raise self._errcode_failed(api, int(exc.errcode), self._mask(str(exc.errmsg), token)) from None
        except requests.RequestException:
            raise self._failed(api, "network", f"cannot reach WeCom at {self.api_base} for {api}: check the "
                                               "network, proxy and WECOM_API_BASE; will retry") from None
        if not isinstance(result, dict):
            raise self._failed(api, "bad_response", f"WeCom {api} answered something that is not JSON; will retry")
        self.observe(api, 0)
        return result

    def _failed(self, api: str, outcome, message: str, errcode=None, permanent=False) -> WeComError:
        self.observe(api, outcome)
        return WeComError(message, errcode, permanent)

    def _http_failed(self, api: str, status: int) -> WeComError:
        if status >= 500 or status == 429:
            return self._failed(api, f"http_{status}", f"WeCom {api} answered HTTP {status}; will retry")
        return self._failed(api, f"http_{status}", f"WeCom {api} answered HTTP {status}: check that "
                                                   f"WECOM_API_BASE ({self.api_base}) is the WeCom API root",
                            permanent=True)

    def _errcode_failed(self, api: str, errcode: int, errmsg: str) -> WeComError:
        said = f"(errcode {errcode}: {errmsg})"
        if errcode in TRANSIENT:
            return self._failed(api, errcode, f"{TRANSIENT[errcode]} {said}; will retry", errcode)
        if errcode in TOKEN_REJECTED:  # not final: _call refreshes the token once
            return self._failed(api, errcode, f"WeCom rejected the access token {said}", errcode)
        advice = PERMANENT.get(errcode, "the call was refused; look the errcode up in WeCom's error list")
        return self._failed(api, errcode, f"WeCom {api}: {advice.format(api=api)} {said}", errcode, True)

    def _mask(self, text: str, token: str | None) -> str:
        for value in (self._secret, token):
            if value:
                text = text.replace(value, "***")
        return text


def _member(user: dict) -> Member:
    return Member(userid=str(user["userid"]), name=user.get("name") or "",
                  departments=tuple(int(d) for d in user.get("department") or ()),
                  email=user.get("email") or "", biz_mail=user.get("biz_mail") or "")


def _unique(members: list[Member]) -> list[Member]:
    """First occurrence of each userid, in order (a member may sit in several listed departments)."""
    seen: dict[str, Member] = {}
    for member in members:
        seen.setdefault(member.userid, member)
    return list(seen.values())
