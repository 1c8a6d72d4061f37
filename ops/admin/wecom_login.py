"""Sign in to /admin with WeCom: 302 to WeCom's QR login (or its OAuth2 page inside WeCom's browser), then the
callback turns the code into a userid (auth/getuserinfo, the app's token) and opens a session for an
allow-listed one (ADMIN_USERIDS).

The `state` sent to WeCom is random, kept server-side (store/sign_in_states.py), taken once, and bound to the
browser that asked for it by a pre-session cookie. The code WeCom hands back is used once and never logged.
"""
from __future__ import annotations

import secrets
from urllib.parse import urlencode

from flask import abort, current_app, g, make_response, redirect, render_template, request, url_for

import services
import wecom_api
import ops.admin.sessions as sessions
import ops.admin.trail as trail
from ops.admin.blueprint import bp, engine, log, settings
from store import sessions as session_store
from store import sign_in_states

VISITOR_COOKIE = "wecom_mailer_signin"  # the pre-session: which browser a state was handed to
# The session cookie is SameSite=Strict, and a browser withholds it on the redirect that follows a sign-in
# begun on WeCom's site; this short-lived Lax marker lets the next page re-load itself once (same-site).
JUST_SIGNED_IN = "wecom_mailer_signed_in"
CALLBACK_PATH = "/admin/login/wecom/callback"


def _cookie_args(path: str) -> dict:
    return {"path": path, "secure": services.of(current_app).settings.admin_cookie_secure, "httponly": True,
            "samesite": "Lax"}  # Lax: WeCom sends the browser back with a top-level GET from its own site


def _enabled():
    if not settings().admin_userids:
        abort(404)


@bp.before_request
def hand_over_after_sign_in():
    """Right after a WeCom sign-in, a page that got no session cookie re-loads itself once, same-site."""
    if (request.method != "GET" or not request.cookies.get(JUST_SIGNED_IN) or request.cookies.get(sessions.cookie_name())
            or request.endpoint in ("admin.wecom_login", "admin.wecom_callback")):
        return None
    response = make_response(render_template("admin/reload.html", target=request.full_path.rstrip("?")))
    response.delete_cookie(JUST_SIGNED_IN, **_cookie_args("/admin"))
    return response


@bp.get("/login/wecom")
def wecom_login():
    """302 to WeCom: its OAuth2 page inside WeCom's own browser (User-Agent `wxwork`), else its QR login."""
    _enabled()
    s = settings()
    visitor = sign_in_states.new_visitor()
    state = sign_in_states.begin(engine(), visitor)
    redirect_uri = s.public_url + CALLBACK_PATH
    if "wxwork" in request.headers.get("User-Agent", "").lower():
        query = {"appid": s.corp_id, "redirect_uri": redirect_uri, "response_type": "code", "scope": "snsapi_base",
                 "state": state, "agentid": s.agent_id}
        target = f"{s.oauth_url}?{urlencode(query)}#wechat_redirect"
    else:
        query = {"login_type": "CorpApp", "appid": s.corp_id, "agentid": s.agent_id, "redirect_uri": redirect_uri,
                 "state": state}
        target = f"{s.qr_login_url}?{urlencode(query)}"
    response = redirect(target)
    response.set_cookie(VISITOR_COOKIE, visitor, max_age=sign_in_states.LIFETIME_SECONDS,
                        **_cookie_args("/admin/login/wecom"))
    return response


def _refused(status: int, message: str, why: str):
    log.warning("WeCom sign-in refused from %s: %s", trail.client(), why)
    return render_template("admin/error.html", message=message), status


@bp.get("/login/wecom/callback")
def wecom_callback():
    """WeCom's redirect back: check the state, exchange the code, open a session for an allowed userid."""
    _enabled()
    problem = sign_in_states.take(engine(), request.args.get("state"), request.cookies.get(VISITOR_COOKIE))
    if problem is not None:
        return _refused(400, f"登录状态无效（{problem}），请重新登录。Sign-in state {problem}: start the sign-in again "
                             "from the login page.", f"state {problem}")
    code = request.args.get("code", "")
    if not code or len(code) > 512:
        return _refused(400, "企业微信未返回授权码 WeCom sent no code back: start the sign-in again.", "no code")
    client = services.of(current_app).app_client()
    try:
        userid, outsider = client.user_for_code(code)
    except wecom_api.WeComError as exc:
        if exc.permanent:
            return _refused(400, "企业微信拒绝了授权码（已用过、已过期或来自其他登录），请重新登录。WeCom refused the code "
                                 "(used, expired or from another sign-in): start again.", str(exc))
        return _refused(502, "暂时无法连接企业微信，请稍后再试。WeCom cannot be reached right now: try again shortly.",
                        str(exc))
    finally:
        client.close()
    allowed = {u.lower(): u for u in settings().admin_userids}
    if not userid or userid.lower() not in allowed:
        who = userid or f"openid:{outsider}"
        trail.record("sign-in-refused", detail="not a member of the corp" if not userid else "not in ADMIN_USERIDS",
                     actor=who)
        return _refused(403, f"{who} 无权登录管理页面。{who} may not sign in to /admin (ADMIN_USERIDS).",
                        f"{who} is not allowed")
    actor = allowed[userid.lower()]
    if g.admin_session is not None:  # a fresh session: the id this browser had before stops working
        session_store.end_session(engine(), g.admin_session.session_id)
    response = redirect(url_for("admin.events"))
    sessions.start_session(response, trail.client(), csrf=secrets.token_urlsafe(32), actor=actor)
    response.delete_cookie(VISITOR_COOKIE, **_cookie_args("/admin/login/wecom"))
    response.set_cookie(JUST_SIGNED_IN, "1", max_age=60, **_cookie_args("/admin"))
    trail.record("sign-in", detail="WeCom", actor=actor)
    log.info("admin sign-in with WeCom: %s from %s", actor, trail.client())
    return response
