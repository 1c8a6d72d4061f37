"""Where a callback's CPU goes under load: py-spy samples the thread holding the GIL in the service's gunicorn
workers while wrk posts distinct signed callbacks (as the ingest row does), and writes a flame graph into
bench/out/ (git-ignored).

    .venv/bin/pip install py-spy            # a dev tool, not a dependency of the service
    .venv/bin/python bench/profile_callbacks.py --seconds 10 [--app bench.durable_floor_app:create_app()]

Needs MariaDB (BENCH_MYSQL_URL) and wrk, like bench/run.py; py-spy needs ptrace rights over the workers.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h  # noqa: E402


def per_pid(out: Path, pid: int) -> Path:
    """One output per gunicorn worker: NAME.PID.svg (or .txt)."""
    return out.with_name(f"{out.stem}.{pid}{out.suffix}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--app", default="app:create_app()", help="gunicorn app spec (default: the service)")
    parser.add_argument("--out", type=Path, default=h.OUT / "callbacks-flame.svg")
    parser.add_argument("--format", default="flamegraph", choices=("flamegraph", "raw"),
                        help="raw: collapsed stacks (text), for reading the shares without a browser")
    parser.add_argument("--rate", type=float, default=0, help="wrk's fixed rate (0: as fast as it answers)")
    args = parser.parse_args()
    if args.format == "raw" and args.out.suffix == ".svg":
        args.out = args.out.with_suffix(".txt")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    h.OUT.mkdir(parents=True, exist_ok=True)
    with h.database("profile") as url:
        h.prepare_state(url)
        env = h.service_env(url, "http://127.0.0.1:9", 9)
        port = h.free_port()
        with h.Service.gunicorn(args.app, env, port, f"profile-{port}") as service:
            count = int(60_000 * args.seconds / 10)
            requests = h.write_requests(h.OUT / f"requests-profile-{port}.txt", count + 4000, f"p{port}x")
            h.wrk(port, requests, 0, 4000, 1)  # warm-up
            spies = [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(round(args.seconds)),
                                       "--rate", "250", "--nonblocking", "--gil", "--format", args.format,
                                       "--output", str(per_pid(args.out, pid))],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for pid in service.pids]
            result = h.wrk(port, requests, 4000, count, args.seconds, rate=args.rate)
            for spy_process in spies:
                spy_process.wait(args.seconds + 60)
            print(f"{result['rps']:.0f} callbacks/s, p99 {result['p99_ms']:.1f} ms, non-2xx {result['non2xx']}; "
                  f"flame graphs: {', '.join(str(per_pid(args.out, pid)) for pid in service.pids)}")
            requests.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
