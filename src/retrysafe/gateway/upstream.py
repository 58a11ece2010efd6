"""The gateway's upstream client: HTTP/1.1 over a keep-alive pool of ``asyncio.Protocol``s.

One :class:`UpstreamPool` per worker process and event loop; httptools parses the responses.
Bodies stream both ways with backpressure (the upstream's socket stops being read while the
client is slow); connecting, and each wait for the upstream's next byte, are bounded.

UpstreamError
├── ConnectFailed       the upstream could not be reached: nothing was sent
├── UpstreamTimeout     the request was sent; no byte came back within ``read_timeout``
├── UpstreamClosed      the connection closed or reset before the response was complete
└── UpstreamBadResponse the upstream's bytes are not HTTP/1.1
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from typing import cast

import httptools

__all__ = [
    "ConnectFailed",
    "Connection",
    "UpstreamBadResponse",
    "UpstreamClosed",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
]

HIGH_WATER = 256 << 10
"""Response bytes buffered from the upstream before its socket stops being read."""
LOW_WATER = 64 << 10
MAX_HEAD = 64 << 10
"""Bytes the upstream may send before its final response head is complete (interim 1xx
responses included): past this, its answer is refused as malformed."""


class UpstreamError(Exception):
    """The upstream failed; ``sent`` says whether the request may have reached it."""

    sent = True


class ConnectFailed(UpstreamError):
    """The upstream could not be reached (refused, unresolvable, connect timeout)."""

    sent = False


class UpstreamTimeout(UpstreamError):
    """No byte came from the upstream (or it took none) within the read timeout."""


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before the response was complete."""


class UpstreamBadResponse(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time.

    The protocol side (``data_received`` and the parser callbacks) only buffers and wakes the
    one coroutine waiting on it; that coroutine (the proxy) drives the exchange.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        self.read_timeout = pool.read_timeout
        self._reset()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = True
        self.received = False
        """Whether any byte of this exchange's response arrived."""
        self.error: UpstreamError | None = None
        self._head_bytes = 0
        self._head_fields = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._last_read = 0.0
        self._eof_body = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.complete:
            # Bytes after the response (or while idle in the pool) answer no request: the
            # connection is out of step and must carry nothing more.
            self.abort()
            return
        self.received = True
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # A callback's own refusal (httptools wraps it) says best what was wrong.
            refusal = exc.__context__
            if not isinstance(refusal, UpstreamError):
                refusal = UpstreamBadResponse(f"the upstream's response is not HTTP/1.1: {exc}")
            self._fail(refusal)
            self.abort()
            return
        if not self.head_done:  # a head still incomplete: every byte so far counts
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                too_long = f"the upstream's response head is over {MAX_HEAD} bytes"
                self._fail(UpstreamBadResponse(too_long))
                self.abort()
                return
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._eof_body and self.head_done and not self.complete:
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete:
            why = f": {exc}" if exc else ""
            self._fail(UpstreamClosed(f"the upstream closed the connection{why}"))
        self.pool.forget(self)
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_done:  # a second response to one request
            raise UpstreamBadResponse("the upstream sent more than one response")

    def on_status(self, reason: bytes) -> None:
        self._count_head(len(reason) + len(b"HTTP/1.1 200 \r\n\r\n"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers (after a chunked body) are not forwarded
            self._count_head(len(name) + len(value) + 4)
            self.headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        # A head that arrives whole in one read is measured here, field by field.
        self._head_fields += size
        if self._head_fields > MAX_HEAD:
            raise UpstreamBadResponse(f"the upstream's response head is over {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response (100 Continue, 103): wait for the real one
            return
        if not 200 <= status <= 599:  # 101 included: the gateway never asks for an upgrade
            raise UpstreamBadResponse(f"the upstream answered with status {status}")
        codings = b",".join(v for n, v in self.headers if n == b"transfer-encoding")
        if codings and codings.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
            # A body delimited by the connection's end, and encoded: nothing a client could use.
            raise UpstreamBadResponse("the upstream's Transfer-Encoding does not end in chunked")
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if not self.keep_alive and status not in (204, 304):
            # Without a length or chunking, the body runs until the connection closes.
            self._eof_body = not any(
                n in (b"content-length", b"transfer-encoding") for n, _ in self.headers
            )
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- the exchange ---------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_timeout(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        due = self._last_read + self.read_timeout
        now = self.loop.time()
        if now < due:  # a byte came meanwhile: look again when the new deadline passes
            self._timer = self.loop.call_at(due, self._check_timeout)
            return
        self._fail(UpstreamTimeout(f"the upstream sent nothing for {self.read_timeout:g} s"))
        self.abort()
        waiter.set_result(None)

    async def _wait(self) -> None:
        """Wait for the protocol to make progress; bounded by the read timeout."""
        if self.error is not None:
            raise self.error
        waiter = self.loop.create_future()
        self._waiter = waiter
        self._timer = self.loop.call_at(self._last_read + self.read_timeout, self._check_timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            self._timer.cancel()
        if self.error is not None:
            raise self.error

    def start(self, data: bytes) -> None:
        """Begin an exchange: write the request head (and the body, when it is all here)."""
        self._reset()
        self._last_read = self.loop.time()
        assert self.transport is not None
        self.transport.write(data)

    async def write(self, data: bytes) -> None:
        """Write more of the request body, waiting while the upstream does not keep up."""
        assert self.transport is not None
        if self.closed or self.error is not None:
            raise self.error or UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)
        self._last_read = self.loop.time()
        while self._write_paused and not self.head_done:
            await self._wait()

    async def response_head(self) -> None:
        """Wait until the response's status and headers are here."""
        self._last_read = self.loop.time()
        while not self.head_done:
            if self.closed and self.error is None:
                raise UpstreamClosed("the upstream closed the connection")
            await self._wait()

    def take_body(self) -> bytes:
        """The response body bytes buffered so far (b"" if none)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def more_body(self) -> None:
        """Wait for more of the response body (or its end)."""
        while not self._chunks and not self.complete:
            await self._wait()

    def abort(self) -> None:
        """Drop the connection at once (never reused)."""
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream, for one event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        idle_timeout: float = 1.0,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def acquire(self) -> Connection:
        """An idle keep-alive connection if there is a fresh one, else a new connection."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests, or after a fork): nothing carries over
            self._loop = loop
            self._idle = []
            self._open = set()
        idle = self._idle
        if idle:
            stale_before = loop.time() - self.idle_timeout
            while idle:
                conn = idle.pop()
                # An aborted connection is not closed until its connection_lost has run.
                if conn.keep_alive and not conn.closed and conn.idle_since > stale_before:
                    conn.reused = True
                    return conn
                conn.abort()
        return await self.connect()

    async def connect(self) -> Connection:
        """A new connection (the idle ones are not looked at)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=self.connect_timeout if self.ssl_context else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"connecting to {self.host}:{self.port} took over {self.connect_timeout:g} s"
            ) from None
        except ssl.SSLError as exc:  # before OSError, of which it is a kind
            raise ConnectFailed(f"TLS with {self.host}:{self.port} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._open.add(protocol)
        return protocol

    def release(self, conn: Connection) -> None:
        """Give back a connection whose exchange is complete; it is kept if it can be reused."""
        if conn.closed or not conn.keep_alive or not conn.complete or conn.error is not None:
            conn.abort()
            return
        if len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self._open.discard(conn)

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        self._open.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let the transports run their connection_lost
