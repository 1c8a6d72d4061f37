#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when GET /healthz answers 200 within 3 s, 1 otherwise (stdlib only).

`healthcheck.py --heartbeat FILE [--max-age SECONDS]` checks a delivery worker instead, which serves no HTTP:
exit 0 while FILE (WORKER_HEARTBEAT_FILE, touched by every round of its loop) is younger than SECONDS (60).
"""
import os
import sys
import time
import urllib.request


def healthz_url() -> str:
    """http://127.0.0.1:PORT/healthz, PORT from BIND (host:port, as gunicorn.conf.py reads it), default 8000."""
    if os.environ.get("HEALTHCHECK_URL"):
        return os.environ["HEALTHCHECK_URL"]
    port = os.environ.get("BIND", "").rpartition(":")[2]
    return f"http://127.0.0.1:{port if port.isdigit() else '8000'}/healthz"


def heartbeat(path: str, max_age: float) -> int:
    """0 when `path` was touched within `max_age` seconds; 1 (with the reason) otherwise."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError as exc:
        print(f"healthcheck: heartbeat {path}: {exc.strerror} (has the worker's loop started?)", file=sys.stderr)
        return 1
    if age > max_age:
        print(f"healthcheck: heartbeat {path} is {age:.0f} s old (more than {max_age:g}): the delivery loop "
              "is stuck", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--heartbeat"] and len(argv) in (2, 4):
        max_age = float(argv[3]) if len(argv) == 4 and argv[2] == "--max-age" else 60.0
        return heartbeat(argv[1], max_age)
    url = healthz_url()
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # refused, timeout, HTTP error: unhealthy; the reason shows in `docker inspect`
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
