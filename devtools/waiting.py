"""The one way tests and benchmarks wait: for a condition, bounded in time, failing with what was awaited."""
from __future__ import annotations

import time


def wait_until(condition, timeout: float = 30, interval: float = 0.05, what: str | None = None):
    """Poll `condition` until it returns something truthy and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or _describe(condition)}")
        time.sleep(interval)


def _describe(condition) -> str:
    code = getattr(condition, "__code__", None)
    return f"{condition.__qualname__} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})" if code else \
        repr(condition)
