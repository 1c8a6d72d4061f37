"""Would a C driver make the callbacks' write cheaper? PyMySQL against mysqlclient, side by side.

    .venv/bin/pip install mysqlclient        # needs libmariadb-dev (or libmysqlclient-dev) and pkg-config
    .venv/bin/python bench/drivers.py [--rows 2000] [--rounds 3]

Each round writes the same rows through store/event_writes.write_rows (the statements a callback runs) on one
autocommit connection of each driver, alternating, alone (1 row a statement, a lone callback) and in batches
of 8 (what group commit writes under load), into a database of its own on the bench's MariaDB. It reports
the CPU of this process per row (the driver's and SQLAlchemy's share of a callback) and the wall time, per
driver and as mysqlclient / PyMySQL. Not part of run.py: mysqlclient is not among the locked dependencies.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.harness import mysql_server_url  # noqa: E402
from store.db import autocommit_engine  # noqa: E402
from store.event_writes import write_rows  # noqa: E402
from store.schema import metadata  # noqa: E402

DRIVERS = ("pymysql", "mysqldb")
BATCHES = (1, 8)
XML = "<xml>" + "x" * 900 + "</xml>"  # about the size of a member-change callback's plaintext


def rows(count: int, tag: str) -> list[dict]:
    return [{"dedup_key": hashlib.sha256(f"{tag}-{i}-{time.time_ns()}".encode()).hexdigest(),
             "change_type": "update_user", "user_id": "bench", "departments": "1,2", "create_time": 1, "xml": XML,
             "status": "pending", "reason": None, "attempts": 0, "received_at": 1.5, "next_attempt_at": 0,
             "source": "callback"} for i in range(count)]


def per_row(engine, batch: int, total: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per row for `total` rows written `batch` to a statement."""
    writes = [rows(batch, f"{batch}") for _ in range(total // batch)]
    with autocommit_engine(engine).connect() as conn:
        write_rows(conn, rows(batch, "warm"), 1.5)
        cpu, wall = time.process_time(), time.perf_counter()
        for write in writes:
            write_rows(conn, write, 1.5)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    written = len(writes) * batch
    return cpu / written * 1e6, wall / written * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per driver, batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        print("mysqlclient is not installed: .venv/bin/pip install mysqlclient (needs libmariadb-dev and pkg-config)")
        return 2
    server = sa.engine.make_url(mysql_server_url()).set(database=None)
    with sa.create_engine(server).begin() as conn:
        conn.exec_driver_sql("DROP DATABASE IF EXISTS wm_bench_drivers")
        conn.exec_driver_sql("CREATE DATABASE wm_bench_drivers")
    engines = {driver: sa.create_engine(server.set(drivername=f"mysql+{driver}", database="wm_bench_drivers"))
               for driver in DRIVERS}
    metadata.create_all(engines["pymysql"])
    for round_ in range(1, args.rounds + 1):
        for batch in BATCHES:
            measured = {driver: per_row(engine, batch, args.rows) for driver, engine in engines.items()}
            (cpu_p, wall_p), (cpu_c, wall_c) = measured["pymysql"], measured["mysqldb"]
            print(f"round {round_}, {batch} row(s) a statement: CPU per row PyMySQL {cpu_p:.0f} µs, mysqlclient "
                  f"{cpu_c:.0f} µs ({cpu_c / cpu_p:.2f}); wall {wall_p:.0f} vs {wall_c:.0f} µs ({wall_c / wall_p:.2f})",
                  flush=True)
    with sa.create_engine(server).begin() as conn:
        conn.exec_driver_sql("DROP DATABASE wm_bench_drivers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
