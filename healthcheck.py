#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when GET /healthz answers 200 within 3 s, 1 otherwise (stdlib only)."""
import os
import sys
import urllib.request


def healthz_url() -> str:
    """http://127.0.0.1:PORT/healthz, PORT from BIND (host:port, as gunicorn.conf.py reads it), default 8000."""
    if os.environ.get("HEALTHCHECK_URL"):
        return os.environ["HEALTHCHECK_URL"]
    port = os.environ.get("BIND", "").rpartition(":")[2]
    return f"http://127.0.0.1:{port if port.isdigit() else '8000'}/healthz"


def main() -> int:
    url = healthz_url()
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # refused, timeout, HTTP error: unhealthy; the reason shows in `docker inspect`
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
