"""How fast ``retrysafe gateway`` forwards: the gateway before an upstream vs the upstream direct.

Paired and interleaved: every pass measures, for each upstream (a trivial pure-ASGI endpoint and
a small FastAPI endpoint, both from ``http_bench.py``), the upstream direct, the gateway with no
key, and the gateway with a fresh key per request (SQLite ledger, a new file per run), in an
order that alternates between passes. Ratios are taken within a pass (gateway / direct of the
same pass), then the median over passes is reported. wrk's Lua script and the upstreams are
``http_bench.py``'s, imported, so the numbers compare with the middleware's.

    uv run python bench/gateway_bench.py                # 3 passes x 5 s
    uv run python bench/gateway_bench.py --quick        # smoke: 1 pass x 2 s

The upstream and the gateway run one worker each (uvicorn, uvloop, httptools); the gateway
without its access log. Nothing is pinned: on a 2-core box wrk, the gateway and the upstream
share both cores, as they would on a small host.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from http_bench import (
    BENCH_DIR,
    ENV_ENDPOINT,
    HOST,
    RESULTS_DIR,
    BenchError,
    free_port,
    lua_script,
    post,
    run_wrk,
    stop,
    wait_until_serving,
)

UPSTREAMS = {"trivial": "asgi", "fastapi": "fastapi"}
MODES = ("direct", "nokey", "fresh")
TARGETS = {("fastapi", "nokey"): 0.75, ("fastapi", "fresh"): 0.45, ("trivial", "nokey"): 0.25}
"""Gateway req/s over direct req/s (issue 4, on a 2-core box)."""


@dataclass
class Result:
    upstream: str
    mode: str
    pass_index: int
    rps: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    p50_us: float = 0.0
    problems: list[str] = field(default_factory=list)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_upstream(name: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, **{ENV_ENDPOINT: UPSTREAMS[name]})
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(BENCH_DIR),
        "http_bench:server_app", "--host", HOST, "--port", str(port), "--workers", "1",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    log = workdir / f"upstream-{name}.log"
    process = start(command, env, log)
    wait_until_serving(port, process, log)
    return process, port


def start_gateway(
    upstream_port: int, rundir: Path, workers: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [
        sys.executable, "-m", "retrysafe", "gateway",
        "--upstream", f"http://{HOST}:{upstream_port}", "--host", HOST, "--port", str(port),
        "--store", f"sqlite:///{rundir / 'ledger.db'}", "--no-access-log",
        "--log-level", "warning", "--workers", str(workers),
    ]  # fmt: skip
    log = rundir / "gateway.log"
    process = start(command, dict(os.environ), log)
    wait_until_serving(port, process, log)
    return process, port


def sanity(mode: str, port: int) -> None:
    """Fresh keys are really recorded (a repeat is replayed); other requests are not."""
    key = "sanity-" + secrets.token_hex(6) if mode == "fresh" else None
    status, headers, body = post(port, key)
    if status != 201 or "idempotent-replayed" in headers:
        raise BenchError(f"{mode}: first request answered {status} {headers}")
    if key is not None:
        status, headers, again = post(port, key)
        if headers.get("idempotent-replayed") != "true" or again != body:
            raise BenchError(f"{mode}: the repeated key was not replayed: {status} {headers}")


def measure(
    name: str,
    mode: str,
    upstream_port: int,
    pass_index: int,
    args: argparse.Namespace,
    workdir: Path,
) -> Result:
    result = Result(name, mode, pass_index)
    rundir = workdir / f"pass{pass_index}-{name}-{mode}"
    rundir.mkdir()
    script = rundir / "bench.lua"
    script.write_text(lua_script("fresh" if mode == "fresh" else "nokey"))
    gateway = None
    try:
        port = upstream_port
        if mode != "direct":
            gateway, port = start_gateway(upstream_port, rundir, args.gateway_workers)
        sanity(mode, port)
        if args.warmup:
            run_wrk([], script, port, args.warmup, args.connections)
        wrk = run_wrk([], script, port, args.duration, args.connections)
        result.rps = wrk.rps
        result.statuses = wrk.statuses
        result.replayed = wrk.replayed
        result.p50_us = wrk.latency_us.get("p50", 0.0)
        bad = {s: n for s, n in wrk.statuses.items() if s != "201"}
        if bad or wrk.replayed or wrk.socket_errors:
            result.problems.append(f"statuses {wrk.statuses}, replayed {wrk.replayed}")
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        result.problems.append(f"not measured: {exc}")
    finally:
        if gateway is not None:
            stop(gateway)
    return result


def summarise(results: list[Result]) -> tuple[str, dict[str, object]]:
    lines = [
        "| upstream | mode | req/s (median) | p50 µs | gateway/direct (median; passes) | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    summary: dict[str, object] = {}
    for name in UPSTREAMS:
        direct = {r.pass_index: r.rps for r in results if r.upstream == name and r.mode == "direct"}
        for mode in MODES:
            runs = [r for r in results if r.upstream == name and r.mode == mode and r.rps]
            if not runs:
                continue
            rps = statistics.median(r.rps for r in runs)
            p50 = statistics.median(r.p50_us for r in runs)
            ratios = [r.rps / direct[r.pass_index] for r in runs if direct.get(r.pass_index)]
            ratio = statistics.median(ratios) if ratios and mode != "direct" else None
            target = TARGETS.get((name, mode))
            met = "" if target is None or ratio is None else (
                f"≥ {target:.2f} {'met' if ratio >= target else 'MISSED'}"
            )  # fmt: skip
            ratio_cell = (
                "" if ratio is None else f"{ratio:.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
            )
            lines.append(f"| {name} | {mode} | {rps:,.0f} | {p50:,.0f} | {ratio_cell} | {met} |")
            summary[f"{name}/{mode}"] = {
                "rps": rps,
                "p50_us": p50,
                "ratio": ratio,
                "ratios": ratios,
            }
    return "\n".join(lines), summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--gateway-workers", type=int, default=1, help="the gateway's --workers (default 1)"
    )
    parser.add_argument("--only", choices=list(UPSTREAMS), action="append", help="upstream(s)")
    parser.add_argument("--quick", action="store_true", help="1 pass of 2 s (a smoke run)")
    parser.add_argument("--output", type=Path, help="write the runs and summary as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.duration = 1, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(UPSTREAMS)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        for name in names:
            upstream, upstream_port = start_upstream(name, workdir)
            try:
                for pass_index in range(args.passes):
                    order = list(MODES) if pass_index % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        result = measure(name, mode, upstream_port, pass_index, args, workdir)
                        results.append(result)
                        print(
                            f"pass {pass_index + 1} {name:8} {mode:7} {result.rps:9,.0f} req/s"
                            + (
                                f"  PROBLEM: {'; '.join(result.problems)}"
                                if result.problems
                                else ""
                            ),
                            file=sys.stderr,
                        )
            finally:
                stop(upstream)
    table, summary = summarise(results)
    print(table)
    if args.output is not None:
        RESULTS_DIR.mkdir(exist_ok=True)
        document = {"runs": [r.__dict__ for r in results], "summary": summary}
        args.output.write_text(json.dumps(document, indent=2))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
