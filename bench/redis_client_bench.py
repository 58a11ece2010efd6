"""How much client CPU a ledger call costs: our RESP client against redis-py (asyncio, hiredis).

Every call is the ledger's real claim script (``EVALSHA``, one fresh key, five arguments), on
the same server, through:

* ``resp``: :mod:`retrysafe.stores._resp` alone (one pipelined connection);
* ``store``: :meth:`RedisStore.claim` (the same client plus the store's own work: key, routing,
  reply decoding);
* ``redis-py``: ``redis.asyncio.Redis.evalsha`` (its connection pool, hiredis parser).

Each pass runs every client once, in an order that rotates from pass to pass (paired and
interleaved, so a slow phase of a shared machine hits all of them), both one call at a time
(``serial``: latency-bound) and ``--concurrency`` calls in flight (``concurrent``: what a busy
server does). The figures are medians over the passes of the process CPU time per call (what
the client costs the application) and of the wall time per call; the ratio is redis-py's over
ours. Usage::

    uv run python bench/redis_client_bench.py [--url redis://127.0.0.1:6379/0] [--calls 5000]
        [--passes 7] [--concurrency 32] [--uvloop]

Records are written under a random ``bench-*`` prefix with a 5 s ttl: they expire by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from retrysafe.stores import _resp
from retrysafe.stores.redis import _STANDALONE_SCRIPTS, RedisStore

Call = Callable[[bytes], Awaitable[object]]

TOKEN, FINGERPRINT, LEASE, TTL, SCOPE = b"12345678901234567", b"f" * 32, b"5.0", b"5.0", b"s" * 8


async def measure(call: Call, keys: list[bytes], concurrency: int) -> tuple[float, float]:
    """Run ``call`` on every key, ``concurrency`` at a time; CPU and wall us per call."""
    cpu, wall = time.process_time(), time.perf_counter()
    if concurrency <= 1:
        for key in keys:
            await call(key)
    else:
        for start in range(0, len(keys), concurrency):
            await asyncio.gather(*(call(k) for k in keys[start : start + concurrency]))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / len(keys) * 1e6, wall / len(keys) * 1e6


async def main(args: argparse.Namespace) -> None:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    db = int(parts.path.strip("/") or 0)
    script = _STANDALONE_SCRIPTS.claim
    prefix = f"bench-{uuid.uuid4().hex[:8]}"

    conn = await _resp.connect(host, port, timeout=5.0, db=db)
    store = RedisStore.from_url(f"{args.url}?prefix={prefix}-store")
    client = aioredis.Redis(host=host, port=port, db=db)
    sha = script.sha.decode()
    await client.script_load(script.source)

    async def ours(key: bytes) -> object:
        reply = await conn.send(script.call(key, (TOKEN, FINGERPRINT, LEASE, TTL, SCOPE)))
        assert reply == 0, reply
        return reply

    async def via_store(key: bytes) -> object:
        return await store.claim(key, 12345678901234567, FINGERPRINT, 5.0, 5.0, scope=SCOPE)

    async def redis_py(key: bytes) -> object:
        reply = await client.evalsha(sha, 1, key, TOKEN, FINGERPRINT, LEASE, TTL, SCOPE)
        assert reply == 0, reply
        return reply

    clients: dict[str, Call] = {"resp": ours, "store": via_store, "redis-py": redis_py}
    modes = {"serial": 1, "concurrent": args.concurrency}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    counter = 0

    def fresh_keys(name: str) -> list[bytes]:
        nonlocal counter
        counter += 1
        if name == "store":  # the store builds its own key from a 32-byte rid
            return [os.urandom(32) for _ in range(args.calls)]
        return [f"{prefix}:{counter}:{i}".encode() for i in range(args.calls)]

    names = list(clients)
    for concurrency in modes.values():  # warm-up: connections, scripts, code paths
        for name in names:
            await measure(clients[name], fresh_keys(name)[: args.calls // 5], concurrency)
    for p in range(args.passes):
        order = names[p % len(names) :] + names[: p % len(names)]
        for mode, concurrency in modes.items():
            for name in order:
                figures = await measure(clients[name], fresh_keys(name), concurrency)
                results.setdefault((mode, name), []).append(figures)

    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"EVALSHA claim, {args.calls} calls x {args.passes} passes, loop: {loop}, {args.url}")
    print(f"{'mode':<11} {'client':<9} {'CPU us/call':>11} {'wall us/call':>12} {'CPU x ours':>10}")
    for mode in modes:
        base = statistics.median(c for c, _ in results[(mode, "resp")])
        for name in names:
            cpu = statistics.median(c for c, _ in results[(mode, name)])
            wall = statistics.median(w for _, w in results[(mode, name)])
            print(f"{mode:<11} {name:<9} {cpu:>11.1f} {wall:>12.1f} {cpu / base:>10.2f}")
    ratio = {
        mode: statistics.median(c for c, _ in results[(mode, "redis-py")])
        / statistics.median(c for c, _ in results[(mode, "resp")])
        for mode in modes
    }
    print(
        "redis-py / ours, CPU per call: "
        + ", ".join(f"{mode} {value:.1f}x" for mode, value in ratio.items())
    )
    conn.close()
    await store.aclose()
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (bench group)")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        uvloop.run(main(options))
    else:
        asyncio.run(main(options))
