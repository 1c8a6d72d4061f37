"""When to try again: the retry schedule shared by SMTP and WeCom failures."""
from __future__ import annotations

MAX_DELAY_SECONDS = 3600.0


def seconds(attempts: int, first: float) -> float:
    """Delay before the next try: `first` (RETRY_BACKOFF_SECONDS), doubling per attempt, capped at one hour."""
    return min(first * 2 ** max(attempts - 1, 0), MAX_DELAY_SECONDS)
