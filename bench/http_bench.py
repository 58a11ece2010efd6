"""HTTP throughput of IdempotencyMiddleware, as paired ratios to the bare app.

Run ``uv run --group bench python bench/http_bench.py [--passes 3] [--duration 5] [--quick]``
(see bench/README.md). For every pass, each variant gets a fresh uvicorn server (1 worker,
pinned to CPU 0 when ``taskset`` and two CPUs are there), a warm-up and a measured ``wrk`` run
(pinned to CPU 1). Passes visit the variants in a different order each; each variant's ratio
to the bare app of the same endpoint is taken within a pass, and the medians are reported.

This module is also the server: uvicorn imports :func:`server_app` from it, configured by the
``RETRYSAFE_BENCH_*`` environment variables.
"""

from __future__ import annotations

import argparse
import http.client
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
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel

from retrysafe import IdempotencyMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Endpoint = Literal["fastapi", "asgi"]
Mode = Literal["bare", "nokey", "fresh", "replay"]
StoreKind = Literal["memory", "sqlite"]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
ENV_ENDPOINT = "RETRYSAFE_BENCH_ENDPOINT"
ENV_STORE = "RETRYSAFE_BENCH_STORE"
HOST = "127.0.0.1"
PATH = "/items"
BODY = b'{"name":"widget","price":9.99,"quantity":2}'
REPLAY_KEY = "bench-replay-0001"
RESULT_MARK = "@@BENCH "
SERVER_CPU, WRK_CPU = 0, 1
WRK_SATURATED = 0.9
WARNING_EVENTS = ("store-error", "fail-open", "corrupt-record", "lease-lost")
"""retrysafe's warning-level decisions, as its log hook writes them (to the server log)."""

# Targets on the 2-core reference box: (endpoint, mode, store) -> minimum ratio to bare.
# None in a key matches any. A replay of the trivial ASGI endpoint does strictly more work than
# that endpoint (hashing, a ledger read, decoding), so no speed-up target applies to it.
TARGETS: dict[tuple[Endpoint | None, Mode, StoreKind | None], float] = {
    (None, "nokey", None): 0.95,
    ("fastapi", "fresh", "sqlite"): 0.60,
    ("fastapi", "replay", None): 1.30,
}


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
    """A small FastAPI POST endpoint: a pydantic body in, JSON 201 out."""
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


def server_app() -> ASGIApp:
    """The app uvicorn serves (``--factory``): endpoint and store from the environment."""
    endpoint = os.environ.get(ENV_ENDPOINT, "fastapi")
    store = os.environ.get(ENV_STORE, "")
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

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.endpoint, self.mode, self.store) if p)

    @property
    def target(self) -> float | None:
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
    for endpoint in ("fastapi", "asgi"):
        variants.append(Variant(endpoint, "bare"))
        for mode in ("nokey", "fresh", "replay"):
            for store in ("memory", "sqlite"):
                variants.append(Variant(endpoint, mode, store))
    return variants


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
    def non_2xx(self) -> dict[str, int]:
        return {s: n for s, n in self.statuses.items() if not s.startswith("2")}

    @property
    def socket_errors(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind != "status")


@dataclass
class Run:
    """One variant measured once, in one pass."""

    variant: str
    pass_index: int
    order: int
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


def sanity_check(variant: Variant, port: int) -> None:
    """One or two requests by hand: the variant answers what the measurement assumes."""
    mode = variant.mode
    key = None
    if mode == "fresh":
        key = "sanity-" + secrets.token_hex(8)
    elif mode == "replay":
        key = REPLAY_KEY  # the priming request: executed and stored
    status, headers, body = post(port, key)
    if status != 201 or "idempotent-replayed" in headers:
        raise BenchError(f"first request: {status} {headers} {body[:300]!r}")
    if mode == "replay":
        status, headers, body = post(port, key)
        if status != 201 or headers.get("idempotent-replayed") != "true":
            raise BenchError(f"replay request: {status} {headers} {body[:300]!r}")


@dataclass(frozen=True)
class Setup:
    server_pin: list[str]
    wrk_pin: list[str]
    loop: str
    http: str
    duration: int
    warmup: int
    connections: int
    workdir: Path


def measure(variant: Variant, pass_index: int, order: int, setup: Setup) -> Run:
    run = Run(variant.name, pass_index, order)
    rundir = setup.workdir / f"pass{pass_index}-{variant.name.replace('/', '-')}"
    rundir.mkdir()
    script = rundir / "bench.lua"
    script.write_text(lua_script(variant.mode))
    env = dict(os.environ)
    env[ENV_ENDPOINT] = variant.endpoint
    env[ENV_STORE] = {
        None: "",
        "memory": "memory://",
        "sqlite": f"sqlite:///{rundir / 'ledger.db'}",  # absolute path: four slashes
    }[variant.store]
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
    with log.open("wb") as log_file:
        process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
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
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        run.problems.append(f"not measured: {exc}")
    finally:
        stop(process)
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
    for label, statuses in (("warm-up", run.warmup_statuses), ("measured", run.statuses)):
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
    if variant.mode == "replay" and run.requests and run.replayed != run.requests:
        run.problems.append(
            f"only {run.replayed} of {run.requests} responses were replays (Idempotent-Replayed)"
        )
    if variant.mode != "replay" and run.replayed:
        run.problems.append(f"{run.replayed} responses were replays, none should be")
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


@dataclass
class Summary:
    variant: str
    endpoint: str
    mode: str
    store: str | None
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
    non_2xx: dict[str, int]
    problems: list[str]


def summarise(variants: list[Variant], runs: list[Run]) -> list[Summary]:
    by_pass = {(r.pass_index, r.variant): r for r in runs}
    passes = sorted({r.pass_index for r in runs})
    out = []
    for v in variants:
        mine = [r for r in runs if r.variant == v.name and r.requests]
        bare_name = Variant(v.endpoint, "bare").name
        ratios, cpu_ratios = [], []
        for p in passes:
            run, bare = by_pass.get((p, v.name)), by_pass.get((p, bare_name))
            if not (run and bare):
                continue
            if run.rps and bare.rps:
                ratios.append(run.rps / bare.rps)
            mine_cpu, bare_cpu = run.cpu_us_per_request, bare.cpu_us_per_request
            if mine_cpu and bare_cpu:
                cpu_ratios.append(bare_cpu / mine_cpu)
        median_ratio = statistics.median(ratios) if ratios else None
        non_2xx: dict[str, int] = {}
        for r in runs:
            if r.variant == v.name:
                for s, n in r.statuses.items():
                    if not s.startswith("2"):
                        non_2xx[s] = non_2xx.get(s, 0) + n
        cpu = [c for r in mine if (c := r.cpu_us_per_request) is not None]
        util = [r.server_cpu_util for r in mine if r.server_cpu_util is not None]
        p99 = [r.latency_us["p99"] / 1000 for r in mine if "p99" in r.latency_us]
        wrk_util = [r.wrk_cpu_util for r in mine if r.wrk_cpu_util is not None]
        target = v.target
        out.append(
            Summary(
                variant=v.name,
                endpoint=v.endpoint,
                mode=v.mode,
                store=v.store,
                median_rps=statistics.median([r.rps for r in mine]) if mine else 0.0,
                ratios=ratios,
                median_ratio=median_ratio,
                cpu_ratios=cpu_ratios,
                median_cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else None,
                target=target,
                meets_target=(
                    None if target is None or median_ratio is None else median_ratio >= target
                ),
                median_cpu_us=statistics.median(cpu) if cpu else None,
                median_cpu_util=statistics.median(util) if util else None,
                median_p99_ms=statistics.median(p99) if p99 else None,
                max_wrk_cpu_util=max(wrk_util) if wrk_util else None,
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


def _ratio_cell(median: float | None, ratios: list[float]) -> str:
    if median is None:
        return "n/a"
    if len(ratios) > 1:
        return f"{median:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    return f"{median:.2f}"


def markdown_table(summaries: list[Summary]) -> str:
    lines = [
        "| endpoint | variant | store | req/s | x bare | target | server CPU us/req"
        " | x bare by CPU | server CPU % | p99 ms | non-2xx |",
        "|---|---|---|--:|--:|---|--:|--:|--:|--:|---|",
    ]
    for s in summaries:
        if s.target is None:
            target = "-"
        else:
            target = f">= {s.target:.2f} " + ("PASS" if s.meets_target else "MISS")
        cpu = "-" if s.median_cpu_us is None else f"{s.median_cpu_us:.0f}"
        util = "-" if s.median_cpu_util is None else f"{s.median_cpu_util * 100:.0f}"
        p99 = "-" if s.median_p99_ms is None else f"{s.median_p99_ms:.1f}"
        non_2xx = ", ".join(f"{k}: {n}" for k, n in sorted(s.non_2xx.items())) or "0"
        lines.append(
            f"| {s.endpoint} | {s.mode} | {s.store or '-'} | {s.median_rps:,.0f}"
            f" | {_ratio_cell(s.median_ratio, s.ratios)} | {target} | {cpu}"
            f" | {_ratio_cell(s.median_cpu_ratio, s.cpu_ratios)} | {util} | {p99} | {non_2xx} |"
        )
    lines += [
        "",
        "req/s, server CPU and p99: medians over passes. x bare: median of the per-pass ratio of"
        " req/s to the bare app of the same endpoint (min-max over passes in brackets); the target"
        " applies to it. x bare by CPU: the same ratio computed from server CPU time per request"
        " (bare us/req / variant us/req), less sensitive to other load on the server's CPU."
        " server CPU % below ~95 means the server was not the only thing running on its CPU.",
    ]
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
        "--quick", action="store_true", help="smoke run: 1 pass, 1 s per variant, no warm-up"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run variants whose name contains this"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the pass orders")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    parser.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.duration, args.warmup = 1, 1, 0
    if args.passes < 1 or args.duration < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("--passes, --duration and --connections must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
    variants = [v for v in all_variants() if not args.only or any(o in v.name for o in args.only)]
    if not variants:
        print("http_bench: --only matched no variant", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    orders = pass_orders(variants, args.passes, seed)
    server_pin, wrk_pin = pinning(SERVER_CPU), pinning(WRK_CPU)
    load_before = os.getloadavg()
    estimate = len(variants) * args.passes * (args.duration + args.warmup + 2)
    print(
        f"http_bench: {len(variants)} variants x {args.passes} passes,"
        f" {args.duration} s measured + {args.warmup} s warm-up each, wrk -t1 -c{args.connections}"
        f" (about {estimate / 60:.1f} min)\n"
        f"  uvicorn 1 worker, --loop {loop} --http {http_impl};"
        f" pinning: {'server CPU 0, wrk CPU 1' if server_pin else 'none (no taskset or < 2 CPUs)'}"
        f"; load average {load_before[0]:.2f}, seed {seed}",
        flush=True,
    )
    runs: list[Run] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="retrysafe-bench-") as tmp:
        setup = Setup(
            server_pin=server_pin,
            wrk_pin=wrk_pin,
            loop=loop,
            http=http_impl,
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            workdir=Path(tmp),
        )
        for pass_index, order in enumerate(orders):
            for position, variant in enumerate(order):
                run = measure(variant, pass_index, position, setup)
                runs.append(run)
                flag = "  <-- " + "; ".join(run.problems) if run.problems else ""
                cpu = run.cpu_us_per_request
                print(
                    f"  pass {pass_index + 1}/{args.passes}"
                    f" [{position + 1:2d}/{len(order)}] {variant.name:24s}"
                    f" {run.rps:9,.0f} req/s"
                    + (f"  {cpu:5.0f} us CPU/req" if cpu is not None else "")
                    + (
                        f"  server {run.server_cpu_util:4.0%} wrk {run.wrk_cpu_util:4.0%} CPU"
                        if run.server_cpu_util is not None and run.wrk_cpu_util is not None
                        else ""
                    )
                    + flag,
                    flush=True,
                )
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    summaries = summarise(variants, runs)

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
                )
            },
            "git": git_state(),
            "targets": {"/".join(p or "*" for p in k): t for k, t in TARGETS.items()},
        },
        "summary": [asdict(s) for s in summaries],
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
