"""`check` for WeCom application messages: the app's token, the agent (agent/get), each watched department
within its 可见范围, and how many members each channel would reach under today's settings."""
from __future__ import annotations

import wecom_api
from channels import wecom_message
from store import addressbook

MAX_PARTIES = 50  # visible departments expanded into their sub-departments (department/simplelist each)


def run(parts, contact_client, state_ok: bool) -> list[tuple[bool, str]]:
    """The lines of `check` about the app and the channels."""
    settings = parts.settings
    mode = settings.wecom_message
    if settings.agent_id is None or not settings.app_secret:
        if mode == "off":  # nothing to check; the department lines count who has no address
            return []
        return [(False, f"WeCom messages: WECOM_MESSAGE={mode} needs WECOM_AGENT_ID and WECOM_APP_SECRET")]
    client = parts.app_client() if state_ok else wecom_api.WeComClient(settings, secret=settings.app_secret)
    try:
        client.check_token()
    except wecom_api.WeComError as exc:
        return [(False, f"WeCom app token (WECOM_APP_SECRET): {_explained(exc)}")]
    results = [(True, "WeCom app token (WECOM_APP_SECRET): access token obtained")]
    try:
        agent = client.call("get", "agent/get", params={"agentid": settings.agent_id})
    except wecom_api.WeComError as exc:
        return results + [(False, f"WeCom agent {settings.agent_id} (agent/get): {_explained(exc)}")]
    parties = [int(p) for p in (agent.get("allow_partys") or {}).get("partyid") or []]
    users = {str(u.get("userid", "")).lower() for u in (agent.get("allow_userinfos") or {}).get("user") or []}
    results.append((True, f"WeCom agent {settings.agent_id} (agent/get): {agent.get('name') or 'unnamed'}, "
                          f"visible to {len(parties)} department(s) and {len(users)} member(s) by name"))
    visible_departments = _subtrees(contact_client, parties)
    for department_id in settings.department_ids:
        try:
            members = contact_client.list_members([department_id], settings.fetch_child)[department_id]
        except wecom_api.WeComError as exc:
            results.append((False, f"WeCom messages, department {department_id}: not listed ({exc})"))
            continue
        visible = [m for m in members if m.userid.lower() in users or
                   department_id in visible_departments or set(m.departments) & visible_departments]
        if department_id in visible_departments or len(visible) == len(members):
            results.append((True, f"WeCom messages, department {department_id}: within the app's 可见范围"))
        else:
            results.append((False, f"WeCom messages, department {department_id}: {len(members) - len(visible)} of "
                                   f"{len(members)} member(s) outside the app's 可见范围 (visible range) — add the "
                                   "department in 应用管理 > the app > 可见范围"))
        if state_ok:
            results.append(channel_counts(parts, department_id, members, {m.userid for m in visible}))
    return results


def channel_counts(parts, department_id: int, members, visible: set[str]) -> tuple[bool, str]:
    """How many members would go by each channel under WECOM_MESSAGE, and who by neither (and why)."""
    settings, mode = parts.settings, parts.settings.wecom_message
    resolved = addressbook.resolve(settings, parts.engine, members)
    email = wecom = 0
    no_address = not_visible = 0
    for member, address in resolved:
        by_email = bool(address) and mode != "only"
        by_wecom = member.userid in visible and (mode in ("all", "only") or (mode == "fallback" and not address))
        email += by_email
        wecom += by_wecom
        if not (by_email or by_wecom):
            if member.userid not in visible and mode != "off":
                not_visible += 1
            else:
                no_address += 1
    neither = no_address + not_visible
    why = []
    if no_address:
        why.append(f"{no_address} without an address" + (" (WECOM_MESSAGE=off)" if mode == "off" else ""))
    if not_visible:
        why.append(f"{not_visible} outside the app's 可见范围")
    line = (f"channels, department {department_id} (WECOM_MESSAGE={mode}): {email} by email, {wecom} by WeCom "
            f"message, {neither} by neither" + (f" ({', '.join(why)})" if why else ""))
    return not neither, line


def _subtrees(contact_client, parties: list[int]) -> set[int]:
    """The visible departments and their descendants (a department inside a visible one is visible)."""
    found = set(parties)
    for party in parties[:MAX_PARTIES]:
        try:
            page = contact_client.call("get", "department/simplelist", params={"id": party})
        except wecom_api.WeComError:
            continue
        found.update(int(d["id"]) for d in page.get("department_id") or [])
    return found


def _explained(exc: wecom_api.WeComError) -> str:
    return wecom_message.explain(exc.errcode) or str(exc)
