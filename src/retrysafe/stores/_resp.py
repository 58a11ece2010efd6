"""A lean asyncio Redis client for the ledger's hot path: RESP2, pipelined, one socket per node.

Why not redis-py: its asyncio client spends about 50 us of CPU per command, most of it in
connection-pool bookkeeping and layers of wrappers; this one spends under 10 us. It does only
what the ledger needs:

* :class:`Connection` is an :class:`asyncio.Protocol`. Commands are written as soon as they
  are issued, by any number of concurrent callers, and replies are matched to callers in FIFO
  order: Redis answers the commands of one connection in the order it received them. No pool,
  no lock, no task per connection.
* Replies are parsed by :func:`parse` (the five RESP2 types) straight from the bytes the
  transport hands over; a reply split across reads is parsed once enough bytes arrived.
* A watchdog, one timer per connection, aborts the connection when the oldest outstanding
  command has waited longer than ``timeout`` since it was written to the socket, with no byte
  of reply arriving meanwhile: every caller then gets :class:`TimeoutError` instead of hanging
  on a silent server. A command is timed from its write, not from its call, and a reply still
  arriving counts as an answer, so that an event loop blocked for a while (a sync call in a
  handler) never passes for a silent server: a command that reached the server and was
  answered must not be reported as failed. The cost is one timer per ``timeout`` period, not
  one per command.
* A connection in pub/sub mode hands every reply to ``on_push`` instead.

:func:`connect` opens a connection (TLS through :mod:`ssl`), then authenticates (``AUTH``)
and selects the database (``SELECT``), both pipelined. RESP2 without ``HELLO``: it works with
every Redis since 2.6 and with the servers that speak its protocol.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from binascii import crc_hqx
from collections.abc import Callable
from typing import TypeAlias, cast

__all__ = [
    "Connection",
    "ConnectionLost",
    "Reply",
    "ReplyError",
    "command",
    "connect",
    "key_slot",
    "parse",
]


class ReplyError(Exception):
    """An error reply of the server (``-ERR ...``): returned by :func:`parse`, not raised."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.partition(" ")[0]
        """The first word: ``ERR``, ``NOSCRIPT``, ``MOVED``, ``BUSY``, ..."""


class ConnectionLost(ConnectionError):
    """The connection closed (or was aborted) before the reply came."""


Reply: TypeAlias = "bytes | int | ReplyError | list[Reply] | None"
"""Bulk and simple strings are bytes, integers int, nil None, arrays lists."""


# -- encoding ---------------------------------------------------------------------------------

_SMALL = 1024
"""Arguments up to this size are formatted inline; larger ones are joined without a copy."""


def command(*args: bytes) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if len(arg) <= _SMALL:
            parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
        else:
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


_ASKING = command(b"ASKING")


# -- decoding ---------------------------------------------------------------------------------


class _Incomplete(Exception):
    """The buffer ends inside a reply; ``need`` is the least buffer length that may do."""

    def __init__(self, need: int) -> None:
        self.need = need


def parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    """Parse the reply starting at ``buf[pos]``; return it and the position after it.

    Raises ``_Incomplete`` when ``buf`` ends inside the reply, ValueError on bytes that are
    not RESP2.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(buf) + 1)
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if stop + 2 > len(buf):
            raise _Incomplete(stop + 2)
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        pos = end + 2
        items: list[Reply] = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return ReplyError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise ValueError(f"not a RESP2 reply: type byte {kind!r}")


# -- cluster key slots ------------------------------------------------------------------------


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key``: CRC16 (XMODEM) mod 16384, with the {tag} rule."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & 0x3FFF


# -- the connection ---------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One socket to one Redis node, shared by every caller on one event loop.

    Call :meth:`send` from the loop that opened the connection (it is not thread-safe).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, name: str) -> None:
        self.loop = loop
        self.timeout = timeout
        self.name = name
        """host:port, for error messages."""
        self.closed = False
        self.on_push: Callable[[Reply], None] | None = None
        """Set in pub/sub mode: receives every reply, nothing is matched to callers."""
        self.on_close: Callable[[], None] | None = None
        self._transport: asyncio.Transport | None = None
        # (future, [when written]) per command, oldest first; None for a reply nobody awaits.
        # The commands queued in one turn share their one-item list, set again by _flush.
        self._pending: collections.deque[tuple[asyncio.Future[Reply] | None, list[float]]] = (
            collections.deque()
        )
        self._out: list[bytes] = []
        """Commands queued in this turn of the event loop, written together by _flush."""
        self._batch: list[float] = [0.0]
        """When the commands in ``_out`` were written (queued, until _flush writes them)."""
        self._last_read = 0.0
        """When bytes last came from the server (a reply still arriving is no silence)."""
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._need = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._why: BaseException = ConnectionLost(f"{name}: not connected")

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport: no isinstance).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._partial:
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size < self._need:
                return  # a large reply still arriving: do not parse it again yet
            data = b"".join(self._partial)
            self._partial = []
        pos = 0
        size = len(data)
        pending = self._pending
        while pos < size:
            try:
                reply, pos = parse(data, pos)
            except _Incomplete as exc:
                rest = data[pos:]
                self._partial = [rest]
                self._partial_size = len(rest)
                self._need = exc.need - pos
                return
            except (ValueError, IndexError) as exc:
                self.abort(ConnectionLost(f"{self.name}: protocol error: {exc}"))
                return
            if self.on_push is not None:
                self.on_push(reply)
                continue
            if not pending:
                self.abort(ConnectionLost(f"{self.name}: protocol error: unexpected reply"))
                return
            future = pending.popleft()[0]
            if future is not None and not future.done():  # done: its caller gave up
                future.set_result(reply)

    def eof_received(self) -> bool | None:
        self._why = ConnectionLost(f"{self.name}: the server closed the connection")
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._why = ConnectionLost(f"{self.name}: connection lost: {exc}")
        self._shut(self._why)

    # -- commands -----------------------------------------------------------------------------

    def send(self, payload: bytes) -> asyncio.Future[Reply]:
        """Send one encoded command; the future gets its reply (a ReplyError is a result).

        On an idle connection the command is written at once. While replies are outstanding
        (the connection is busy), commands are queued and leave together at the end of this
        turn of the event loop: under load, dozens of requests share one ``send()`` system
        call, and an idle connection never waits for a turn of the loop.
        """
        if self.closed:
            raise ConnectionLost(str(self._why))
        future: asyncio.Future[Reply] = self.loop.create_future()
        if not self._pending and not self._out:
            self._transport.write(payload)  # type: ignore[union-attr] # set while not closed
            written = [self.loop.time()]
        else:
            self.write(payload)
            written = self._batch
        self._pending.append((future, written))
        if self._watchdog is None:
            self._arm()
        return future

    def send_asking(self, payload: bytes) -> asyncio.Future[Reply]:
        """:meth:`send` preceded by ``ASKING`` (a cluster ``-ASK`` redirection)."""
        if self.closed:
            raise ConnectionLost(str(self._why))
        self.write(_ASKING)
        self._pending.append((None, self._batch))
        return self.send(payload)

    def write(self, payload: bytes) -> None:
        """Queue a command and no reply to wait for (pub/sub mode: replies go to on_push)."""
        if self.closed:
            raise ConnectionLost(str(self._why))
        self._out.append(payload)
        if len(self._out) == 1:
            self._batch = [self.loop.time()]
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        if out and not self.closed:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]
            # Timed from now: a turn of the loop that blocked before this write is not the
            # server's delay.
            self._batch[0] = self.loop.time()
        out.clear()

    # -- timeouts and closing -----------------------------------------------------------------

    def _deadline(self) -> float:
        return max(self._pending[0][1][0], self._last_read) + self.timeout

    def _arm(self) -> None:
        self._watchdog = self.loop.call_at(self._deadline(), self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self.closed or not self._pending:
            return  # re-armed by the next send
        if self.loop.time() >= self._deadline():
            # The oldest command got no reply in time: the server (or the path to it) is stuck.
            # Replies are matched in order, so the connection cannot skip it: drop it whole.
            self.abort(TimeoutError(f"{self.name}: no reply within {self.timeout:g} s"))
        else:
            self._arm()

    def abort(self, why: BaseException) -> None:
        """Close at once; every outstanding command fails with ``why``."""
        self._why = why
        if self._transport is not None:
            self._transport.abort()
        self._shut(why)

    def close(self) -> None:
        """Close after the pending writes; outstanding commands fail."""
        if not self.closed and self._transport is not None:
            self._why = ConnectionLost(f"{self.name}: connection closed")
            self._transport.close()
        self._shut(self._why)

    def _shut(self, why: BaseException) -> None:
        first = not self.closed
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, collections.deque()
        for future, _ in pending:
            if future is not None and not future.done():
                # A fresh exception per caller: one instance raised in many tasks would
                # collect all their tracebacks.
                future.set_exception(type(why)(str(why)))
        if first and self.on_close is not None:
            self.on_close()


async def connect(
    host: str,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109 - also the connection's per-command budget
    ssl_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    db: int = 0,
) -> Connection:
    """Open a connection, authenticate and select ``db``; all within ``timeout`` seconds.

    Raises OSError (ConnectionError, TimeoutError, ssl.SSLError) when the node cannot be
    reached, :class:`ReplyError` when it refuses ``AUTH`` or ``SELECT``.
    """
    loop = asyncio.get_running_loop()
    name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(
            lambda: Connection(loop, timeout, name),
            host,
            port,
            ssl=ssl_context,
            server_hostname=host if ssl_context is not None else None,
        )
        try:
            setup: list[asyncio.Future[Reply]] = []
            if password is not None:
                auth = (username.encode(), password.encode()) if username else (password.encode(),)
                setup.append(conn.send(command(b"AUTH", *auth)))
            if db:
                setup.append(conn.send(command(b"SELECT", b"%d" % db)))
            for future in setup:
                reply = await future
                if isinstance(reply, ReplyError):
                    raise reply
        except BaseException:
            conn.abort(ConnectionLost(f"{name}: connection set-up failed"))
            raise
    return conn
