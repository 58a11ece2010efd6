"""HTTP throughput and latency of IdempotencyMiddleware, as paired ratios to the bare app.

Run ``uv run --group bench python bench/http_bench.py [--passes 3] [--duration 5] [--quick]``
(see bench/README.md). For every pass, each variant gets a fresh uvicorn server (1 worker,
pinned to CPU 0 when ``taskset`` and two CPUs are there), a warm-up, a measured ``wrk`` run
(pinned to CPU 1) and a short ``wrk -c1`` run for the latency at concurrency 1. Passes visit the
variants in a different order each; each variant's ratio to the bare app of the same endpoint is
taken within a pass, and the medians are reported.

Variants: endpoint x mode x store, for retrysafe and, on the FastAPI endpoint, for the
competitor libraries (idemkit, fastapi-idempotency-key) on the shared stores they support.

This module is also the server: uvicorn imports :func:`server_app` from it, configured by the
``RETRYSAFE_BENCH_*`` environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import http.client
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import FastAPI
from pydantic import BaseModel

from retrysafe import IdempotencyMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

Endpoint = Literal["fastapi", "asgi"]
Mode = Literal["bare", "nokey", "fresh", "replay"]
StoreKind = Literal["memory", "sqlite", "redis", "postgres"]
Library = Literal["retrysafe", "idemkit", "fik"]
SHARED_STORES: tuple[StoreKind, ...] = ("redis", "postgres")

# The competitors: variant tag -> (distribution, the stores it has a backend for). Each wraps
# the FastAPI endpoint only. fastapi-idempotency-key has no PostgreSQL backend (memory, SQLite
# through aiosqlite, Redis); idemkit has Redis, PostgreSQL, MongoDB and DynamoDB ones.
COMPETITORS: dict[Library, tuple[str, tuple[StoreKind, ...]]] = {
    "idemkit": ("idemkit", ("redis", "postgres")),
    "fik": ("fastapi-idempotency-key", ("redis",)),
}

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
ENV_ENDPOINT = "RETRYSAFE_BENCH_ENDPOINT"
ENV_STORE = "RETRYSAFE_BENCH_STORE"
ENV_LIBRARY = "RETRYSAFE_BENCH_LIBRARY"
DEFAULT_REDIS = os.environ.get("RETRYSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
DEFAULT_POSTGRES = os.environ.get(
    "RETRYSAFE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
RUN_TAG = "rsbench"
"""Redis key prefixes (``rsbench-...``) and PostgreSQL tables (``rsbench_...``) start with it."""
HOST = "127.0.0.1"
PATH = "/items"
BODY = b'{"name":"widget","price":9.99,"quantity":2}'
REPLAY_KEY = "bench-replay-0001"
REPLAYED_HEADER = "Idempotent-Replayed"
RESULT_MARK = "@@BENCH "
SERVER_CPU, WRK_CPU = 0, 1
WRK_SATURATED = 0.9
WARNING_EVENTS = ("store-error", "fail-open", "corrupt-record", "lease-lost")
"""retrysafe's warning-level decisions, as its log hook writes them (to the server log)."""

# Targets on the 2-core reference box: (endpoint, mode, store) -> minimum ratio to bare, for
# retrysafe's variants. None in a key matches any. A replay of the trivial ASGI endpoint does
# strictly more work than that endpoint (hashing, a ledger read, decoding), so no speed-up
# target applies to it.
TARGETS: dict[tuple[Endpoint | None, Mode, StoreKind | None], float] = {
    (None, "nokey", None): 0.95,
    ("fastapi", "fresh", "sqlite"): 0.60,
    ("fastapi", "fresh", "redis"): 0.50,
    ("fastapi", "fresh", "postgres"): 0.45,
    ("fastapi", "replay", None): 1.30,
}
# retrysafe's req/s over the best competitor's on the same endpoint, mode and store (paired in
# each pass). Other endpoint/mode/store triples with competitors are reported without a target.
VERSUS_TARGETS: dict[tuple[Endpoint, Mode, StoreKind], float] = {
    ("fastapi", "fresh", "redis"): 1.20,
}
# Added p50 latency at concurrency 1 (variant p50 - bare p50, wrk -c1) may not exceed this many
# of the store's own round trips (p50, measured in the same run) plus LATENCY_SLACK_US.
LATENCY_TARGETS: dict[tuple[Endpoint, Mode, StoreKind], int] = {
    ("fastapi", "fresh", "redis"): 2,
    ("fastapi", "fresh", "postgres"): 2,
}
LATENCY_SLACK_US = 50.0


# -- the server side ----------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    price: float
    quantity: int = 1


class Created(BaseModel):
    id: int
    name: str
    price: float
    quantity: int
    total: float


def fastapi_app() -> FastAPI:
    """A small FastAPI POST endpoint: a pydantic body in, JSON 201 out (``id`` counts runs)."""
    app = FastAPI()
    ids = itertools.count(1)

    @app.post(PATH, status_code=201)
    async def create_item(item: Item) -> Created:
        return Created(
            id=next(ids),
            name=item.name,
            price=item.price,
            quantity=item.quantity,
            total=item.price * item.quantity,
        )

    return app


_ASGI_BODY = b'{"ok":true}'
_ASGI_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_ASGI_BODY)).encode()),
]


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A trivial pure-ASGI POST endpoint: read the body, answer JSON 201."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 201, "headers": _ASGI_HEADERS})
    await send({"type": "http.response.body", "body": _ASGI_BODY})


def split_store_url(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its query, and the query's options."""
    parts = urlsplit(url)
    return parts._replace(query="").geturl(), dict(parse_qsl(parts.query))


def add_competitor(app: FastAPI, library: str, store: str) -> None:
    """Wrap ``app`` in a competitor's middleware on ``store`` (a URL with ``?prefix=`` for Redis,
    ``?table=`` for PostgreSQL, as for retrysafe's stores).

    Both are configured to answer replays with ``Idempotent-Replayed: true``, the header the
    load generator counts; everything else is left at the library's defaults. The libraries are
    imported here, so that the rest of the harness runs without the ``bench`` group.
    """
    base, options = split_store_url(store)
    scheme = urlsplit(base).scheme
    if library == "idemkit":
        idemkit: Any = importlib.import_module("idemkit")
        if scheme == "redis":
            redis_backend: Any = importlib.import_module("idemkit.backends.redis")
            backend = redis_backend.RedisBackend.from_url(base, namespace=options["prefix"])
        elif scheme in ("postgresql", "postgres"):
            pg_backend: Any = importlib.import_module("idemkit.backends.postgres")
            backend = pg_backend.PostgresBackend.from_url(base, table=options["table"])
        else:
            raise SystemExit(f"idemkit: no backend for {store!r} in this bench")
        # compat_mode="stripe": the Idempotent-Replayed header (and 409 for conflicts);
        # single_tenant: no caller scope, as in retrysafe's default; silences a warning.
        config = idemkit.HttpConfig(compat_mode="stripe", scope_mode="single_tenant")
        app.add_middleware(idemkit.IdempotencyMiddleware, backend=backend, config=config)
    elif library == "fik":
        fik: Any = importlib.import_module("fastapi_idempotency_key")
        if scheme != "redis":
            raise SystemExit(f"fastapi-idempotency-key: no backend for {store!r}")
        inner = fik.RedisBackend(redis_url=base, prefix=options["prefix"] + ":")
        app.add_middleware(
            fik.IdempotencyMiddleware,
            backend=FikKeepFingerprint(inner, fik.IdempotencyRecord, fik.IdempotencyStatus),
            replay_header_name=REPLAYED_HEADER,
        )
    else:
        raise SystemExit(f"{ENV_LIBRARY}={library!r}: expected retrysafe, idemkit or fik")


class FikKeepFingerprint:
    """fastapi-idempotency-key's RedisBackend with its replay bug fixed.

    Its ``store_response`` (0.1.1) writes the completed record with an empty fingerprint, and
    the middleware then compares that with the request's: every retry of a completed request
    gets 422 "different request payload", none is replayed. This wrapper remembers the
    fingerprint of each claim in the process and writes it into the completed record, with the
    library's own record class and Lua script: the same round trips, plus a dict operation.
    """

    def __init__(self, inner: Any, record_class: Any, status_class: Any) -> None:
        self.inner = inner
        self.record_class = record_class
        self.completed = status_class.COMPLETED
        self.fingerprints: dict[str, str] = {}

    async def try_lock(
        self,
        key: str,
        fingerprint: str,
        ttl: int,
        timeout: float = 0.0,  # noqa: ASYNC109 - the library's signature
    ) -> tuple[bool, Any]:
        acquired, record = await self.inner.try_lock(
            key=key, fingerprint=fingerprint, ttl=ttl, timeout=timeout
        )
        if acquired:
            self.fingerprints[key] = fingerprint
        return bool(acquired), record

    async def store_response(
        self, key: str, status_code: int, headers: list[tuple[str, str]], body: bytes, ttl: int
    ) -> None:
        now = time.time()
        record = self.record_class(
            key=key,
            fingerprint=self.fingerprints.pop(key, ""),
            status=self.completed,
            status_code=status_code,
            headers=list(headers),
            body=body,
            created_at=now,
            expires_at=now + ttl if ttl > 0 else 0.0,
        )
        inner = self.inner
        payload = json.dumps(record.to_dict())
        await inner.redis.eval(inner.LUA_STORE_RESPONSE, 1, inner._get_key(key), payload, ttl)

    async def release_lock(self, key: str) -> None:
        self.fingerprints.pop(key, None)
        await self.inner.release_lock(key)

    async def get_record(self, key: str) -> Any:
        return await self.inner.get_record(key)

    async def clear(self) -> None:
        await self.inner.clear()

    async def close(self) -> None:
        await self.inner.close()


def server_app() -> ASGIApp:
    """The app uvicorn serves (``--factory``): endpoint, library and store from the environment."""
    endpoint = os.environ.get(ENV_ENDPOINT, "fastapi")
    store = os.environ.get(ENV_STORE, "")
    library = os.environ.get(ENV_LIBRARY, "retrysafe")
    if library != "retrysafe":
        if endpoint != "fastapi" or not store:
            raise SystemExit(f"{library}: only the fastapi endpoint, with a store")
        app = fastapi_app()
        add_competitor(app, library, store)
        return app
    if endpoint == "fastapi":
        app = fastapi_app()
        if store:
            app.add_middleware(IdempotencyMiddleware, store=store)
        return app
    if endpoint == "asgi":
        return IdempotencyMiddleware(asgi_app, store=store) if store else asgi_app
    raise SystemExit(f"{ENV_ENDPOINT}={endpoint!r}: expected fastapi or asgi")


# -- variants and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    endpoint: Endpoint
    mode: Mode
    store: StoreKind | None = None
    library: Library = "retrysafe"

    @property
    def name(self) -> str:
        """``endpoint/mode[/store][/library]``: the library only for competitors."""
        library = None if self.library == "retrysafe" else self.library
        return "/".join(p for p in (self.endpoint, self.mode, self.store, library) if p)

    @property
    def long_name(self) -> str:
        """:attr:`name` with ``/retrysafe`` too (for ``--only``), except for the bare app."""
        if self.mode == "bare" or self.library != "retrysafe":
            return self.name
        return f"{self.name}/retrysafe"

    @property
    def bare(self) -> Variant:
        return Variant(self.endpoint, "bare")

    def matches(self, pattern: str) -> bool:
        """``--only``: a glob (``*?[``) matches a whole name, other text any part of one."""
        names = (self.name, self.long_name)
        if any(c in pattern for c in "*?["):
            return any(fnmatch.fnmatchcase(n, pattern) for n in names)
        return any(pattern in n for n in names)

    @property
    def target(self) -> float | None:
        if self.library != "retrysafe":
            return None
        for (endpoint, mode, store), ratio in TARGETS.items():
            if (
                mode == self.mode
                and endpoint in (None, self.endpoint)
                and store in (None, self.store)
            ):
                return ratio
        return None


def all_variants() -> list[Variant]:
    variants: list[Variant] = []
    endpoints: tuple[Endpoint, ...] = ("fastapi", "asgi")
    modes: tuple[Mode, ...] = ("nokey", "fresh", "replay")
    for endpoint in endpoints:
        variants.append(Variant(endpoint, "bare"))
        for mode in modes:
            for store in get_args(StoreKind):
                variants.append(Variant(endpoint, mode, store))
                if endpoint != "fastapi":
                    continue
                for library, (_, stores) in COMPETITORS.items():
                    if store in stores:
                        variants.append(Variant(endpoint, mode, store, library))
    return variants


def select_variants(patterns: Sequence[str]) -> list[Variant]:
    """The variants ``--only`` names, and the bare app of each endpoint among them."""
    chosen = [v for v in all_variants() if not patterns or any(v.matches(p) for p in patterns)]
    endpoints = {v.endpoint for v in chosen}
    return [
        v for v in all_variants() if v in chosen or (v.mode == "bare" and v.endpoint in endpoints)
    ]


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    statuses: dict[str, int]
    replayed: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    cpu_s: float
    """wrk's own CPU time (user + system)."""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind != "status")


@dataclass
class Run:
    """One variant measured once, in one pass."""

    variant: str
    pass_index: int
    order: int
    store_url: str = ""
    rps: float = 0.0
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    socket_errors: int = 0
    warmup_statuses: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)
    server_cpu_s: float | None = None
    server_cpu_util: float | None = None
    wrk_cpu_util: float | None = None
    c1_requests: int = 0
    c1_statuses: dict[str, int] = field(default_factory=dict)
    c1_replayed: int = 0
    c1_latency_us: dict[str, float] = field(default_factory=dict)
    """wrk -t1 -c1 latency percentiles (p50, p90, p99, max, mean), microseconds."""
    problems: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s / self.requests * 1e6


class BenchError(Exception):
    """A run could not be measured (server failed to start, sanity request failed, ...)."""


# -- wrk ----------------------------------------------------------------------------------------

# Every variant uses the same script (same per-response Lua work), only MODE differs.
LUA_TEMPLATE = r"""
-- generated by bench/http_bench.py
local MODE = "%(mode)s"
local PATH = "%(path)s"
local BODY = '%(body)s'
local REPLAY_KEY = "%(replay_key)s"
local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or "noprefix"
  counter = 0
  statuses = {}
  replayed = 0
  headers = { ["Content-Type"] = "application/json" }
  if MODE == "replay" then headers["Idempotency-Key"] = REPLAY_KEY end
  static = wrk.format("POST", PATH, headers, BODY)
end

function request()
  if MODE == "fresh" then
    counter = counter + 1
    headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. counter
    return wrk.format("POST", PATH, headers, BODY)
  end
  return static
end

function response(status, hdrs, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
  if hdrs["idempotent-replayed"] or hdrs["Idempotent-Replayed"] then
    replayed = replayed + 1
  end
end

function done(summary, latency, requests)
  local total, rep = {}, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
    rep = rep + t:get("replayed")
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format('"%%s":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"statuses":{%%s},"replayed":%%d,'
      .. '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d},'
      .. '"latency_us":{"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d,"mean":%%.1f}}\n',
    summary.requests, summary.duration, table.concat(parts, ","), rep,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def lua_script(mode: Mode) -> str:
    return LUA_TEMPLATE % {
        "mode": mode,
        "path": PATH,
        "body": BODY.decode(),
        "replay_key": REPLAY_KEY,
        "mark": RESULT_MARK,
    }


def run_wrk(pin: list[str], script: Path, port: int, seconds: int, connections: int) -> WrkResult:
    prefix = secrets.token_hex(6)  # unique keys across runs, passes and warm-ups
    cmd = [
        *pin,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://{HOST}:{port}{PATH}",
        "--",
        prefix,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return WrkResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1e6,
                statuses=data["statuses"],
                replayed=data["replayed"],
                errors=data["errors"],
                latency_us={k: float(v) for k, v in data["latency_us"].items()},
                cpu_s=cpu_s,
            )
    raise BenchError(f"wrk gave no result (exit {done.returncode}): {done.stderr or done.stdout}")


# -- the shared stores: URLs, preparation, clean-up, round trips --------------------------------


def with_options(url: str, **options: str) -> str:
    base, existing = split_store_url(url)
    return base + "?" + urlencode(existing | options)


def store_url(store: StoreKind | None, rundir: Path, unique: str, setup: Setup) -> str:
    """The ledger of one run: a fresh SQLite file, Redis key prefix or PostgreSQL table."""
    if store is None:
        return ""
    if store == "memory":
        return "memory://"
    if store == "sqlite":
        return f"sqlite:///{rundir / 'ledger.db'}"  # absolute path: four slashes
    if store == "redis":
        return with_options(setup.redis_url, prefix=f"{RUN_TAG}-{unique}")
    return with_options(setup.postgres_url, table=f"{RUN_TAG}_{unique}")


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop when it is installed (the servers' loop), else asyncio."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if importlib.util.find_spec("uvloop") is not None:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(factory())


def prepare_store(variant: Variant, url: str) -> None:
    """What a library needs before it serves: idemkit's PostgreSQL table (``init-pg``)."""
    if variant.library == "idemkit" and variant.store == "postgres":
        base, options = split_store_url(url)
        pg_backend: Any = importlib.import_module("idemkit.backends.postgres")
        run_async(lambda: pg_backend.init_pg(base, table=options["table"]))


def redis_delete(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (SCAN + UNLINK); return how many."""
    import redis

    base, _ = split_store_url(url)
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


def postgres_drop(url: str, like: str) -> int:
    """Drop the tables (of the URL's schema search path) whose name is LIKE ``like``."""
    base, _ = split_store_url(url)
    asyncpg: Any = importlib.import_module("asyncpg")

    async def drop() -> int:
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

    return run_async(drop)


def cleanup_store(store: StoreKind | None, url: str) -> None:
    """Remove what one run left in a shared store (its key prefix, its table)."""
    _, options = split_store_url(url)
    if store == "redis":
        redis_delete(url, f"*{options['prefix']}*")
    elif store == "postgres":
        postgres_drop(url, options["table"].replace("_", r"\_"))


def measure_rtt(store: StoreKind, url: str, samples: int, scratch: str) -> dict[str, Any]:
    """The store's own round trips from Python, on the server's CPU and loop, p50/p90/p99 in
    microseconds: a read (Redis ``PING`` with redis-py and hiredis, PostgreSQL ``SELECT 1`` with
    asyncpg) and a committed one-key write (``write_*``: Redis ``SET``, PostgreSQL an upsert of
    one row in an autocommit statement, so with the WAL flush ``synchronous_commit`` asks for).
    ``scratch`` names the key or table written (the run's clean-up removes it)."""
    base, _ = split_store_url(url)
    warmup = max(50, samples // 10)

    async def timed(call: Callable[[], Awaitable[object]]) -> list[int]:
        times: list[int] = []
        for i in range(warmup + samples):
            start = time.perf_counter_ns()
            await call()
            if i >= warmup:
                times.append(time.perf_counter_ns() - start)
        return times

    async def redis_rtt() -> tuple[list[int], list[int], str]:
        from redis import asyncio as aioredis

        client = aioredis.Redis.from_url(base)
        try:
            info = await client.info("server")
            reads = await timed(client.ping)
            writes = await timed(lambda: client.set(scratch, b"x" * 100))
            await client.delete(scratch)
            return reads, writes, f"redis {info.get('redis_version', '?')}"
        finally:
            await client.aclose()

    async def postgres_rtt() -> tuple[list[int], list[int], str]:
        asyncpg: Any = importlib.import_module("asyncpg")
        conn = await asyncpg.connect(base)
        try:
            version = await conn.fetchval("SHOW server_version")
            commit = await conn.fetchval("SHOW synchronous_commit")
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{scratch}" (k int PRIMARY KEY, v bytea NOT NULL)'
            )
            upsert = (
                f'INSERT INTO "{scratch}" (k, v) VALUES (1, $1)'
                " ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
            )
            reads = await timed(lambda: conn.fetchval("SELECT 1"))
            writes = await timed(lambda: conn.execute(upsert, os.urandom(100)))
            return reads, writes, f"postgresql {version}, synchronous_commit={commit}"
        finally:
            await conn.close()

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and {SERVER_CPU, WRK_CPU} <= affinity:
        os.sched_setaffinity(0, {SERVER_CPU})
    try:
        reads, writes, server = run_async(redis_rtt if store == "redis" else postgres_rtt)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    out: dict[str, Any] = {"server": server}
    for prefix, times in (("", reads), ("write_", writes)):
        q = statistics.quantiles(times, n=100, method="inclusive")
        out |= {
            f"{prefix}p50": q[49] / 1e3,
            f"{prefix}p90": q[89] / 1e3,
            f"{prefix}p99": q[98] / 1e3,
        }
    return out


# -- the server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(port: int, key: str | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        conn.request("POST", PATH, body=BODY, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def wait_until_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with {process.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"server did not listen within 60 s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _created_id(body: bytes) -> object:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("id") if isinstance(data, dict) else None


def sanity_check(variant: Variant, port: int) -> None:
    """A few requests by hand: the variant behaves as the measurement assumes.

    * every variant: two different requests (no key, or two fresh keys) both run the handler
      (the FastAPI endpoint's ``id`` differs) and are not marked replayed;
    * ``fresh``: the first fresh key, sent again, is replayed (the middleware recorded it: it
      is not passing requests through) with the same body;
    * ``replay``: the priming request runs; the same key again is replayed, same body.
    """
    replayed = REPLAYED_HEADER.lower()

    def request(key: str | None, what: str, *, replay: bool) -> bytes:
        status, headers, body = post(port, key)
        if status != 201 or (headers.get(replayed) == "true") != replay:
            raise BenchError(
                f"{what}: {status}, {'a replay' if replay else 'no replay'} expected:"
                f" {headers} {body[:300]!r}"
            )
        return body

    if variant.mode == "replay":
        first = request(REPLAY_KEY, "priming request", replay=False)
        again = request(REPLAY_KEY, "replay request", replay=True)
        if again != first:
            raise BenchError(f"the replay's body differs: {first[:200]!r} then {again[:200]!r}")
        return
    keys: list[str | None] = [None, None]
    if variant.mode == "fresh":
        keys = ["sanity-" + secrets.token_hex(8), "sanity-" + secrets.token_hex(8)]
    first = request(keys[0], "first request", replay=False)
    second = request(keys[1], "second request", replay=False)
    if variant.endpoint == "fastapi" and _created_id(first) == _created_id(second):
        raise BenchError(f"the handler did not run twice: {first[:200]!r}, {second[:200]!r}")
    if variant.mode == "fresh":
        again = request(keys[0], "the first fresh key again", replay=True)
        if again != first:
            raise BenchError(f"the replay's body differs: {first[:200]!r} then {again[:200]!r}")


@dataclass(frozen=True)
class Setup:
    server_pin: list[str]
    wrk_pin: list[str]
    loop: str
    http: str
    duration: int
    warmup: int
    connections: int
    latency: int
    workdir: Path
    redis_url: str
    postgres_url: str
    run_id: str


def measure(variant: Variant, pass_index: int, order: int, setup: Setup) -> Run:
    run = Run(variant.name, pass_index, order)
    rundir = setup.workdir / f"pass{pass_index}-{variant.name.replace('/', '-')}"
    rundir.mkdir()
    script = rundir / "bench.lua"
    script.write_text(lua_script(variant.mode))
    url = store_url(variant.store, rundir, f"{setup.run_id}_{secrets.token_hex(4)}", setup)
    run.store_url = url
    env = dict(os.environ)
    env[ENV_ENDPOINT] = variant.endpoint
    env[ENV_STORE] = url
    env[ENV_LIBRARY] = variant.library
    port = free_port()
    cmd = [
        *setup.server_pin,
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "--app-dir",
        str(BENCH_DIR),
        "http_bench:server_app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        setup.loop,
        "--http",
        setup.http,
    ]
    log = rundir / "server.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        prepare_store(variant, url)
        with log.open("wb") as log_file:
            process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        wait_until_serving(port, process, log)
        sanity_check(variant, port)
        if setup.warmup > 0:
            warm = run_wrk(setup.wrk_pin, script, port, setup.warmup, setup.connections)
            run.warmup_statuses = warm.statuses
        cpu_before = process_cpu_seconds(process.pid)
        result = run_wrk(setup.wrk_pin, script, port, setup.duration, setup.connections)
        cpu_after = process_cpu_seconds(process.pid)
        run.rps = result.rps
        run.requests = result.requests
        run.statuses = result.statuses
        run.replayed = result.replayed
        run.socket_errors = result.socket_errors
        run.latency_us = result.latency_us
        run.wrk_cpu_util = result.cpu_s / result.duration_s if result.duration_s else None
        if cpu_before is not None and cpu_after is not None:
            run.server_cpu_s = cpu_after - cpu_before
            run.server_cpu_util = run.server_cpu_s / result.duration_s
        if setup.latency > 0:
            single = run_wrk(setup.wrk_pin, script, port, setup.latency, 1)
            run.c1_requests = single.requests
            run.c1_statuses = single.statuses
            run.c1_replayed = single.replayed
            run.c1_latency_us = single.latency_us
            run.socket_errors += single.socket_errors
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        run.problems.append(f"not measured: {exc}")
    except Exception as exc:  # a store that is down, a library missing: report, go on
        run.problems.append(f"not measured: {type(exc).__name__}: {exc}")
    finally:
        if process is not None:
            stop(process)
        try:
            cleanup_store(variant.store, url)
        except Exception as exc:
            run.problems.append(f"clean-up of {url} failed: {type(exc).__name__}: {exc}")
    logged = tail(log, 200)
    if "Traceback" in logged or any(f"{event} " in logged for event in WARNING_EVENTS):
        run.problems.append(f"server logged an exception or a retrysafe warning:\n{tail(log)}")
    check(variant, run)
    return run


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def check(variant: Variant, run: Run) -> None:
    """Flag the responses a correct middleware cannot give for this variant."""
    for label, statuses in (
        ("warm-up", run.warmup_statuses),
        ("measured", run.statuses),
        ("concurrency 1", run.c1_statuses),
    ):
        bad = {s: n for s, n in statuses.items() if s != "201"}
        if not bad:
            continue
        serious = {s: n for s, n in bad.items() if s == "409" or s.startswith("5")}
        if variant.mode == "fresh" and serious:
            run.problems.append(
                f"BUG: fresh keys got {serious} ({label}): a fresh key must never get 409 or 5xx"
            )
        else:
            run.problems.append(f"unexpected statuses {bad} ({label})")
    for label, requests, replayed in (
        ("measured", run.requests, run.replayed),
        ("concurrency 1", run.c1_requests, run.c1_replayed),
    ):
        if variant.mode == "replay" and requests and replayed != requests:
            run.problems.append(f"only {replayed} of {requests} responses were replays ({label})")
        if variant.mode != "replay" and replayed:
            run.problems.append(f"{replayed} responses were replays, none should be ({label})")
    if run.socket_errors:
        run.problems.append(f"{run.socket_errors} socket errors (connect/read/write/timeout)")


# -- the driver ---------------------------------------------------------------------------------


def pass_orders(variants: list[Variant], passes: int, seed: int) -> list[list[Variant]]:
    """Pass 1 in the listed order, pass 2 reversed (a steady drift cancels), then shuffled."""
    rng = random.Random(seed)
    orders = [list(variants), list(reversed(variants))]
    for _ in range(2, passes):
        order = list(variants)
        rng.shuffle(order)
        orders.append(order)
    return orders[:passes]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Summary:
    variant: str
    endpoint: str
    mode: str
    store: str | None
    library: str
    median_rps: float
    ratios: list[float]
    median_ratio: float | None
    cpu_ratios: list[float]
    median_cpu_ratio: float | None
    target: float | None
    meets_target: bool | None
    median_cpu_us: float | None
    median_cpu_util: float | None
    median_p99_ms: float | None
    max_wrk_cpu_util: float | None
    c1_p50_us: float | None
    c1_p99_us: float | None
    added_p50_us: list[float]
    """Per pass: this variant's p50 at concurrency 1 minus the bare app's, microseconds."""
    median_added_p50_us: float | None
    rtt_p50_us: float | None
    """The store's own round trip (median over passes of the p50), microseconds."""
    latency_budget_us: float | None
    meets_latency: bool | None
    non_2xx: dict[str, int]
    problems: list[str]


def summarise(
    variants: list[Variant], runs: list[Run], rtts: dict[str, list[dict[str, Any]]]
) -> list[Summary]:
    by_pass = {(r.pass_index, r.variant): r for r in runs}
    passes = sorted({r.pass_index for r in runs})
    out = []
    for v in variants:
        mine = [r for r in runs if r.variant == v.name and r.requests]
        ratios, cpu_ratios, added = [], [], []
        for p in passes:
            run, bare = by_pass.get((p, v.name)), by_pass.get((p, v.bare.name))
            if not (run and bare):
                continue
            if run.rps and bare.rps:
                ratios.append(run.rps / bare.rps)
            mine_cpu, bare_cpu = run.cpu_us_per_request, bare.cpu_us_per_request
            if mine_cpu and bare_cpu:
                cpu_ratios.append(bare_cpu / mine_cpu)
            if "p50" in run.c1_latency_us and "p50" in bare.c1_latency_us:
                added.append(run.c1_latency_us["p50"] - bare.c1_latency_us["p50"])
        median_ratio = _median(ratios)
        median_added = _median(added)
        non_2xx: dict[str, int] = {}
        for r in runs:
            if r.variant == v.name:
                for statuses in (r.statuses, r.c1_statuses):
                    for s, n in statuses.items():
                        if not s.startswith("2"):
                            non_2xx[s] = non_2xx.get(s, 0) + n
        cpu = [c for r in mine if (c := r.cpu_us_per_request) is not None]
        util = [r.server_cpu_util for r in mine if r.server_cpu_util is not None]
        p99 = [r.latency_us["p99"] / 1000 for r in mine if "p99" in r.latency_us]
        wrk_util = [r.wrk_cpu_util for r in mine if r.wrk_cpu_util is not None]
        c1_p50 = [r.c1_latency_us["p50"] for r in mine if "p50" in r.c1_latency_us]
        c1_p99 = [r.c1_latency_us["p99"] for r in mine if "p99" in r.c1_latency_us]
        rtt = _median([m["p50"] for m in rtts.get(v.store or "", [])])
        budget = None
        if v.library == "retrysafe" and v.store is not None and rtt is not None:
            trips = LATENCY_TARGETS.get((v.endpoint, v.mode, v.store))
            if trips is not None:
                budget = trips * rtt + LATENCY_SLACK_US
        target = v.target
        out.append(
            Summary(
                variant=v.name,
                endpoint=v.endpoint,
                mode=v.mode,
                store=v.store,
                library=v.library,
                median_rps=statistics.median([r.rps for r in mine]) if mine else 0.0,
                ratios=ratios,
                median_ratio=median_ratio,
                cpu_ratios=cpu_ratios,
                median_cpu_ratio=_median(cpu_ratios),
                target=target,
                meets_target=(
                    None if target is None or median_ratio is None else median_ratio >= target
                ),
                median_cpu_us=_median(cpu),
                median_cpu_util=_median(util),
                median_p99_ms=_median(p99),
                max_wrk_cpu_util=max(wrk_util) if wrk_util else None,
                c1_p50_us=_median(c1_p50),
                c1_p99_us=_median(c1_p99),
                added_p50_us=added,
                median_added_p50_us=median_added,
                rtt_p50_us=rtt,
                latency_budget_us=budget,
                meets_latency=(
                    None if budget is None or median_added is None else median_added <= budget
                ),
                non_2xx=non_2xx,
                problems=[
                    f"pass {r.pass_index + 1}: {p}"
                    for r in runs
                    if r.variant == v.name
                    for p in r.problems
                ],
            )
        )
    return out


@dataclass
class Versus:
    """retrysafe against the best competitor on one endpoint, mode and store, paired by pass."""

    endpoint: str
    mode: str
    store: str
    competitors: list[str]
    best: list[str]
    """The competitor with the most req/s, in each pass."""
    ratios: list[float]
    median_ratio: float | None
    cpu_ratios: list[float]
    median_cpu_ratio: float | None
    target: float | None
    meets_target: bool | None


def versus(variants: list[Variant], runs: list[Run]) -> list[Versus]:
    by_pass = {(r.pass_index, r.variant): r for r in runs if r.requests}
    passes = sorted({r.pass_index for r in runs})
    out = []
    for ours in variants:
        if ours.library != "retrysafe" or ours.store is None:
            continue
        rivals = [
            v
            for v in variants
            if v.library != "retrysafe"
            and (v.endpoint, v.mode, v.store) == (ours.endpoint, ours.mode, ours.store)
        ]
        if not rivals:
            continue
        best: list[str] = []
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for p in passes:
            mine = by_pass.get((p, ours.name))
            theirs = [(v.library, r) for v in rivals if (r := by_pass.get((p, v.name)))]
            if mine is None or not theirs:
                continue
            name, top = max(theirs, key=lambda t: t[1].rps)
            best.append(name)
            if top.rps:
                ratios.append(mine.rps / top.rps)
            cpus = [c for _, r in theirs if (c := r.cpu_us_per_request)]
            if cpus and mine.cpu_us_per_request:
                cpu_ratios.append(min(cpus) / mine.cpu_us_per_request)
        key = (ours.endpoint, ours.mode, ours.store)
        target = VERSUS_TARGETS.get(key)
        median_ratio = _median(ratios)
        out.append(
            Versus(
                endpoint=ours.endpoint,
                mode=ours.mode,
                store=ours.store,
                competitors=[v.library for v in rivals],
                best=best,
                ratios=ratios,
                median_ratio=median_ratio,
                cpu_ratios=cpu_ratios,
                median_cpu_ratio=_median(cpu_ratios),
                target=target,
                meets_target=(
                    None if target is None or median_ratio is None else median_ratio >= target
                ),
            )
        )
    return out


def _ratio_cell(median: float | None, ratios: list[float]) -> str:
    if median is None:
        return "n/a"
    if len(ratios) > 1:
        return f"{median:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    return f"{median:.2f}"


def _target_cell(target: float | None, met: bool | None, op: str = ">=", unit: str = "") -> str:
    if target is None:
        return "-"
    number = f"{target:.0f}" if unit else f"{target:.2f}"
    verdict = "n/a" if met is None else ("PASS" if met else "MISS")
    return f"{op} {number}{unit} {verdict}"


def markdown_table(summaries: list[Summary]) -> str:
    lines = [
        "| endpoint | variant | store | library | req/s | x bare | target | server CPU us/req"
        " | x bare by CPU | server CPU % | p99 ms | non-2xx |",
        "|---|---|---|---|--:|--:|---|--:|--:|--:|--:|---|",
    ]
    for s in summaries:
        cpu = "-" if s.median_cpu_us is None else f"{s.median_cpu_us:.0f}"
        util = "-" if s.median_cpu_util is None else f"{s.median_cpu_util * 100:.0f}"
        p99 = "-" if s.median_p99_ms is None else f"{s.median_p99_ms:.1f}"
        non_2xx = ", ".join(f"{k}: {n}" for k, n in sorted(s.non_2xx.items())) or "0"
        library = "-" if s.mode == "bare" else s.library
        lines.append(
            f"| {s.endpoint} | {s.mode} | {s.store or '-'} | {library} | {s.median_rps:,.0f}"
            f" | {_ratio_cell(s.median_ratio, s.ratios)}"
            f" | {_target_cell(s.target, s.meets_target)} | {cpu}"
            f" | {_ratio_cell(s.median_cpu_ratio, s.cpu_ratios)} | {util} | {p99} | {non_2xx} |"
        )
    lines += [
        "",
        "req/s, server CPU and p99: medians over passes. x bare: median of the per-pass ratio of"
        " req/s to the bare app of the same endpoint (min-max over passes in brackets); the target"
        " applies to it. x bare by CPU: the same ratio computed from server CPU time per request"
        " (bare us/req / variant us/req), less sensitive to other load on the server's CPU."
        " server CPU % below ~95 means the server was not the only thing running on its CPU."
        " The store servers (Redis, PostgreSQL) are not pinned: they share the two CPUs.",
    ]
    return "\n".join(lines)


def versus_table(rows: list[Versus], summaries: list[Summary]) -> str:
    libraries = [lib for lib in COMPETITORS if any(lib in r.competitors for r in rows)]
    ratio = {(s.endpoint, s.mode, s.store, s.library): s for s in summaries}
    lines = [
        "| endpoint | variant | store | retrysafe x bare | "
        + " | ".join(f"{lib} x bare" for lib in libraries)
        + " | retrysafe / best competitor | by CPU | target |",
        "|---|---|---|--:|" + "--:|" * len(libraries) + "--:|--:|---|",
    ]
    for row in rows:
        cells = []
        for lib in ["retrysafe", *libraries]:
            s = ratio.get((row.endpoint, row.mode, row.store, lib))
            cells.append("-" if s is None else _ratio_cell(s.median_ratio, s.ratios))
        best = ", ".join(sorted(set(row.best))) or "-"
        lines.append(
            f"| {row.endpoint} | {row.mode} | {row.store} | "
            + " | ".join(cells)
            + f" | {_ratio_cell(row.median_ratio, row.ratios)} (best: {best})"
            f" | {_ratio_cell(row.median_cpu_ratio, row.cpu_ratios)}"
            f" | {_target_cell(row.target, row.meets_target)} |"
        )
    lines += [
        "",
        "retrysafe / best competitor: median of the per-pass ratio of retrysafe's req/s to the"
        " fastest competitor's in that pass (same endpoint, mode and store); by CPU: the same from"
        " server CPU time per request. fik = fastapi-idempotency-key (with its Redis replay bug"
        " fixed, see bench/README.md).",
    ]
    return "\n".join(lines)


def latency_table(summaries: list[Summary], rtts: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| endpoint | variant | store | library | p50 us (c1) | added p50 us | p99 us (c1)"
        " | store RTT p50 us | store write p50 us | target |",
        "|---|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for s in summaries:
        if s.c1_p50_us is None:
            continue
        added = "-"
        if s.median_added_p50_us is not None:
            added = f"{s.median_added_p50_us:+.0f}"
            if len(s.added_p50_us) > 1:
                added += f" ({min(s.added_p50_us):+.0f} to {max(s.added_p50_us):+.0f})"
        rtt = "-" if s.rtt_p50_us is None else f"{s.rtt_p50_us:.0f}"
        writes = _median([m["write_p50"] for m in rtts.get(s.store or "", [])])
        write = "-" if writes is None else f"{writes:.0f}"
        p99 = "-" if s.c1_p99_us is None else f"{s.c1_p99_us:.0f}"
        library = "-" if s.mode == "bare" else s.library
        lines.append(
            f"| {s.endpoint} | {s.mode} | {s.store or '-'} | {library} | {s.c1_p50_us:.0f}"
            f" | {added} | {p99} | {rtt} | {write}"
            f" | {_target_cell(s.latency_budget_us, s.meets_latency, '<=', ' us')} |"
        )
    lines += [
        "",
        "wrk -t1 -c1 (one request at a time); p50/p99: medians over passes; added p50: median of"
        " the per-pass difference to the bare app's p50 (range in brackets). Target: added p50 <="
        f" 2 x the store's round trip (p50) + {LATENCY_SLACK_US:.0f} us. Store write: a"
        " committed one-key write (Redis SET; PostgreSQL an autocommit upsert, which waits for"
        " the WAL flush when synchronous_commit is on, as every claim and complete does).",
    ]
    for store, measured in rtts.items():
        if measured:
            lines.append(
                f"Store round trip, {store} ({measured[0]['server']}), per pass p50/p90/p99 us,"
                + (" PING / SET: " if store == "redis" else " SELECT 1 / upsert: ")
                + "; ".join(
                    f"{m['p50']:.0f}/{m['p90']:.0f}/{m['p99']:.0f}"
                    f" / {m['write_p50']:.0f}/{m['write_p90']:.0f}/{m['write_p99']:.0f}"
                    for m in measured
                )
            )
    return "\n".join(lines)


def pinning(cpu: int) -> list[str]:
    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return []
    if not {SERVER_CPU, WRK_CPU} <= os.sched_getaffinity(0):
        return []
    return ["taskset", "-c", str(cpu)]


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Paired HTTP throughput of IdempotencyMiddleware vs the bare app (uvicorn+wrk)."
    )
    parser.add_argument("--passes", type=int, default=3, help="passes over all variants (3)")
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per run (5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per run (1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument(
        "--latency",
        type=int,
        default=2,
        help="seconds of wrk -c1 per run, for the latency at concurrency 1 (2; 0: none)",
    )
    parser.add_argument(
        "--rtt-samples",
        type=int,
        default=2000,
        help="store round trips timed per pass, for the latency target (2000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 pass, 1 s per variant, no warm-up"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run the variants whose name contains this text or matches this glob"
        " (repeatable; the bare apps are always added); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help=f"Redis server ({DEFAULT_REDIS})")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help=f"PostgreSQL database ({DEFAULT_POSTGRES})"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the pass orders")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    parser.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.duration, args.warmup = 1, 1, 0
        args.latency = min(args.latency, 1)
        args.rtt_samples = min(args.rtt_samples, 500)
    if args.passes < 1 or args.duration < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("--passes, --duration and --connections must be >= 1, --warmup >= 0")
    if args.latency < 0 or args.rtt_samples < 100:
        parser.error("--latency must be >= 0 and --rtt-samples >= 100")
    return args


def preflight(variants: list[Variant], args: argparse.Namespace) -> str | None:
    """Why the selected variants cannot run (a library or a store server missing), or None."""
    for library, (dist, _) in COMPETITORS.items():
        if any(v.library == library for v in variants) and version(dist) is None:
            return (
                f"{dist} is not installed: run with `uv run --group bench ...`"
                f" (or leave out its variants: they end in /{library})"
            )
    for kind, url in (("redis", args.redis), ("postgres", args.postgres)):
        if not any(v.store == kind for v in variants):
            continue
        parts = urlsplit(url)
        port = parts.port or (6379 if kind == "redis" else 5432)
        try:
            with socket.create_connection((parts.hostname or HOST, port), timeout=2):
                pass
        except OSError as exc:
            return (
                f"the {kind} server {url} does not answer ({exc}): start it, give --{kind} URL,"
                f" or leave out its variants with --only"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for v in all_variants():
            notes = []
            if v.target is not None:
                notes.append(f">= {v.target:.2f} x bare")
            if v.store is not None and v.library == "retrysafe":
                key = (v.endpoint, v.mode, v.store)
                if key in VERSUS_TARGETS:
                    notes.append(f">= {VERSUS_TARGETS[key]:.2f} x the best competitor")
                if key in LATENCY_TARGETS:
                    notes.append(
                        f"added p50 at -c1 <= {LATENCY_TARGETS[key]} round trips"
                        f" + {LATENCY_SLACK_US:.0f} us"
                    )
            print(f"{v.name:32s}{'; '.join(notes)}".rstrip())
        return 0
    if shutil.which("wrk") is None:
        print(
            "http_bench: the load generator `wrk` is not installed.\n"
            "  Debian/Ubuntu: apt-get install -y wrk    macOS: brew install wrk",
            file=sys.stderr,
        )
        return 2
    loop = args.loop
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http_impl = args.http
    if http_impl == "auto":
        http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    variants = select_variants(args.only)
    if all(v.mode == "bare" for v in variants):
        print("http_bench: --only matched no variant (see --list)", file=sys.stderr)
        return 2
    why = preflight(variants, args)
    if why:
        print(f"http_bench: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    orders = pass_orders(variants, args.passes, seed)
    server_pin, wrk_pin = pinning(SERVER_CPU), pinning(WRK_CPU)
    load_before = os.getloadavg()
    per_run = args.duration + args.warmup + args.latency + 2
    estimate = len(variants) * args.passes * per_run
    shared = [kind for kind in SHARED_STORES if any(v.store == kind for v in variants)]
    run_id = secrets.token_hex(4)
    print(
        f"http_bench: {len(variants)} variants x {args.passes} passes,"
        f" {args.duration} s measured + {args.warmup} s warm-up + {args.latency} s at -c1 each,"
        f" wrk -t1 -c{args.connections} (about {estimate / 60:.1f} min)\n"
        f"  uvicorn 1 worker, --loop {loop} --http {http_impl};"
        f" pinning: {'server CPU 0, wrk CPU 1' if server_pin else 'none (no taskset or < 2 CPUs)'}"
        f"; load average {load_before[0]:.2f}, seed {seed}, run id {run_id}",
        flush=True,
    )
    runs: list[Run] = []
    rtts: dict[str, list[dict[str, Any]]] = {kind: [] for kind in shared}
    urls = {"redis": args.redis, "postgres": args.postgres}
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="retrysafe-bench-") as tmp:
            setup = Setup(
                server_pin=server_pin,
                wrk_pin=wrk_pin,
                loop=loop,
                http=http_impl,
                duration=args.duration,
                warmup=args.warmup,
                connections=args.connections,
                latency=args.latency,
                workdir=Path(tmp),
                redis_url=args.redis,
                postgres_url=args.postgres,
                run_id=run_id,
            )
            for pass_index, order in enumerate(orders):
                for kind in shared:
                    scratch = f"{RUN_TAG}{'-' if kind == 'redis' else '_'}{run_id}_rtt"
                    rtt = measure_rtt(kind, urls[kind], args.rtt_samples, scratch)
                    rtts[kind].append(rtt)
                    print(
                        f"  pass {pass_index + 1}/{args.passes} {kind} round trip"
                        f" p50 {rtt['p50']:.0f} us, p99 {rtt['p99']:.0f} us; a write p50"
                        f" {rtt['write_p50']:.0f} us, p99 {rtt['write_p99']:.0f} us"
                        f" ({rtt['server']})",
                        flush=True,
                    )
                for position, variant in enumerate(order):
                    run = measure(variant, pass_index, position, setup)
                    runs.append(run)
                    flag = "  <-- " + "; ".join(run.problems) if run.problems else ""
                    cpu = run.cpu_us_per_request
                    c1 = run.c1_latency_us.get("p50")
                    print(
                        f"  pass {pass_index + 1}/{args.passes}"
                        f" [{position + 1:2d}/{len(order)}] {variant.name:28s}"
                        f" {run.rps:9,.0f} req/s"
                        + (f"  {cpu:5.0f} us CPU/req" if cpu is not None else "")
                        + (
                            f"  server {run.server_cpu_util:4.0%} wrk {run.wrk_cpu_util:4.0%} CPU"
                            if run.server_cpu_util is not None and run.wrk_cpu_util is not None
                            else ""
                        )
                        + (f"  c1 p50 {c1:5.0f} us" if c1 is not None else "")
                        + flag,
                        flush=True,
                    )
    finally:
        # Whatever an interrupted run left behind in the shared stores.
        if "redis" in shared:
            redis_delete(args.redis, f"*{RUN_TAG}-{run_id}_*")
        if "postgres" in shared:
            postgres_drop(args.postgres, rf"{RUN_TAG}\_{run_id}\_%")
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    summaries = summarise(variants, runs, rtts)
    rivals = versus(variants, runs)

    print()
    print(
        f"## retrysafe HTTP bench: {args.passes} pass(es), {args.duration} s each,"
        f" wrk -t1 -c{args.connections}, uvicorn --loop {loop} --http {http_impl}"
    )
    print()
    print(
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
        f" ({os.cpu_count()} CPUs); ratios are paired within each pass."
    )
    print()
    print(markdown_table(summaries))
    if rivals:
        print("\n### Against the competitors\n")
        print(versus_table(rivals, summaries))
    if args.latency > 0:
        print("\n### Latency at concurrency 1\n")
        print(latency_table(summaries, rtts))
    saturated = [
        s.variant for s in summaries if s.max_wrk_cpu_util and s.max_wrk_cpu_util > WRK_SATURATED
    ]
    if saturated:
        print(
            f"\nWARNING: wrk used over {WRK_SATURATED:.0%} of its CPU in {', '.join(saturated)}:"
            " the load generator, not the server, may have been the bottleneck there."
        )

    results_path = args.output or RESULTS_DIR / time.strftime("http-%Y%m%d-%H%M%S.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(elapsed, 1),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seed": seed,
            "run_id": run_id,
            "loop": loop,
            "http": http_impl,
            "pinning": {"server": server_pin, "wrk": wrk_pin},
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "python": sys.version,
            "platform": platform.platform(),
            "versions": {
                d: version(d)
                for d in (
                    "retrysafe",
                    "uvicorn",
                    "fastapi",
                    "starlette",
                    "pydantic",
                    "uvloop",
                    "httptools",
                    "redis",
                    "hiredis",
                    "asyncpg",
                    *(dist for dist, _ in COMPETITORS.values()),
                )
            },
            "git": git_state(),
            "targets": {"/".join(p or "*" for p in k): t for k, t in TARGETS.items()},
            "versus_targets": {"/".join(k): t for k, t in VERSUS_TARGETS.items()},
            "latency_targets": {
                "/".join(k): f"{n} round trips + {LATENCY_SLACK_US:.0f} us"
                for k, n in LATENCY_TARGETS.items()
            },
        },
        "store_rtt_us": rtts,
        "summary": [asdict(s) for s in summaries],
        "versus": [asdict(r) for r in rivals],
        "runs": [asdict(r) | {"cpu_us_per_request": r.cpu_us_per_request} for r in runs],
    }
    results_path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {results_path}")

    problems = [(s.variant, p) for s in summaries for p in s.problems]
    if problems:
        bar = "!" * 78
        print(f"\n{bar}\nPROBLEMS (correctness, not speed):", file=sys.stderr)
        for name, problem in problems:
            print(f"  {name}: {problem}", file=sys.stderr)
        print(bar, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
