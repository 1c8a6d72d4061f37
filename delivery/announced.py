"""One announcement per change: what a callback's expansion does to the announced membership.

Each membership change a callback carries (create_user into a watched department, update_user moving someone
in or out, delete_user; NewUserID renames) is marked by compare-and-set. Where reconciliation announced the
same change first, the callback announces nothing again; where the callback marks it first, reconciliation
finds nothing to announce.
"""
from __future__ import annotations

from delivery.reconcile import local_time
from store import membership
from store.snapshots import load_snapshots

# WeCom's CreateTime and our clock may differ a little: an update stamped this soon after reconciliation
# first saw the change it announced is taken for the callback of that same change.
CLOCK_SKEW_SECONDS = 60


def record_callback(worker, row, change, touched: list[int]) -> tuple[list[int], dict[int, float]]:
    """Mark the callback's membership changes; return the departments to notify, and those where
    reconciliation announced this change already (department → when)."""
    if row.source != "callback" or not change.is_member_change:
        return touched, {}
    engine, watched = worker.engine, worker.settings.department_ids
    userid = change.fields.get("newuserid") or change.user_id
    if userid != change.user_id:
        membership.rename(engine, change.user_id, userid)
    covered = {department_id: ids for department_id, (ids, _) in load_snapshots(engine, watched, ()).items()}
    already, moved, left = {}, [], []
    for department_id, state in transitions(change, watched, covered).items():
        mark = membership.mark(engine, department_id, userid, state, "callback", row.id, change.create_time,
                               change.name, create=state == "joined")
        ours = mark.changed or (mark.row is not None and mark.row.event_id == row.id
                                and mark.row.announced_by == "callback")  # expanded again after a postponement
        if ours:
            moved.append(department_id)
            if state == "left":
                left.append(department_id)  # announced as a member: notify it even if the snapshot forgot them
        elif _announced_by_reconciliation(mark.row, change):
            already[department_id] = mark.row.announced_at
    if worker.settings.notify_scope == "corp":  # every change goes to every watched department
        return ([] if already and not moved else touched), already
    return [d for d in dict.fromkeys([*touched, *left]) if d not in already], already


def transitions(change, watched, covered: dict[int, set[int]]) -> dict[int, str]:
    """The state (joined / left) the change puts the member in, per watched department it says anything about."""
    if change.change_type == "delete_user":
        return {department_id: "left" for department_id in watched}
    if "department" not in change.fields:
        return {}
    listed = set(change.departments)
    result = {}
    for department_id in watched:
        if covered.get(department_id, {department_id}) & listed:
            result[department_id] = "joined"
        elif change.change_type == "update_user":
            result[department_id] = "left"
    return result


def _announced_by_reconciliation(current, change) -> bool:
    """Whether reconciliation announced the change this callback carries (not another one of the same member)."""
    if current is None or current.announced_by != "reconcile":
        return False
    if change.change_type != "update_user":
        return True  # a create or a delete of the member it announced as joined / left
    # An update also comes for other fields: it is the announced change only if it happened before
    # reconciliation first saw that change.
    return (change.create_time is not None and current.changed_at is not None
            and change.create_time <= current.changed_at + CLOCK_SKEW_SECONDS)


def ignored_reason(already: dict[int, float], tz) -> str:
    """Why a callback that notifies nobody ends ignored."""
    if already:
        return f"already announced by reconciliation at {local_time(min(already.values()), tz)}"
    return "not a change to a member of a watched department"
