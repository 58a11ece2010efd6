"""The gateway as one ASGI app: admin endpoints, then the middleware, then the proxy.

``Gateway(settings)`` is what every worker serves; :func:`create_app` builds it from the
settings the ``retrysafe gateway`` command handed down in the environment.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..asgi import IdempotencyMiddleware
from ..engine import Engine
from ..hooks import log_decision
from ..problems import DEFAULT_PROBLEM_BASE, Problem, ProblemType
from ..stores import open_store
from .admin import Metrics, TimedStore, log_access, store_health
from .config import GatewaySettings, load_settings
from .proxy import Proxy, RouteTable
from .upstream import UpstreamError

__all__ = ["SETTINGS_ENV", "Gateway", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SETTINGS_ENV = "RETRYSAFE_GATEWAY_SETTINGS"
"""JSON ``{"config": path or null, "flags": {...}}``: how the command passes its settings on
to the worker processes, each of which validates them again (cheaply) and builds its app."""

_REPLAYED = b"idempotent-replayed"
SHUTDOWN_GRACE = 5.0
"""Seconds the lifespan shutdown waits for cancelled requests to release their keys."""


class Gateway:
    """Admin endpoints under ``settings.admin_prefix``; everything else goes to the upstream."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.routes = RouteTable(settings)
        self.metrics = Metrics(self.routes)
        self.store = TimedStore(open_store(settings.store), self.metrics)
        engine = Engine(
            self.store,
            routes=settings.engine_routes(),
            namespace=settings.namespace,
            header=settings.header,
            problem_base=settings.problem_base,
            fail_open=settings.fail_open,
            hooks=[log_decision, self.metrics.decision],
            **settings.defaults,
        )
        self.proxy = Proxy(settings, self.routes, self.metrics)
        self.layer = IdempotencyMiddleware(self.proxy, engine=engine)
        prefix = settings.admin_prefix
        self.admin = (
            {prefix + "/health": self._health, prefix + "/ready": self._ready,
             prefix + "/metrics": self._metrics}
            if prefix else {}
        )  # fmt: skip
        self.access_log = settings.access_log
        self._date = b""
        self._date_second = -1
        self._inflight: set[asyncio.Task[Any]] = set()
        """Request tasks running: shutdown waits for them before closing the ledger."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            admin = self.admin.get(scope["path"]) if self.admin else None
            if admin is not None:
                await admin(send)
            else:
                await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.layer(scope, receive, send)

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0
        replayed = False
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)

        async def observed_send(message: Message) -> None:
            nonlocal status, replayed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                dated = False
                for name, _ in headers:
                    if name == b"date":
                        dated = True
                    elif name == _REPLAYED:
                        replayed = True
                if not dated:  # replays and problems: the upstream's Date is never stored
                    message = {**message, "headers": [*headers, (b"date", self._http_date())]}
            await send(message)

        try:
            bad_host = _bad_host(scope)
            if bad_host:
                # Two Hosts could route one way in front of the gateway, another behind it.
                await self._send_problem(send, Problem(ProblemType.MALFORMED_REQUEST, bad_host))
                status = 400
            else:
                await self.layer(scope, receive, observed_send)
        except asyncio.CancelledError:
            # The server's shutdown timeout ran out: the middleware has released the key on
            # its way out. Rather than uvicorn's bare 500, tell the client to retry elsewhere.
            if status:
                raise
            problem = Problem(
                ProblemType.SHUTTING_DOWN,
                "The gateway shut down before the upstream answered; the upstream may have"
                " executed the request. Retry with the same key.",
                retry_after=1,
            )
            await self._send_problem(send, problem)
            status = 503
        finally:
            if task is not None:
                self._inflight.discard(task)
            route = self.routes.lookup(scope["path"]).label
            self.metrics.response(route, status)
            if self.access_log:
                log_access(
                    scope.get("client"), scope["method"], scope["path"], status,
                    time.perf_counter() - started, route, replayed,
                )  # fmt: skip

    async def _send_problem(self, send: Send, problem: Problem) -> None:
        """Answer ``problem`` and close the connection."""
        body = problem.body(self.settings.problem_base)
        headers = [
            *problem.headers(len(body)), (b"date", self._http_date()), (b"connection", b"close")
        ]  # fmt: skip
        await send({"type": "http.response.start", "status": problem.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Close the ledger and the upstream connections, once the requests still running (the
        ones uvicorn cancelled at its shutdown timeout) have released their keys."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=SHUTDOWN_GRACE)
        await self.layer.aclose()
        await self.proxy.aclose()

    # -- admin endpoints ------------------------------------------------------------------------

    async def _answer(self, send: Send, status: int, body: bytes, content_type: str) -> None:
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"date", self._http_date()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _health(self, send: Send) -> None:
        """Liveness: the worker serves requests."""
        body = json.dumps({"status": "ok", "pid": os.getpid()}).encode()
        await self._answer(send, 200, body, "application/json")

    async def _ready(self, send: Send) -> None:
        """Readiness: the ledger answers a read and the upstream accepts a connection."""
        ledger = await store_health(self.store)
        upstream = None
        try:
            conn = await self.proxy.pool.connect()
            conn.abort()
        except UpstreamError as exc:
            upstream = str(exc)
        ok = ledger is None and upstream is None
        document = {
            "status": "ok" if ok else "unavailable",
            "ledger": ledger or "ok",
            "upstream": upstream or "ok",
        }
        await self._answer(
            send, 200 if ok else 503, json.dumps(document).encode(), "application/json"
        )

    async def _metrics(self, send: Send) -> None:
        body, content_type = await asyncio.to_thread(self.metrics.render)
        await self._answer(send, 200, body, content_type)


_HOST = re.compile(
    rb"(?:(?P<name>[A-Za-z0-9\-._~]+)"  # a name or an IPv4 address: no escapes, no delimiters
    rb"|\[(?P<ipv6>[0-9A-Fa-f:.]+)(?:%25[A-Za-z0-9\-._~]+)?\])"  # [IPv6] or [IPv6%25zone]
    rb"(?::(?P<port>[0-9]{0,10}))?"
)
"""The shape of a Host (RFC 9110 7.2: uri-host and an optional port), stricter than RFC 3986.

Names hold no percent-escapes or sub-delimiters: ``a.example,b.example``, ``a%2Cb`` or
``a=b`` could mean one host to the gateway and another to what is behind it.
"""


def _host_ok(value: bytes) -> bool:
    """Whether ``value`` is one host, unambiguously: a name or address and an optional port."""
    value = value.strip(b" \t")  # optional whitespace around a field value (RFC 9110 5.5)
    if not value:
        return True  # allowed: an empty Host says the target has no authority
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    port, ipv6 = match["port"], match["ipv6"]
    if port and int(port) > 65535:
        return False
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6.decode("ascii"))
        except ValueError:
            return False
    return True


def _bad_host(scope: Scope) -> str:
    """Why the request's Host cannot be forwarded (RFC 9112 3.2); empty if it can."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if len(hosts) > 1:
        return "The request carries more than one Host header."
    if not hosts:
        if scope.get("http_version", "1.1") != "1.1":
            return ""  # HTTP/1.0 predates Host; HTTP/2 and 3 carry :authority instead
        return "An HTTP/1.1 request must carry a Host header."
    if not _host_ok(hosts[0]):
        return "The Host header is not a host name or address with an optional port."
    return ""


def create_app() -> Gateway:
    """The worker's app, from :data:`SETTINGS_ENV` (the ``--factory`` of the server)."""
    global _problem_base
    payload = json.loads(os.environ[SETTINGS_ENV])
    settings = load_settings(payload.get("config"), **payload.get("flags", {}))
    _problem_base = settings.problem_base
    return Gateway(settings)


_problem_base = DEFAULT_PROBLEM_BASE
"""The worker's ``problem_base``, for answers given before a request reaches the app."""


class ProblemHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse with a problem
    document (rule 24) instead of its plain-text 400."""

    def send_400_response(self, msg: str) -> None:
        problem = Problem(
            ProblemType.MALFORMED_REQUEST, f"The request is not valid HTTP/1.1: {msg}"
        )
        body = problem.body(_problem_base)
        fields = [
            *problem.headers(len(body)),
            (b"date", email.utils.formatdate(usegmt=True).encode()),
            (b"connection", b"close"),
        ]
        head = b"".join(b"%s: %s\r\n" % field for field in fields)
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n" + head + b"\r\n" + body)
        self.transport.close()
