"""What the SQLite page size costs a ledger write, without retrysafe's Python around it.

Runs the SQLite ledger's own statements (claim upsert, completion update, same table and
index) with ``sqlite3`` on a fresh WAL file per run, for each page size and response size,
then times one checkpoint of what they wrote. Runs are interleaved in rounds; the figures are
medians over rounds.

    uv run python bench/sqlite_page_bench.py                 # about a minute
    uv run python bench/sqlite_page_bench.py --rounds 1 --pairs 1000   # a smoke run

Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from retrysafe.stores.sqlite import SQLiteStore

SCHEMA = (
    "CREATE TABLE ledger (rid BLOB PRIMARY KEY, token INTEGER NOT NULL, state INTEGER NOT NULL,"
    " fingerprint BLOB NOT NULL, lease_until REAL NOT NULL, expires_at REAL NOT NULL,"
    " response BLOB, scope BLOB NOT NULL DEFAULT x'', created_at REAL NOT NULL DEFAULT 0)",
    "CREATE INDEX ledger_expiry ON ledger (expires_at)",
)


def one_run(folder: Path, page: int, response_size: int, pairs: int) -> tuple[float, float, int]:
    """Microseconds per claim+complete, per pair for the checkpoint, WAL bytes per pair."""
    path = folder / f"p{page}-r{response_size}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    for statement in SCHEMA:
        conn.execute(statement)
    store = SQLiteStore(str(path), table="ledger")  # its SQL, never its connection
    claim, get, complete = store._sql_claim, store._sql_get, store._sql_complete
    conn.execute("BEGIN")  # a ledger that is not empty: 20,000 older records
    for i in range(20_000):
        key = os.urandom(32)
        conn.execute(claim, (key, 1, key, 1.0, 2.0 + i, b"scope", 0.0))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    response = os.urandom(response_size)
    keys = [os.urandom(32) for _ in range(pairs)]
    now = time.time()
    start = time.perf_counter()
    for key in keys:  # as the store does it alone: read, claim, later complete
        conn.execute(get, (key,)).fetchone()
        conn.execute(claim, (key, 7, key, now + 10, now + 86400, b"scope", now)).fetchall()
        conn.execute(complete, (1, response, now, now + 86400, key, 7))
        now += 0.0001
    writes = time.perf_counter() - start
    wal = os.path.getsize(f"{path}-wal")
    start = time.perf_counter()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint = time.perf_counter() - start
    conn.close()
    return writes / pairs * 1e6, checkpoint / pairs * 1e6, wal // pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=5000, help="claim+complete pairs per run")
    parser.add_argument("--pages", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--responses", type=int, nargs="+", default=[200, 2000, 8000])
    args = parser.parse_args()
    configs = [(page, size) for size in args.responses for page in args.pages]
    results: dict[tuple[int, int], list[tuple[float, float, int]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="retrysafe-pages-") as folder:
        for _ in range(args.rounds):
            for page, size in configs:
                results[(page, size)].append(one_run(Path(folder), page, size, args.pairs))
    print(f"{args.rounds} round(s) x {args.pairs} pairs; SQLite {sqlite3.sqlite_version}")
    print("| response bytes | page | claim+complete µs | checkpoint µs/pair | WAL bytes/pair |")
    print("|--:|--:|--:|--:|--:|")
    for page, size in configs:
        runs = results[(page, size)]
        print(
            f"| {size} | {page} | {statistics.median(r[0] for r in runs):.1f}"
            f" | {statistics.median(r[1] for r in runs):.1f}"
            f" | {statistics.median(r[2] for r in runs):,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
