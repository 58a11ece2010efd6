"""The forwarding ASGI app: every request it gets is sent to the upstream, the answer streamed back.

It knows HTTP forwarding (RFC 9110 section 7.6: hop-by-hop headers, ``Via``, ``X-Forwarded-*``,
``Forwarded``) and nothing of idempotency: :class:`~retrysafe.IdempotencyMiddleware` wraps it.
When the upstream fails it answers a problem itself: 502 ``upstream-unavailable`` or 504
``upstream-timeout``, telling the middleware's outcome policy (through
:data:`~retrysafe.gateway.config.UPSTREAM_FAILURE`) whether the upstream may have executed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from ..errors import ResponseCutShort
from ..problems import DEFAULT_PROBLEM_BASE, Problem, ProblemType
from .config import UPSTREAM_FAILURE, GatewaySettings, RouteSettings
from .upstream import (
    ConnectFailed,
    Connection,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

__all__ = ["Proxy", "RouteTable"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)  # fmt: skip
"""RFC 9110 7.6.1, plus the proxy credentials (meant for this hop only)."""
_REQUEST_DROPPED = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"forwarded",
}  # fmt: skip
_RESPONSE_DROPPED = HOP_BY_HOP
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
VIA = b"1.1 retrysafe"


class Observer(Protocol):
    """What the proxy reports (the gateway's metrics)."""

    def upstream_done(self, route: str, seconds: float) -> None: ...

    def upstream_failed(self, route: str, kind: str) -> None: ...


class RouteTable:
    """The gateway route a path falls under (first match), cached per path."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.routes = settings.routes
        self.default = settings.default_route
        self._cache: dict[str, RouteSettings] = {}

    def lookup(self, path: str) -> RouteSettings:
        found = self._cache.get(path)
        if found is not None:
            return found
        found = self.default
        for route in self.routes:
            if route.route is not None and route.route.matches(path):
                found = route
                break
        if len(self._cache) >= 4096:  # bounded: paths with ids would grow it forever
            self._cache.clear()
        self._cache[path] = found
        return found


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection``: hop-by-hop for this message (RFC 9110 7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(t.strip().lower() for t in value.split(b","))
    return frozenset(names)


class Proxy:
    """Forward HTTP requests to one upstream (``settings.upstream``)."""

    def __init__(
        self,
        settings: GatewaySettings,
        routes: RouteTable | None = None,
        observer: Observer | None = None,
    ) -> None:
        up = settings.upstream
        self.settings = settings
        self.pool = UpstreamPool(
            up.host,
            up.port,
            connect_timeout=up.connect_timeout,
            read_timeout=up.read_timeout,
            idle_timeout=up.idle_timeout,
            max_idle=up.max_idle,
            ssl_context=up.ssl_context(),
        )
        self.routes = routes or RouteTable(settings)
        self.observer = observer
        self.base_path = up.base_path
        self.host_header = up.host_header
        self.preserve_host = up.preserve_host
        self.problem_base = settings.problem_base or DEFAULT_PROBLEM_BASE
        self.key_header = settings.header.lower().encode("latin-1")

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.forward(scope, receive, send)
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003})  # not proxied: refused (403)

    # -- the request ------------------------------------------------------------------------------

    def request_head(self, scope: Scope, length: int | None, chunked: bool) -> bytes:
        """The request line and headers for the upstream."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        hop = _connection_tokens(headers)
        # The key is end to end whatever Connection says: the upstream may dedupe on it too.
        dropped = (_REQUEST_DROPPED | hop) - {self.key_header} if hop else _REQUEST_DROPPED
        host = b""
        forwarded_for = b""
        forwarded = b""
        lines = [
            scope["method"].encode("ascii"),
            b" ",
            self.base_path,
            scope.get("raw_path") or scope["path"].encode("utf-8"),
        ]
        query = scope.get("query_string")
        if query:
            lines += (b"?", query)
        lines.append(b" HTTP/1.1\r\n")
        for name, value in headers:
            if name in dropped:
                if name == b"host":
                    host = value
                elif name == b"x-forwarded-for":
                    forwarded_for = forwarded_for + b", " + value if forwarded_for else value
                elif name == b"forwarded":
                    forwarded = forwarded + b", " + value if forwarded else value
                continue
            if name.startswith(b"x-forwarded-") or name == b"x-real-ip":
                continue  # the client's claims (port, prefix, ...): only the gateway's are sent
            lines += (name, b": ", value, b"\r\n")
        client = scope.get("client")
        client_ip = client[0].encode() if client else b"unknown"
        scheme = scope.get("scheme", "http").encode()
        lines += (b"host: ", host if (self.preserve_host and host) else self.host_header, b"\r\n")
        chain = forwarded_for + b", " + client_ip if forwarded_for else client_ip
        lines += (b"x-forwarded-for: ", chain, b"\r\n")
        lines += (b"x-forwarded-proto: ", scheme, b"\r\n")
        if host:
            lines += (b"x-forwarded-host: ", host, b"\r\n")
        node = b'"[' + client_ip + b']"' if b":" in client_ip else client_ip
        element = b"for=" + node + b";proto=" + scheme
        if host and b'"' not in host:
            element += b';host="' + host + b'"'
        lines += (b"forwarded: ", forwarded + b", " + element if forwarded else element, b"\r\n")
        lines += (b"via: ", VIA, b"\r\n")
        if length is not None:
            lines += (b"content-length: ", str(length).encode(), b"\r\n")
        elif chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.lookup(scope["path"])
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left before sending its request
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        declared: int | None = None
        has_body_headers = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                has_body_headers = True
                if value.isdigit():
                    declared = int(value)
            elif name == b"transfer-encoding":
                has_body_headers = True
        if not more:
            length = len(body) if (body or has_body_headers) else None
            head = self.request_head(scope, length, chunked=False)
        else:
            head = self.request_head(scope, declared, chunked=declared is None)
        method: str = scope["method"]
        # A reused connection may have been closed by the upstream as we picked it: such a
        # request is sent again on a new connection when that is safe (as Go's net/http does):
        # the body is all here and the method is idempotent or the request carries a key. Not
        # on a route that keeps upstream failures: nothing back may also mean the upstream ran
        # it and died, and such a route promises never to send it twice.
        replayable = not more and (
            method in _IDEMPOTENT_METHODS
            or (
                not route.keep_upstream_failures
                and any(name == self.key_header for name, _ in scope["headers"])
            )
        )
        started = time.perf_counter()
        conn: Connection | None = None
        sent = False
        try:
            for attempt in range(2):
                conn = await self.pool.acquire() if attempt == 0 else await self.pool.connect()
                conn.read_timeout = route.read_timeout
                sent = True
                try:
                    if not more:
                        conn.start(head + body if body else head)
                    else:
                        conn.start(head)
                        await self._stream_request(conn, body, receive, chunked=declared is None)
                    await conn.response_head()
                    break
                except UpstreamClosed:
                    if attempt or not (conn.reused and not conn.received and replayable):
                        raise
                    conn.abort()
        except UpstreamError as exc:
            if conn is not None:
                conn.abort()
            await self._upstream_failed(send, route, exc)
            return
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()
            if sent and route.keep_upstream_failures:
                # The server is stopping (its shutdown timeout ran out) while the upstream
                # holds the request: it may have run it, and a keep route never sends it
                # twice. Answer and keep that, as for any other unknown outcome.
                closed = UpstreamClosed("the gateway shut down before the upstream answered")
                await self._upstream_failed(send, route, closed)
            raise
        except BaseException:
            if conn is not None:
                conn.abort()
            raise
        assert conn is not None
        if self.observer is not None:
            self.observer.upstream_done(route.label, time.perf_counter() - started)
        await self._stream_response(conn, method, send, route)

    async def _stream_request(
        self, conn: Connection, first: bytes, receive: Receive, *, chunked: bool
    ) -> None:
        """Send the request body as it arrives (chunked when its length is unknown)."""
        chunk = first
        more = True
        while not conn.head_done:
            if chunk:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if not more:
                if chunked:
                    await conn.write(b"0\r\n\r\n")
                return
            message = await receive()
            if message["type"] != "http.request":
                conn.abort()
                raise UpstreamClosed("the client left while sending its request body")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
        # The upstream answered before the whole body was sent: it will not read the rest, and
        # the connection stops in the middle of a request, so it must never carry another one.
        conn.keep_alive = False

    # -- the response -----------------------------------------------------------------------------

    async def _stream_response(
        self, conn: Connection, method: str, send: Send, route: RouteSettings
    ) -> None:
        headers = conn.headers
        hop = _connection_tokens(headers)
        dropped = _RESPONSE_DROPPED | hop if hop else _RESPONSE_DROPPED
        if conn.status in (204, 304):
            # Bodiless by definition; uvicorn would hold a 304's Content-Length (the size of
            # the 200 it stands for) against the empty body and fail the response.
            dropped = dropped | {b"content-length"}
        kept = [(n, v) for n, v in headers if n not in dropped]
        kept.append((b"via", VIA))
        if method == "HEAD":
            # The parser cannot know a HEAD response has no body: finish it here, and do not
            # reuse a connection whose parser still expects one.
            conn.complete = True
            conn.keep_alive = False
        try:
            await send({"type": "http.response.start", "status": conn.status, "headers": kept})
            while True:
                data = conn.take_body()
                if conn.complete:
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    self.pool.release(conn)  # only now: a failed send must not abort a pooled one
                    return
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                else:
                    await conn.more_body()
        except UpstreamError as exc:
            # The response has begun: no problem can be sent any more. Failing the request
            # makes the server drop the client's connection (a truncated body never looks
            # complete). The upstream answered, so it may well have done the work: the key
            # is released, or with upstream_failure = "keep" kept as not replayable.
            if self.observer is not None:
                self.observer.upstream_failed(route.label, _kind(exc))
            conn.abort()
            UPSTREAM_FAILURE.set("cut-short")
            raise ResponseCutShort(f"the upstream failed mid-body: {exc}") from exc
        except BaseException as exc:
            conn.abort()
            if isinstance(exc, asyncio.CancelledError):
                # Stopped mid-body by the server: the upstream's answer is cut short, and the
                # route's upstream_failure decides, as when the upstream breaks off.
                UPSTREAM_FAILURE.set("cut-short")
            raise

    async def _upstream_failed(self, send: Send, route: RouteSettings, exc: UpstreamError) -> None:
        """Answer 502/504 for a request whose upstream failed before its response began."""
        if self.observer is not None:
            self.observer.upstream_failed(route.label, _kind(exc))
        if isinstance(exc, UpstreamTimeout):
            kind = ProblemType.UPSTREAM_TIMEOUT
            detail = f"The upstream did not answer in time ({exc})."
        else:
            kind = ProblemType.UPSTREAM_UNAVAILABLE
            detail = f"The upstream could not be reached or failed to answer ({exc})."
        if exc.sent:
            detail += " It may have executed the request."
        else:
            detail += " The request was not sent."
        UPSTREAM_FAILURE.set("unknown" if exc.sent else "not-sent")
        problem = Problem(kind, detail, retry_after=1)
        document = problem.body(self.problem_base)
        headers = [*problem.headers(len(document)), (b"via", VIA)]
        await send({"type": "http.response.start", "status": problem.status, "headers": headers})
        await send({"type": "http.response.body", "body": document})


def _kind(exc: UpstreamError) -> str:
    if isinstance(exc, ConnectFailed):
        return "connect"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamClosed):
        return "closed"
    return "protocol"
