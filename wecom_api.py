"""The WeCom server API: an access token shared between processes, and the members of departments."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import requests
from wechatpy.enterprise import WeChatClient
from wechatpy.exceptions import WeChatClientException

import config
from store import tokens


@dataclass(frozen=True)
class Member:
    """A department member as the WeCom API lists them (addresses may be withheld: empty)."""

    userid: str
    name: str = ""
    departments: tuple[int, ...] = ()
    email: str = ""
    biz_mail: str = ""


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

    def __init__(self, settings, token_store=None, observe=None, timeout: tuple[float, float] | None = None,
                 secret: str | None = None):
        # `secret`: the self-built app's (WECOM_APP_SECRET) for message/send and sign-in; default the
        # contact-sync secret. Tokens are stored under a digest of the secret, so the two never mix.
        secret = secret or settings.contact_secret
        # (connect, read) seconds; the read timeout is WECOM_TIMEOUT_SECONDS (default 15).
        timeout = timeout or (min(5.0, settings.wecom_timeout), settings.wecom_timeout)
        self.api_base = settings.api_base
        self.token_store = token_store or MemoryTokens()
        self.observe = observe or (lambda api, errcode: None)
        self.timeout = timeout
        self._secret = secret
        self._key = token_key(settings.corp_id, secret)
        self._wechat = _WeChatClient(settings.corp_id, secret, settings.api_base, timeout)
        # watched department → the department ids its last listing covered (itself and, with fetch_child,
        # its descendants): the scope check matches an event's Department list against these.
        self.covered: dict[int, tuple[int, ...]] = {}

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._wechat._http.close()

    def check_token(self) -> None:
        """Fetch a fresh access token: proves the corp id, the secret and the route to WeCom."""
        self._fetch_token()

    def call(self, method: str, api: str, params: dict | None = None, **kwargs) -> dict:
        """Any API call ("get"/"post", e.g. "message/send", data=…) with the shared token, refreshed once."""
        return self._call(method, api, params, **kwargs)

    def user_for_code(self, code: str) -> tuple[str, str]:
        """WeCom sign-in (auth/getuserinfo, the app's token): (userid, "") for a member of the corp, ("", openid)
        for anyone else. The code is single-use and never appears in an error message."""
        try:
            result = self._call("get", "auth/getuserinfo", params={"code": code})
        except WeComError as exc:
            raise WeComError(str(exc).replace(code, "***") if code else str(exc), exc.errcode, exc.permanent) from None
        userid = result.get("userid") or result.get("UserId") or ""
        outsider = result.get("openid") or result.get("OpenId") or result.get("external_userid") or ""
        return str(userid), str(outsider if not userid else "")

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
        # Stored sealed (store/tokens.py); a row that does not open (clear, another secret's) is refetched.
        token = tokens.unseal(stored[0], self._secret, self._key) if stored else None
        if token and token != rejected and stored[1] - 60 > time.time():
            config.remember_secret(token)
            return token
        return self._fetch_token()  # another process may have refreshed it already: then `stored` differs

    def _fetch_token(self) -> str:
        result = self._attempt("gettoken", self._wechat.fetch_access_token)
        token = result.get("access_token")
        if not token:
            raise WeComError(f"WeCom gettoken at {self.api_base} answered without an access_token; will retry")
        config.remember_secret(token)  # masked in every log line of this process from now on
        self.token_store.put(self._key, tokens.seal(token, self._secret, self._key),
                             time.time() + int(result.get("expires_in") or 7200))
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
