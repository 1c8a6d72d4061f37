"""`check`'s lines about bounces: the last 7 days by kind, whether the sender is blocked, suppressed members per
watched department, and whether EMAIL_PATTERN's guesses mostly bounce."""
from __future__ import annotations

import time

from sqlalchemy.exc import DBAPIError

from ops import report
from store import bounce_stats, suppressions

WEEK = 7 * 86400
SHOWN = (("hard", "hard"), ("soft", "soft"), ("sender_blocked", "sender blocked"), ("delayed", "delayed"),
         ("unmatched", "unmatched"))


def bounce_lines(engine, settings, now: float | None = None) -> list[tuple[bool, str]]:
    """(ok, line) for each: ✗ while the sender is blocked or most pattern guesses bounced."""
    now = time.time() if now is None else now
    try:
        week = bounce_stats.kinds_since(engine, now - WEEK)
        suppressed = suppressions.count(engine)
        blocked = bounce_stats.sender_blocked(engine, now)
        by_department = bounce_stats.suppressed_by_department(engine, settings.department_ids)
        guesses = bounce_stats.pattern_guesses(engine)
    except DBAPIError as exc:
        return [(False, f"bounces: {exc.orig.__class__.__name__} reading their state")]
    counts = ", ".join(f"{week.get(kind, 0)} {label}" for kind, label in SHOWN)
    lines = [(True, f"bounces in the last 7 days: {counts}; {suppressed} address(es) suppressed "
                    "(`flask --app app suppressions`)")]
    for department_id, n in by_department.items():
        lines.append((True, f"department {department_id}: {n} member(s) last mailed at a suppressed address"))
    if blocked is not None:
        at, reason, n = blocked
        lines.append((False, f"sender blocked: {n} report(s) in 24 h, the latest {report.local_time(at, settings.tz)}: "
                             f"{reason[:200]} — check SPF/DKIM/DMARC of MAIL_FROM's domain, SMTP_MAX_PER_MINUTE and "
                             "the template's content; every other member is about to bounce the same way"))
    warning = bounce_stats.pattern_warning(*guesses)
    if warning:
        lines.append((False, warning))
    return lines
