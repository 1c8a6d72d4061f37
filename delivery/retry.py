"""When to try again and when to give up: the retry schedule shared by SMTP and WeCom failures."""
from __future__ import annotations

from mailer import SendResult

MAX_DELAY_SECONDS = 3600.0


def backoff_seconds(attempts: int, first: float) -> float:
    """Delay before the next try: `first` (RETRY_BACKOFF_SECONDS), doubling per attempt, capped at one hour."""
    return min(first * 2 ** max(attempts - 1, 0), MAX_DELAY_SECONDS)


def outcome(settings, result: SendResult, attempts: int, first_attempt_at: float | None, now: float) -> dict:
    """The delivery columns a result leads to: sent, retry with backoff, or failed (permanent, or given up
    after RETRY_MAX_HOURS counted from the first attempt)."""
    attempts += 1
    first = first_attempt_at or now
    if result.ok:
        return {"status": "sent", "sent_at": now, "attempts": attempts, "first_attempt_at": first, "reason": None}
    if result.permanent or now - first > settings.retry_max_hours * 3600:
        reason = result.reason if result.permanent else f"gave up after {attempts} attempts: {result.reason}"
        return {"status": "failed", "attempts": attempts, "first_attempt_at": first, "reason": reason[:1000]}
    return {"status": "retry", "attempts": attempts, "first_attempt_at": first, "reason": result.reason[:1000],
            "next_attempt_at": now + backoff_seconds(attempts, settings.retry_backoff)}
