"""A stand-in for the WeCom server API on 127.0.0.1, with scripted faults (tests, `make demo`, benchmarks).

`python wecom_standin.py --corp-id ID --secret S --department 2 --members 5 [--port 0]` prints
`WECOM_API_BASE=http://127.0.0.1:PORT/cgi-bin/` and serves until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import collections
import json
import secrets
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from devtools.wecom_standin_app import AppMessages, _int, _json

SURNAMES = "张王李赵刘陈杨黄周吴"
GIVEN_NAMES = ("伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "勇", "军", "杰", "娟")
PAGE_LIMIT = 10000  # user/list_id's largest page
QR_PAGE, OAUTH_PAGE = "/wwlogin/sso/login", "/connect/oauth2/authorize"  # WeCom sign-in (issue 22)
SIGN_IN_PAGES = (QR_PAGE, OAUTH_PAGE)


def make_members(n: int, department_id: int, prefix: str = "user", domain: str = "corp.example",
                 email: bool = True) -> list[dict]:
    """`n` members of one department as user/list returns them: user0001, user0002, …"""
    members = []
    for i in range(1, n + 1):
        userid = f"{prefix}{i:04d}"
        members.append({"userid": userid, "name": SURNAMES[i % 10] + GIVEN_NAMES[i % 12],
                        "department": [department_id], "email": f"{userid}@{domain}" if email else "",
                        "biz_mail": "", "status": 1})
    return members


class WeComStandIn(AppMessages):
    """gettoken, user/list, department/simplelist and user/list_id, answered from memory; the self-built
    app's agent/get and message/send come from AppMessages (devtools/wecom_standin_app.py)."""

    def __init__(self, corp_id: str, secret: str, departments: dict[int, list[dict]] | None = None,
                 children: dict[int, list[int]] | None = None, port: int = 0):
        self.corp_id, self.secret = corp_id, secret
        self.children = {int(parent): [int(c) for c in kids] for parent, kids in (children or {}).items()}
        self.calls: collections.Counter[str] = collections.Counter()
        self.tokens_issued = 0
        self._port = port
        self._lock = threading.Lock()
        self._members: dict[int, list[dict]] = {}
        self._userlist: dict[int, bytes] = {}  # pre-serialised: a 10,000-member answer costs no JSON work
        self._tokens: dict[str, bool] = {}  # issued token → still valid
        self._scripts: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._forever: dict[str, dict] = {}
        self._stopping = threading.Event()  # wakes scripted sleeps on stop()
        self._server: ThreadingHTTPServer | None = None
        self._init_messages()  # the self-built app's block (application messages), below
        for department_id, members in (departments or {}).items():
            self.set_members(department_id, members)

    def set_members(self, department_id: int, members: list[dict]) -> None:
        """Replace the members user/list answers for `department_id`."""
        answer = _json({"errcode": 0, "errmsg": "ok", "userlist": members})
        with self._lock:
            self._members[int(department_id)], self._userlist[int(department_id)] = list(members), answer

    def script(self, api_path: str, *responses) -> None:
        """Queue answers for `api_path`: a dict, ("http", status), ("sleep", seconds) or ("forever", dict)."""
        with self._lock:
            self._scripts[api_path].extend(responses)

    def clear_script(self) -> None:
        """Forget queued and forever answers: every path answers normally again."""
        with self._lock:
            self._scripts.clear()
            self._forever.clear()

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 42001."""
        with self._lock:
            self._tokens = dict.fromkeys(self._tokens, False)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/cgi-bin/"

    def start(self) -> WeComStandIn:
        """Listen on 127.0.0.1 (port 0: a free one) and serve in a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)
        self._server.standin = self
        # A short poll interval makes stop() quick: tests start and stop one stand-in each.
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="wecom-standin",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> WeComStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def answer(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        """HTTP status and body for one request."""
        url = urlsplit(target)
        path = url.path.removeprefix("/cgi-bin/")
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if url.path in SIGN_IN_PAGES:  # WeCom sign-in (issue 22): the pages a browser is sent to
            return self._sign_in_page(url.path, query)
        with self._lock:
            self.calls[path] += 1
            scripted = self._next_scripted(path)
        match scripted:
            case ("sleep", seconds):  # then answer normally: the client's read timeout decides
                self._stopping.wait(seconds)
            case ("http", status):
                return status, b"<html><body>scripted failure</body></html>"
            case dict():
                return 200, _json(scripted)
        return self._route(method, path, query, body)

    def _next_scripted(self, path: str):
        if path in self._forever:
            return self._forever[path]
        response = self._scripts[path].popleft() if self._scripts[path] else None
        if isinstance(response, tuple) and response[0] == "forever":
            self._forever[path] = response = response[1]
        return response

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, bytes]:
        if path == "gettoken" and method == "GET":
            return 200, _json(self._gettoken(query))
        routes = {("GET", "user/list"): self._user_list, ("GET", "department/simplelist"): self._simplelist,
                  ("POST", "user/list_id"): self._list_id, **self._message_routes()}
        handler = routes.get((method, path)) or self._sign_in_routes().get((method, path))
        if handler is None:
            return 404, b"not found"
        with self._lock:
            valid = self._tokens.get(query.get("access_token", ""))
        if valid is None:
            return 200, _json({"errcode": 40014, "errmsg": "invalid access_token"})
        if not valid:
            return 200, _json({"errcode": 42001, "errmsg": "access_token expired"})
        return 200, handler(query, body)

    def _gettoken(self, query: dict) -> dict:
        if query.get("corpid") != self.corp_id:
            return {"errcode": 40013, "errmsg": "invalid corpid"}
        app = self.app_secret is not None and query.get("corpsecret") == self.app_secret
        if query.get("corpsecret") not in (self.secret, *self.app_secrets) and not app:
            return {"errcode": 40001, "errmsg": "invalid secret"}
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = True
            self.tokens_issued += 1
            if app:
                self.app_tokens.add(token)
        return {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200}

    def _known(self, department_id: int | None) -> bool:
        kids = {kid for children in self.children.values() for kid in children}
        with self._lock:
            return department_id in {*self._members, *self.children, *kids}

    def _user_list(self, query: dict, _body: bytes) -> bytes:
        department_id = _int(query.get("department_id"))
        with self._lock:
            answer = self._userlist.get(department_id)
        if answer is None:
            answer = _json({"errcode": 0, "errmsg": "ok", "userlist": []} if self._known(department_id)
                           else {"errcode": 60123, "errmsg": "invalid department"})
        return answer

    def _simplelist(self, query: dict, _body: bytes) -> bytes:
        root = _int(query.get("id"))
        if not self._known(root):
            return _json({"errcode": 60123, "errmsg": "invalid department"})
        rows, queue = [], [(root, 0)]
        while queue:  # the department and every descendant, as WeCom answers
            department_id, parent = queue.pop(0)
            rows.append({"id": department_id, "parentid": parent, "order": 100000000 - len(rows)})
            queue.extend((kid, department_id) for kid in self.children.get(department_id, []))
        return _json({"errcode": 0, "errmsg": "ok", "department_id": rows})

    def _list_id(self, _query: dict, body: bytes) -> bytes:
        try:
            request = json.loads(body or b"{}")
            start, limit = int(request.get("cursor") or 0), int(request.get("limit") or PAGE_LIMIT)
        except (ValueError, TypeError, AttributeError):
            return _json({"errcode": 47001, "errmsg": "data format error"})
        with self._lock:
            pairs = [{"userid": member["userid"], "department": department_id}
                     for department_id, members in sorted(self._members.items()) for member in members]
        end = start + min(max(limit, 1), PAGE_LIMIT)
        return _json({"errcode": 0, "errmsg": "ok", "dept_user": pairs[start:end],
                      "next_cursor": str(end) if end < len(pairs) else ""})

    # --- WeCom sign-in (issue 22): the QR login and OAuth2 pages, auth/getuserinfo, the app's secret -------
    # The QR page shows a link back to redirect_uri with a fresh code (a browser test clicks it, as a phone
    # scanning the code would); the OAuth2 page answers 302 straight back (silent, as inside WeCom).
    # auth/getuserinfo turns each code into the identity chosen by sign_in_as(), once.

    app_secrets: tuple[str, ...] = ()  # further secrets gettoken accepts: set to (WECOM_APP_SECRET,)
    _signer: dict | None = None  # class defaults: this block leaves __init__ alone
    _codes: dict | None = None

    def sign_in_as(self, userid: str = "", openid: str = "") -> None:
        """Who the next codes belong to: a member's `userid`, or someone outside the corp (`openid`)."""
        with self._lock:
            self._signer = {"userid": userid} if userid else {"openid": openid or "o-outsider"}

    def issue_code(self) -> str:
        """A fresh single-use code for the identity of sign_in_as() (as WeCom's pages hand out)."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes = self._codes or {}
            self._codes[code] = dict(self._signer or {"userid": "zhangsan"})
        return code

    def _sign_in_page(self, page: str, query: dict) -> tuple[int, bytes, dict]:
        import html
        from urllib.parse import urlencode

        with self._lock:
            self.calls[page] += 1
        redirect_uri, state = query.get("redirect_uri", ""), query.get("state", "")
        if query.get("appid") != self.corp_id or not query.get("agentid") or not redirect_uri.startswith("http"):
            return 400, b"stand-in: appid, agentid or redirect_uri missing or wrong", {"Content-Type": "text/plain"}
        back = f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}" + urlencode({"code": self.issue_code(),
                                                                                   "state": state})
        if page == OAUTH_PAGE:
            return 302, b"", {"Location": back}
        who = html.escape(json.dumps(self._signer or {"userid": "zhangsan"}, ensure_ascii=False))
        body = (f'<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>企业微信登录 stand-in</title>'
                f'<p>扫码登录 stand-in: {who}</p><p><a id="confirm" href="{html.escape(back)}">确认登录 Confirm</a></p>')
        return 200, body.encode("utf-8"), {"Content-Type": "text/html; charset=utf-8"}

    def _sign_in_routes(self) -> dict:
        return {("GET", "auth/getuserinfo"): self._getuserinfo}

    def _getuserinfo(self, query: dict, _body: bytes) -> bytes:
        with self._lock:
            identity = (self._codes or {}).pop(query.get("code", ""), None)
        if identity is None:
            return _json({"errcode": 40029, "errmsg": "invalid code"})
        return _json({"errcode": 0, "errmsg": "ok", **identity})




class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled session expects

    def do_GET(self) -> None:
        self._reply("GET")

    def do_POST(self) -> None:
        self._reply("POST")

    def _reply(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, payload, *extra = self.server.standin.answer(method, self.path, body)
        headers = extra[0] if extra else {"Content-Type": "application/json; charset=utf-8"}  # sign-in pages
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (a scripted sleep outlasted its timeout)
            self.close_connection = True

    def log_message(self, *args) -> None:
        """Quiet: one line per request would drown benchmark output."""


def main(argv: list[str] | None = None) -> None:
    """Serve a department of generated members until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="WeCom API stand-in on 127.0.0.1")
    parser.add_argument("--corp-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--department", type=int, default=2)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    departments = {args.department: make_members(args.members, args.department)}
    with WeComStandIn(args.corp_id, args.secret, departments, port=args.port) as standin:
        print(f"WECOM_API_BASE={standin.api_base}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
