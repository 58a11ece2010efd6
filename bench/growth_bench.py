"""Claim latency as the ledger grows: 10^3 to 10^6 records, per store.

Run ``uv run --group bench python bench/growth_bench.py [--stores sqlite,redis,postgres]``
(see bench/README.md). For each store: an empty ledger of its own (a temporary SQLite file, a
Redis key prefix, a PostgreSQL table), filled in steps to each size; at each size, one request
at a time through the store API (:func:`retrysafe.open_store`), on fresh keys:

* ``claim`` and ``complete``, and the two together (what a request with a new key costs);
* ``hit``: a claim of a key already done (what a replay costs the store).

p50/p90/p99 in microseconds. The ledger is filled through the store API in concurrent batches,
or much faster, once some real records exist, by cloning one of them (``--fill bulk``): SQL
``INSERT ... SELECT`` with new random primary keys for SQLite and PostgreSQL, ``DUMP``/
``RESTORE`` under new record ids for Redis (only when the store keeps one key per record, named
by the record id). Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib
import importlib.util
import json
import os
import platform
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from retrysafe import open_store
from retrysafe.records import State, StoredResponse
from retrysafe.stores import Store

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
STORE_KINDS = ("memory", "sqlite", "redis", "postgres")
DEFAULT_REDIS = os.environ.get("RETRYSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
DEFAULT_POSTGRES = os.environ.get(
    "RETRYSAFE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
RUN_TAG = "rsgrowth"
SIZES = (1_000, 10_000, 100_000, 1_000_000)
SEED_RECORDS = 1_000
"""Records always written through the API before a bulk fill (its templates)."""
LEASE = 15.0
TTL = 86_400.0
FINGERPRINT = bytes(range(32))
RESPONSE = StoredResponse(
    201,
    [(b"content-type", b"application/json"), (b"content-length", b"72")],
    b'{"id":1,"name":"widget","price":9.99,"quantity":2,"total":19.98,"x":"yz"}',
).encode()
"""About what the HTTP bench's FastAPI endpoint stores."""
SQL_BATCH = 50_000
REDIS_BATCH = 5_000


def new_rid() -> bytes:
    return os.urandom(32)


def new_token() -> int:
    return random.getrandbits(63)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts._replace(query="").geturl(), dict(parse_qsl(parts.query))


def with_options(url: str, **options: str) -> str:
    base, existing = split_url(url)
    return base + "?" + urlencode(existing | options)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if len(samples_ns) < 2:
        return {}
    q = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return {"p50": q[49] / 1e3, "p90": q[89] / 1e3, "p99": q[98] / 1e3}


# -- filling ------------------------------------------------------------------------------------


class FillError(Exception):
    """A fill method does not apply to this store (layout not recognised, ...)."""


async def api_fill(store: Store, count: int, concurrency: int, made: list[bytes]) -> None:
    """``count`` claim+complete cycles through the store API, ``concurrency`` at a time."""

    async def one() -> None:
        rid, token = new_rid(), new_token()
        if await store.claim(rid, token, FINGERPRINT, LEASE, TTL) is not None:
            raise RuntimeError("a fresh record id was already claimed")
        if not await store.complete(rid, token, State.DONE, RESPONSE, TTL):
            raise RuntimeError("complete() refused a claim just taken")
        if len(made) < SEED_RECORDS:
            made.append(rid)

    done = 0
    while done < count:
        batch = min(concurrency, count - done)
        await asyncio.gather(*(one() for _ in range(batch)))
        done += batch


def _sqlite_fill(path: str, table: str, count: int) -> None:
    conn = sqlite3.connect(path, timeout=60)
    try:
        info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
        if not info:
            raise FillError(f"no table {table!r} in {path}")
        keys = [row for row in info if row[5]]
        if len(keys) != 1:
            raise FillError(f"{table}: {len(keys)} primary key columns, one expected")
        key, key_type = keys[0][1], str(keys[0][2]).upper()
        if "BLOB" in key_type:
            new_key = f'randomblob(length(tpl."{key}"))'
        elif "TEXT" in key_type or "CHAR" in key_type:
            new_key = "lower(hex(randomblob(16)))"
        else:
            raise FillError(f"{table}: primary key {key} is {key_type}, not a blob or text")
        columns = [row[1] for row in info]
        exprs = [new_key if c == key else f'tpl."{c}"' for c in columns]
        names = ", ".join(f'"{c}"' for c in columns)
        sql = (
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
            f' INSERT INTO "{table}" ({names}) SELECT {", ".join(exprs)}'
            f' FROM s, (SELECT * FROM "{table}" LIMIT 1) AS tpl'
        )
        done = 0
        while done < count:
            batch = min(SQL_BATCH, count - done)
            with conn:
                conn.execute(sql, (batch,))
            done += batch
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def sqlite_fill(url: str, count: int) -> None:
    parts = urlsplit(url)
    path, options = parts.path[1:], dict(parse_qsl(parts.query))
    await asyncio.to_thread(_sqlite_fill, path, options.get("table", "retrysafe_records"), count)


async def postgres_fill(url: str, count: int) -> None:
    asyncpg: Any = importlib.import_module("asyncpg")
    base, options = split_url(url)
    table = options.get("table", "retrysafe_records")
    conn = await asyncpg.connect(base)
    try:
        rows = await conn.fetch(
            "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,"
            " COALESCE(a.attnum = ANY(i.indkey), false) AS pk"
            " FROM pg_attribute a LEFT JOIN pg_index i"
            "  ON i.indrelid = a.attrelid AND i.indisprimary"
            " WHERE a.attrelid = to_regclass(quote_ident($1)) AND a.attnum > 0"
            "  AND NOT a.attisdropped AND a.attgenerated = ''"
            " ORDER BY a.attnum",
            table,
        )
        if not rows:
            raise FillError(f"no table {table!r}")
        keys = [r for r in rows if r["pk"]]
        if len(keys) != 1:
            raise FillError(f"{table}: {len(keys)} primary key columns, one expected")
        key, key_type = keys[0]["name"], keys[0]["type"]
        random_hex = "replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"
        if key_type == "bytea":
            new_key = f"""substr(decode({random_hex}, 'hex'), 1, octet_length(tpl."{key}"))"""
        elif key_type == "text" or key_type.startswith(("character", "varchar")):
            new_key = random_hex
        else:
            raise FillError(f"{table}: primary key {key} is {key_type}, not bytea or text")
        columns = [r["name"] for r in rows]
        exprs = [new_key if c == key else f'tpl."{c}"' for c in columns]
        names = ", ".join(f'"{c}"' for c in columns)
        sql = (
            f'INSERT INTO "{table}" ({names}) SELECT {", ".join(exprs)}'
            f' FROM generate_series(1, $1::int) AS g(i), (SELECT * FROM "{table}" LIMIT 1) AS tpl'
        )
        done = 0
        while done < count:
            batch = min(SQL_BATCH, count - done)
            await conn.execute(sql, batch)
            done += batch
        await conn.execute(f'VACUUM ANALYZE "{table}"')
    finally:
        await conn.close()


async def redis_fill(url: str, count: int, made: list[bytes], present: int) -> None:
    """Clone one record under new ids with DUMP/RESTORE, if the layout is one key per record
    (``present`` records, so as many keys, named by the record ids)."""
    from redis import asyncio as aioredis

    base, options = split_url(url)
    prefix = options["prefix"]
    client = aioredis.Redis.from_url(base)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{prefix}*", count=10_000)]
        rid_hex = made[0].hex().encode()
        mine = [k for k in keys if rid_hex in k]
        if len(mine) != 1 or len(keys) != present:
            raise FillError(
                f"redis layout not one key per record named by its id ({len(keys)} keys for"
                f" {present} records, {len(mine)} named by the first id)"
            )
        template = mine[0]
        dump = await client.dump(template)
        ttl = int(await client.pttl(template))
        if dump is None or ttl == -2:
            raise FillError("the template record vanished")
        done = 0
        while done < count:
            batch = min(REDIS_BATCH, count - done)
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.restore(template.replace(rid_hex, new_rid().hex().encode()), max(ttl, 0), dump)
            await pipe.execute()
            done += batch
    finally:
        await client.aclose()


async def fill(
    kind: str,
    store: Store,
    url: str,
    count: int,
    present: int,
    args: argparse.Namespace,
    made: list[bytes],
) -> str:
    """Add ``count`` records to the ``present`` ones; return how (``api`` or ``bulk``)."""
    method: str = args.fill
    if count <= 0:
        return "-"
    seed = max(0, min(count, SEED_RECORDS - len(made)))
    if seed:
        await api_fill(store, seed, args.concurrency, made)
        count -= seed
        present += seed
        if not count:
            return "api"
    if method in ("auto", "bulk") and kind != "memory":
        try:
            if kind == "sqlite":
                await sqlite_fill(url, count)
            elif kind == "postgres":
                await postgres_fill(url, count)
            else:
                await redis_fill(url, count, made, present)
            return "bulk"
        except FillError as exc:
            if method == "bulk":
                raise
            print(f"    bulk fill not possible ({exc}): through the API", flush=True)
    await api_fill(store, count, args.concurrency, made)
    return "api"


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Point:
    store: str
    size: int
    """Records in the ledger when the measurement started."""
    counted: int | None
    """Live records as ``stats()`` counted them (None: not verified)."""
    fill: str
    fill_s: float
    stats_s: float | None
    claim_us: dict[str, float] = field(default_factory=dict)
    complete_us: dict[str, float] = field(default_factory=dict)
    cycle_us: dict[str, float] = field(default_factory=dict)
    """claim + complete of a fresh key."""
    hit_us: dict[str, float] = field(default_factory=dict)
    """claim of a key already done (a replay's store call)."""
    problems: list[str] = field(default_factory=list)


async def measure(store: Store, samples: int, hits: int) -> tuple[dict[str, list[int]], int]:
    """One at a time: claim+complete of ``samples`` fresh keys, then ``hits`` claims of done
    keys; return the timings (ns) and how many records that added."""
    times: dict[str, list[int]] = {"claim": [], "complete": [], "cycle": [], "hit": []}
    done: list[bytes] = []
    clock = time.perf_counter_ns
    gc.collect()
    for _ in range(samples):
        rid, token = new_rid(), new_token()
        start = clock()
        claimed = await store.claim(rid, token, FINGERPRINT, LEASE, TTL)
        middle = clock()
        completed = await store.complete(rid, token, State.DONE, RESPONSE, TTL)
        end = clock()
        if claimed is not None or not completed:
            raise RuntimeError(f"fresh key: claim gave {claimed!r}, complete gave {completed}")
        times["claim"].append(middle - start)
        times["complete"].append(end - middle)
        times["cycle"].append(end - start)
        done.append(rid)
    for rid in done[:hits]:
        start = clock()
        record = await store.claim(rid, new_token(), FINGERPRINT, LEASE, TTL)
        end = clock()
        if record is None or record.state != State.DONE:
            raise RuntimeError(f"a done key was claimed again: {record!r}")
        times["hit"].append(end - start)
    return times, samples


async def count_records(store: Store) -> int:
    stats = await store.stats()
    return stats.in_flight + stats.done + stats.not_replayable


async def grow(kind: str, url: str, args: argparse.Namespace, points: list[Point]) -> None:
    """Grow one ledger through ``args.sizes``; append a :class:`Point` per size to ``points``."""
    store = open_store(url)
    made: list[bytes] = []
    try:
        await store.initialize()
        present = 0
        for size in args.sizes:
            started = time.monotonic()
            method = await fill(kind, store, url, size - present, present, args, made)
            fill_s = time.monotonic() - started
            present = max(present, size)
            point = Point(kind, present, None, method, round(fill_s, 2), None)
            if args.verify:
                started = time.monotonic()
                point.counted = await count_records(store)
                point.stats_s = round(time.monotonic() - started, 2)
                if point.counted < present:
                    point.problems.append(f"stats() counted {point.counted} of {present} records")
            times, added = await measure(store, args.samples, args.hits)
            present += added
            point.claim_us = percentiles(times["claim"])
            point.complete_us = percentiles(times["complete"])
            point.cycle_us = percentiles(times["cycle"])
            point.hit_us = percentiles(times["hit"])
            points.append(point)
            print(
                f"  {kind:8s} {point.size:>9,} records ({method}, {fill_s:6.1f} s"
                + (f", stats {point.stats_s:.1f} s" if point.stats_s is not None else "")
                + f"): claim+complete p50 {point.cycle_us['p50']:7.0f} us"
                f" p99 {point.cycle_us['p99']:7.0f} us;"
                f" hit p50 {point.hit_us.get('p50', 0):6.0f} us"
                + ("  <-- " + "; ".join(point.problems) if point.problems else ""),
                flush=True,
            )
    finally:
        await store.aclose()


# -- clean-up -----------------------------------------------------------------------------------


def redis_delete(url: str, pattern: str) -> int:
    import redis

    base, _ = split_url(url)
    client = redis.Redis.from_url(base)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


async def postgres_drop(url: str, like: str) -> int:
    asyncpg: Any = importlib.import_module("asyncpg")
    base, _ = split_url(url)
    conn = await asyncpg.connect(base)
    try:
        names = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE $1"
            " AND schemaname = ANY(current_schemas(false))",
            like,
        )
        for row in names:
            await conn.execute(f'DROP TABLE IF EXISTS "{row["tablename"]}" CASCADE')
        return len(names)
    finally:
        await conn.close()


# -- the driver ---------------------------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if importlib.util.find_spec("uvloop") is not None:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(factory())


def parse_size(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of records: {text}")
    return int(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Claim latency as the ledger grows, per store.")
    parser.add_argument(
        "--stores",
        default="sqlite,redis,postgres",
        help=f"comma-separated, of {', '.join(STORE_KINDS)} (sqlite,redis,postgres)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{s:.0e}".replace("+0", "") for s in SIZES),
        help="ledger sizes to measure at, ascending (1e3,1e4,1e5,1e6)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="fresh keys per size (2000)")
    parser.add_argument("--hits", type=int, default=1000, help="done keys re-claimed (1000)")
    parser.add_argument(
        "--fill",
        choices=["auto", "api", "bulk"],
        default="auto",
        help="how to grow the ledger: bulk clones where the layout allows, else the API (auto)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="concurrent API calls when filling (64)"
    )
    parser.add_argument("--redis", default=DEFAULT_REDIS, help=f"Redis server ({DEFAULT_REDIS})")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help=f"PostgreSQL database ({DEFAULT_POSTGRES})"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not count the records with stats() after each fill",
    )
    parser.add_argument(
        "--cpu", type=int, default=0, help="pin this process to CPU N (0; -1: no pinning)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1e3 and 1e4, 300 keys")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"--sizes: {exc}")
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 10_000] or [1_000]
        args.samples, args.hits = min(args.samples, 300), min(args.hits, 150)
    unknown = [s for s in args.stores if s not in STORE_KINDS]
    if unknown or not args.stores:
        parser.error(f"--stores: unknown {unknown}; use {', '.join(STORE_KINDS)}")
    if args.sizes != sorted(set(args.sizes)):
        parser.error("--sizes must be distinct and ascending")
    if args.samples < 10 or args.hits < 0 or args.concurrency < 1:
        parser.error("--samples >= 10, --hits >= 0, --concurrency >= 1")
    return args


def markdown_table(points: list[Point]) -> str:
    def cell(p: dict[str, float]) -> str:
        return f"{p['p50']:.0f} / {p['p99']:.0f}" if p else "-"

    lines = [
        "| store | records | fill | fill s | claim p50 / p99 us | complete p50 / p99 us"
        " | claim+complete p50 / p99 us | hit claim p50 / p99 us |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for p in points:
        lines.append(
            f"| {p.store} | {p.size:,} | {p.fill} | {p.fill_s:.1f} | {cell(p.claim_us)}"
            f" | {cell(p.complete_us)} | {cell(p.cycle_us)} | {cell(p.hit_us)} |"
        )
    lines += [
        "",
        "One operation at a time through the store API, on fresh random record ids (hit: a claim"
        " of an id already done, which returns the record). fill: how the ledger was grown to"
        " that size (bulk: cloned records; api: claim+complete through the store).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity") and args.cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {args.cpu})
    run_id = secrets.token_hex(4)
    print(
        f"growth_bench: stores {', '.join(args.stores)};"
        f" sizes {', '.join(f'{s:,}' for s in args.sizes)};"
        f" {args.samples} fresh keys and {args.hits} hits per size; fill {args.fill};"
        f" run id {run_id}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    points: list[Point] = []
    problems: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="retrysafe-growth-") as tmp:
        for kind in args.stores:
            if kind == "memory":
                url = "memory://"
            elif kind == "sqlite":
                url = f"sqlite:///{Path(tmp) / f'{kind}.db'}"
            elif kind == "redis":
                url = with_options(args.redis, prefix=f"{RUN_TAG}-{run_id}")
            else:
                url = with_options(args.postgres, table=f"{RUN_TAG}_{run_id}")
            try:
                run_async(functools.partial(grow, kind, url, args, points))
            except Exception as exc:
                problems.append(f"{kind}: {type(exc).__name__}: {exc}")
                print(f"  {kind}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            finally:
                try:
                    if kind == "redis":
                        redis_delete(url, f"*{RUN_TAG}-{run_id}*")
                    elif kind == "postgres":
                        like = f"{RUN_TAG}\\_{run_id}%"
                        run_async(functools.partial(postgres_drop, url, like))
                except Exception as exc:
                    problems.append(f"{kind}: clean-up failed: {type(exc).__name__}: {exc}")
    problems += [f"{p.store} at {p.size:,}: {q}" for p in points for q in p.problems]

    print()
    print(markdown_table(points))
    results_path = args.output or RESULTS_DIR / time.strftime("growth-%Y%m%d-%H%M%S.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(time.monotonic() - started, 1),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "run_id": run_id,
            "python": sys.version,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "points": [asdict(p) for p in points],
        "problems": problems,
    }
    results_path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {results_path}")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
