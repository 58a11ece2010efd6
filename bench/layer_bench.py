"""What IdempotencyMiddleware itself costs per request, in-process, without HTTP or a network.

Drives the ASGI apps of ``http_bench.py`` (the FastAPI endpoint and the trivial ASGI one) with
hand-made ASGI messages on one event loop, bare and behind the middleware, and reports the
microseconds the layer adds per request: the part of every HTTP figure that retrysafe's own
Python decides. The stores are the in-process ones (``memory://``, and ``sqlite://`` on a
temporary file), so a network round trip never hides the layer's own work.

    uv run --group bench python bench/layer_bench.py                  # about a minute
    uv run --group bench python bench/layer_bench.py --rounds 5 --batch 500   # a smoke run

Variants run interleaved, in rounds: each round times ``--batch`` requests of every variant
(in a shuffled order); a variant's "added us" is the median over rounds of its per-request
time minus the bare app's in the same round, so slow phases of a shared machine hit both.
Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_bench import BODY, PATH, asgi_app, fastapi_app

from retrysafe import IdempotencyMiddleware

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]

MODES = ("nokey", "fresh", "replay")


def build(endpoint: str, store: str | None) -> ASGIApp:
    """The endpoint's app, bare (``store`` None) or behind the middleware on ``store``."""
    if endpoint == "fastapi":
        app = fastapi_app()
        if store is not None:
            app.add_middleware(IdempotencyMiddleware, store=store)
        return app
    return asgi_app if store is None else IdempotencyMiddleware(asgi_app, store=store)


def request_scope(key: bytes | None) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"authorization", b"Bearer bench"),
    ]
    if key is not None:
        headers.append((b"idempotency-key", key))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }


async def call(app: ASGIApp, key: bytes | None) -> int:
    """One request through ``app``; its status (and a check that it answered in full)."""
    delivered = False
    status = 0
    finished = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # the client stays: never a disconnect
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status, finished
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            finished = True

    await app(request_scope(key), receive, send)
    if not finished:
        raise RuntimeError("the app did not finish its response")
    return status


class Variant:
    def __init__(self, endpoint: str, mode: str, store: str | None, url: str | None) -> None:
        self.endpoint, self.mode, self.store = endpoint, mode, store
        self.name = f"{endpoint}/{mode}" + (f"/{store}" if store else "")
        self.app = build(endpoint, url)
        self.serial = 0
        self.times: list[float] = []

    def keys(self, n: int) -> list[bytes | None]:
        if self.mode == "bare" or self.mode == "nokey":
            return [None] * n
        if self.mode == "replay":
            return [b"replayed-key"] * n
        start, self.serial = self.serial, self.serial + n
        return [b"fresh-%d" % i for i in range(start, start + n)]

    async def check(self) -> None:
        """The middleware is really in the way: a fresh key is recorded and replayed."""
        first = await call(self.app, b"check-key")
        if first != 201:
            raise RuntimeError(f"{self.name}: answered {first}")
        if self.mode == "replay":
            await call(self.app, b"replayed-key")

    async def timed(self, n: int) -> float:
        keys = self.keys(n)
        app = self.app
        start = time.perf_counter()
        for key in keys:
            await call(app, key)
        return (time.perf_counter() - start) / n * 1e6


async def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="retrysafe-layer-"))
    variants: list[Variant] = []
    for endpoint in args.endpoint:
        variants.append(Variant(endpoint, "bare", None, None))
        for store in args.store:
            url = "memory://" if store == "memory" else f"sqlite:///{folder}/{endpoint}.db"
            for mode in MODES:
                variants.append(Variant(endpoint, mode, store, url))
    for variant in variants:
        await variant.check()
        await variant.timed(args.batch)  # warm-up
    rng = random.Random(args.seed)
    gc.collect()
    for _ in range(args.rounds):
        order = variants[:]
        rng.shuffle(order)
        for variant in order:
            variant.times.append(await variant.timed(args.batch))
    print(
        f"{args.rounds} rounds x {args.batch} requests per variant; Python {sys.version.split()[0]}"
    )
    print(f"{'variant':28s} {'us/req':>8s} {'added us':>9s} {'(min-max)':>16s} {'x bare':>7s}")
    bare_of = {v.endpoint: v for v in variants if v.mode == "bare"}
    for variant in variants:
        bare = bare_of[variant.endpoint]
        added = [t - b for t, b in zip(variant.times, bare.times, strict=True)]
        ratio = [b / t for t, b in zip(variant.times, bare.times, strict=True)]
        print(
            f"{variant.name:28s} {statistics.median(variant.times):8.1f}"
            f" {statistics.median(added):+9.1f} {f'({min(added):+.0f} to {max(added):+.0f})':>16s}"
            f" {statistics.median(ratio):7.2f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2000, help="requests per variant per round")
    parser.add_argument(
        "--endpoint", action="append", choices=["asgi", "fastapi"], help="default: both"
    )
    parser.add_argument(
        "--store", action="append", choices=["memory", "sqlite"], help="default: both"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.endpoint = args.endpoint or ["asgi", "fastapi"]
    args.store = args.store or ["memory", "sqlite"]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the bench group has it
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
