"""Send prepared callbacks to 127.0.0.1 at a fixed rate and report each answer (run as a separate process).

    python loadgen.py URL PACKETS.jsonl RATE  →  one JSON object on stdout:
    {"answers": [[status, seconds to answer, seconds late to start], ...], "seconds": total}

Bounded: it sends exactly the lines of PACKETS.jsonl, each request with a 5 s timeout.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import requests

THREADS = 64


def main(url: str, packets_path: str, rate: float) -> None:
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("loadgen sends to 127.0.0.1 only")
    packets = [json.loads(line) for line in open(packets_path, encoding="utf-8")]
    local = threading.local()
    answers: list = [None] * len(packets)

    def send(index: int, due: float) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.monotonic()
        try:
            response = session.post(f"{url}?{packets[index]['query']}", data=packets[index]["body"].encode(),
                                    headers={"Content-Type": "text/xml"}, timeout=5)
            status = response.status_code if response.text == "success" else -response.status_code
        except requests.RequestException as exc:
            status = f"{exc.__class__.__name__}"
        answers[index] = [status, time.monotonic() - started, started - due]

    begin = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        for index in range(len(packets)):
            due = begin + index / rate
            time.sleep(max(0.0, due - time.monotonic()))  # pacing the load at `rate` (the scenario, not a wait)
            pool.submit(send, index, due)
    json.dump({"answers": answers, "seconds": time.monotonic() - begin}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
