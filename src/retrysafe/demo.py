"""``retrysafe demo``: a payments API under real uvicorn, a retrying client on a flaky network.

The same faults are played against the bare API and against it behind IdempotencyMiddleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from .asgi import ASGIApp, IdempotencyMiddleware, Message, Receive, Scope, Send
from .stores import SQLiteStore

__all__ = ["Demo", "Plan", "Purchase", "Run", "format_report", "make_plan", "run_demo", "serve"]

# Times are scaled down so that the two runs take a few seconds, but keep real proportions:
# a slow charge outlasts the client's timeout, and the client's waits are short next to both.
CLIENT_TIMEOUT = 0.25
"""Seconds the client waits for a response before it gives up on an attempt and retries."""
LATENCY = 0.02
"""Seconds an ordinary charge takes: long enough for a double-click to overlap it."""
SLOW_LATENCY = 0.6
"""Seconds a slow charge takes: well past the client's timeout."""
RETRY_AFTER_CAP = 0.1
"""The client honours ``Retry-After`` (1 s from retrysafe) up to this many seconds."""
BACKOFF_BASE = 0.02
BACKOFF_CAP = 0.2
MAX_ATTEMPTS = 40
PURCHASE_DEADLINE = 10.0
SHOPPERS = 4
"""Purchases made at the same time."""

P_DOUBLE_CLICK = 0.15
P_SLOW = 0.1
P_LOST = 0.2
P_LOST_AGAIN = 0.25

_LOSE = "retrysafe.demo.lose_response"
"""Request extension telling the flaky network to drop this attempt's response."""


# -- the plan: the faults both runs face ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purchase:
    """One logical purchase, its key, and the faults it will meet."""

    order: str
    amount: int
    key: str
    clicks: int
    """2 when the buyer double-clicks: two concurrent POSTs with the same key."""
    slow: bool
    """The card processor takes longer than the client's timeout on the order's first charge."""
    lost: frozenset[tuple[int, int]]
    """(click, attempt) pairs whose response the network drops after the server answered."""


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    purchases: tuple[Purchase, ...]

    @property
    def double_clicks(self) -> int:
        return sum(p.clicks > 1 for p in self.purchases)

    @property
    def slow(self) -> int:
        return sum(p.slow for p in self.purchases)

    @property
    def lost(self) -> int:
        return sum(len(p.lost) for p in self.purchases)


def make_plan(purchases: int, seed: int) -> Plan:
    """Draw every purchase's key and faults from ``seed``, before either run starts."""
    rng = random.Random(seed)
    plan = []
    for n in range(1, purchases + 1):
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        clicks = 2 if rng.random() < P_DOUBLE_CLICK else 1
        slow = rng.random() < P_SLOW
        lost = set()
        # A slow charge already times out; a lost response on top of it would never be seen.
        for click in range(clicks) if not slow else ():
            if rng.random() < P_LOST:
                lost.add((click, 1))
                if rng.random() < P_LOST_AGAIN:
                    lost.add((click, 2))
        amount = rng.randrange(500, 10000, 5)
        plan.append(Purchase(f"order-{n:04d}", amount, key, clicks, slow, frozenset(lost)))
    return Plan(seed, tuple(plan))


# -- the server -------------------------------------------------------------------------------


class PaymentsAPI:
    """``POST /charges`` charges a card: every request that reaches it makes a new charge."""

    def __init__(self, slow_orders: frozenset[str]) -> None:
        self.slow_orders = slow_orders
        self.charges: list[tuple[str, str]] = []
        """(charge id, order) for every charge made."""
        self.in_flight = 0
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._seen: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] == "/charges":
                self.in_flight += 1
                try:
                    await self._charge(receive, send)
                finally:
                    self.in_flight -= 1
            else:
                await _respond(send, 404, {"error": "not found"})

    async def _charge(self, receive: Receive, send: Send) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = json.loads(body)
            order, amount = str(request["order"]), int(request["amount"])
        except (ValueError, KeyError, TypeError):
            await _respond(send, 400, {"error": "expected {order, amount}"})
            return
        slow = order in self.slow_orders and order not in self._seen
        self._seen.add(order)
        await asyncio.sleep(SLOW_LATENCY if slow else LATENCY)
        charge = f"ch_{len(self.charges) + 1:04d}"
        self.charges.append((charge, order))
        document = {"id": charge, "order": order, "amount": amount}
        await _respond(send, 201, document, [(b"location", f"/charges/{charge}".encode())])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for close in self.on_shutdown:
                    await close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(
    send: Send, status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(document).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free local port in a background thread; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so the port cannot be taken before uvicorn starts
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="retrysafe-demo-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# -- the network and the client ---------------------------------------------------------------


class FlakyNetwork(httpx.AsyncBaseTransport):
    """Delivers every request, but drops the responses the plan marks as lost."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.extensions.get(_LOSE):
            # The server did all its work and answered; only the client never hears of it.
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(slots=True)
class ClientView:
    """What the client saw during one run."""

    requests: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    in_progress: int = 0
    """409 ``in-progress`` answers, each followed by a retry after ``Retry-After``."""
    replays: int = 0
    """Answers marked ``Idempotent-Replayed: true``."""
    failed: int = 0
    """Purchases that got no receipt."""
    receipts: dict[str, str] = field(default_factory=dict)
    """order -> the charge id the client was told about."""


RETRIED_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


async def _click(
    client: httpx.AsyncClient, purchase: Purchase, click: int, seen: ClientView
) -> str | None:
    """POST one click of a purchase, retrying with the purchase's key; the charge id or None."""
    # Jitter from its own stream, so both runs wait alike whatever order the tasks run in.
    rng = random.Random(f"{purchase.key}:{click}")
    body = {"order": purchase.order, "amount": purchase.amount}
    deadline = time.monotonic() + PURCHASE_DEADLINE
    for attempt in range(1, MAX_ATTEMPTS + 1):
        seen.requests += 1
        delay = rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
        try:
            response = await client.post(
                "/charges",
                json=body,
                headers={"Idempotency-Key": purchase.key},
                extensions={_LOSE: (click, attempt) in purchase.lost},
            )
        except httpx.TimeoutException:
            seen.timeouts += 1
        except httpx.TransportError:
            seen.connection_errors += 1
        else:
            if response.is_success:
                if response.headers.get("idempotent-replayed") == "true":
                    seen.replays += 1
                return str(response.json()["id"])
            if response.status_code not in RETRIED_STATUSES:
                return None
            if response.status_code == 409:
                seen.in_progress += 1
            delay = _retry_after(response, delay)
        if time.monotonic() + delay > deadline:
            break
        await asyncio.sleep(delay)
    return None


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(float(response.headers["retry-after"]), RETRY_AFTER_CAP)
    except (KeyError, ValueError):
        return default


async def _buy(
    client: httpx.AsyncClient, purchase: Purchase, seen: ClientView, shoppers: asyncio.Semaphore
) -> None:
    async with shoppers:
        clicks = [_click(client, purchase, click, seen) for click in range(purchase.clicks)]
        receipts = [r for r in await asyncio.gather(*clicks) if r is not None]
    if receipts:
        seen.receipts[purchase.order] = receipts[0]
    else:
        seen.failed += 1


async def _shop(url: str, plan: Plan) -> ClientView:
    seen = ClientView()
    shoppers = asyncio.Semaphore(SHOPPERS)
    network = FlakyNetwork(httpx.AsyncHTTPTransport())
    timeout = httpx.Timeout(CLIENT_TIMEOUT, connect=2.0)
    async with httpx.AsyncClient(base_url=url, transport=network, timeout=timeout) as client:
        await asyncio.gather(*(_buy(client, p, seen, shoppers) for p in plan.purchases))
    return seen


# -- the runs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One run's figures: the server's charges and what the client saw."""

    protected: bool
    purchases: int
    charges: int
    double_charges: int
    """Charges beyond the first for an order."""
    client: ClientView


@dataclass(frozen=True, slots=True)
class Demo:
    plan: Plan
    bare: Run
    protected: Run


def _run(plan: Plan, ledger: Path | None) -> Run:
    api = PaymentsAPI(frozenset(p.order for p in plan.purchases if p.slow))
    app: ASGIApp = api
    if ledger is not None:
        middleware = IdempotencyMiddleware(api, store=SQLiteStore(str(ledger)))
        api.on_shutdown.append(middleware.aclose)
        app = middleware
    with serve(app) as url:
        seen = asyncio.run(_shop(url, plan))
        # Timed-out charges may still be running: count them too, as the card would.
        deadline = time.monotonic() + 2 * SLOW_LATENCY + 5
        while api.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
    orders = {order for _, order in api.charges}
    return Run(
        ledger is not None,
        len(plan.purchases),
        len(api.charges),
        len(api.charges) - len(orders),
        seen,
    )


def run_demo(purchases: int, seed: int) -> Demo:
    """Play the same seeded faults against the bare API, then against it behind retrysafe."""
    plan = make_plan(purchases, seed)
    with tempfile.TemporaryDirectory(prefix="retrysafe-demo-") as folder:
        bare = _run(plan, None)
        protected = _run(plan, Path(folder) / "ledger.db")
    return Demo(plan, bare, protected)


def format_report(demo: Demo) -> str:
    """The demo's outcome as plain text, at most 80 columns wide."""
    plan, bare, safe = demo.plan, demo.bare, demo.protected
    n = len(plan.purchases)
    lines = [
        f"retrysafe demo: {_count(n, 'purchase')}, {SHOPPERS} at a time, on a flaky network"
        f" (seed {plan.seed})",
        f"Both runs face the same faults: {_count(plan.lost, 'response')} lost on the way back,",
        f"{_count(plan.slow, 'charge')} slower than the client's {CLIENT_TIMEOUT:g} s timeout,"
        f" {_count(plan.double_clicks, 'double-click')}.",
        "",
        f"{'':34}{'without retrysafe':>20}{'with retrysafe':>20}",
    ]

    def row(label: str, get: Callable[[Run], object]) -> None:
        lines.append(f"{label:34}{get(bare)!s:>20}{get(safe)!s:>20}")

    row("purchases", lambda r: r.purchases)
    row("charges made by the server", lambda r: r.charges)
    row("double charges", lambda r: r.double_charges)
    row("requests the client sent", lambda r: r.client.requests)
    row("  timed out", lambda r: r.client.timeouts)
    row("  response lost (connection error)", lambda r: r.client.connection_errors)
    row("  409 in progress, retried", lambda r: r.client.in_progress)
    row("  replayed (Idempotent-Replayed)", lambda r: r.client.replays)
    if bare.client.failed or safe.client.failed:
        row("purchases that failed", lambda r: r.client.failed)
    lines.append("")
    for label, run in (("without retrysafe:", bare), ("with retrysafe:   ", safe)):
        summary = f"{label} {_count(run.purchases, 'purchase')} -> {_count(run.charges, 'charge')}"
        if run.double_charges:
            summary += f" ({_count(run.double_charges, 'double charge')})"
        lines.append(summary)
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
