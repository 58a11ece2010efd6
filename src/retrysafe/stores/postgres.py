"""``postgresql://user:pw@host:port/db?table=...``: the ledger many hosts share, on asyncpg.

URL options (query parameters): ``table`` (default ``retrysafe_records``), ``min_size`` (idle
connections kept open, default 1), ``max_size`` (connections per process, default 10),
``timeout`` (seconds per connect and per statement, default 5), ``create`` (default true:
create the table on first use; false: never issue DDL, fail until ``retrysafe store init URL``
made it) and ``statement_cache_size`` (asyncpg's prepared statements per connection, default
100; 0 behind pgbouncer < 1.21 in transaction mode, at the price of a round trip per
statement). Connection parameters asyncpg understands pass through (``sslmode``,
``sslrootcert``, ``target_session_attrs``, ``application_name``, ...); anything else is a
:class:`ConfigError`.

Schema (version 1, kept in ``COMMENT ON TABLE``): one row per record, keyed by ``rid``;
times are epoch seconds (``double precision``) read from the database's clock; an index on
``expires_at`` keeps purges cheap. A newer schema than this code knows is refused.

Every primitive is one statement, one round trip, prepared once per connection:

* the claim reads the record and, only when there is none or it may be taken over, inserts
  (or takes over) in the same statement: replays and in-flight duplicates write nothing;
* complete, release and renew are fenced by the claim's token;
* complete, release and delete notify (``pg_notify`` on a channel named after the table)
  only when a waiter asked for it by marking the record ``watched``: a notifying commit
  takes a cluster-wide lock until it is flushed, which would serialise every completion.

Connections are pooled per event loop and per process (a new loop or a forked child opens
new ones). The pool is this module's own: :class:`asyncpg.Pool` costs about 100 µs per
checkout even without its reset query (a task per release), as much as a round trip. No
session state is ever left on a connection (no ``SET``, no ``LISTEN``, no advisory lock
outside a transaction), so none is reset; a connection that failed in the middle of a
statement (timeout, cancellation, network error) is closed, never reused. Each operation
holds one connection at a time, so requests never deadlock on the pool.

Failures: anything that says the server cannot be reached or used (refused or lost
connections, timeouts, too many connections, shutdown, a read-only standby) is
:class:`StoreUnavailable`; contention (serialization failure, deadlock, lock timeout, no
pooled connection free within ``timeout``) is :class:`StoreBusy`. A connection lost in the
middle of a statement also closes the idle ones (the server probably went away); after a
failed connect, new connects are not tried again for half a second (requests fail fast
meanwhile). Recovery needs nothing but the server coming back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import ConfigError, CorruptRecord, StoreBusy, StoreUnavailable
from ..records import Record, State
from . import parse_flag, redact_url
from .base import Store, StoreStats, cursor_after

# asyncpg ships no type information: it is used through the typed surface below.
asyncpg: Any = importlib.import_module("asyncpg")

__all__ = ["PostgresStore"]

logger = logging.getLogger("retrysafe")

T = TypeVar("T")

SCHEMA_VERSION = 1
_COMMENT = "retrysafe ledger schema {}"
_COMMENT_RE = re.compile(r"retrysafe ledger schema (\d+)")
_TABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
"""Short enough that the names derived from it (``<table>_expiry``) fit in 63 bytes."""
PURGE_BATCH = 500
"""Most rows one purge statement deletes."""
CLAIM_ATTEMPTS = 8
"""Claim statements one claim runs at most when it keeps losing races (then StoreBusy)."""
RECONNECT_DELAY = 0.5
"""After a failed connect, new connections are not attempted for this long (fail fast)."""
LISTEN_RETRY = 1.0
"""After the listener failed to connect, waiters poll for this long before it is retried."""
REAP_INTERVAL = 60.0
"""Idle connections beyond ``min_size`` that stayed unused this long are closed."""

_OPTIONS = frozenset({"table", "min_size", "max_size", "timeout", "create", "statement_cache_size"})
_PASSTHROUGH = frozenset(
    {
        "host", "port", "user", "password", "dbname", "database", "passfile", "service",
        "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword",
        "sslnegotiation", "ssl_min_protocol_version", "ssl_max_protocol_version",
        "target_session_attrs", "krbsrvname", "gsslib",
        "application_name", "options", "synchronous_commit",
    }
)  # fmt: skip
"""Connection parameters of the URL asyncpg reads itself; the last three are session settings
sent in the startup packet (no statement, no round trip)."""
_BUSY_STATES = frozenset({"40001", "40P01", "55P03"})
"""Serialization failure, deadlock, lock not available: contention, not an outage."""
_STATES = {int(state): state for state in State}
_COLUMNS = "state, token, fingerprint, lease_until, expires_at, response, scope, created_at"
_NOW = "date_part('epoch', now())"
"""The database's clock, once per statement: ``now()`` is fixed for a transaction."""
_CLAIMED_COLUMNS = _COLUMNS.replace(
    "state,", f"CASE WHEN state = 3 AND lease_until <= {_NOW} THEN 2 ELSE state END AS state,"
)
"""The existing record as a claim sees it: a committed effect whose holder died (its lease
ran out) is never run again, so it reads as not replayable."""

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
"""What a statement or a connect raises when the ledger, not this code, is at fault."""
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*_DB_ERRORS, ValueError)
"""What a connect raises, also for a DSN asyncpg cannot use."""


class _Connection(Protocol):
    """The part of :class:`asyncpg.Connection` this module uses."""

    async def fetchrow(self, query: str, *args: object) -> Any: ...
    async def fetchval(self, query: str, *args: object) -> Any: ...
    async def fetch(self, query: str, *args: object) -> list[Any]: ...
    async def execute(self, query: str, *args: object) -> str: ...
    async def close(self, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109
    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None: ...
    def add_termination_listener(self, callback: Callable[..., None]) -> None: ...
    def transaction(self) -> Any: ...
    def is_closed(self) -> bool: ...
    def is_in_transaction(self) -> bool: ...
    def terminate(self) -> None: ...
    def get_server_pid(self) -> int: ...


# -- fork and event loop safety -----------------------------------------------------------------

_forks = 0
"""How many times this process is a forked child of the one that imported this module."""
_inherited: list[object] = []
"""Pools a forked child found: kept, never touched, never collected. Their sockets and event
loop registrations belong to the parent (an epoll set is shared across fork)."""


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Pool:
    """The connections of one store on one event loop in one process.

    Checkout is a ``list.pop`` when a connection is idle; otherwise a new one is opened (up
    to ``max_size``) or the caller queues, first come first served, for at most ``timeout``.
    """

    def __init__(self, store: PostgresStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.forks = _forks
        self.idle: list[_Connection] = []
        self.size = 0
        """Connections open or being opened."""
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.ready = False
        """Whether the schema was checked (and created if asked) on this pool."""
        self.prepare_lock = asyncio.Lock()
        self.connect_after = 0.0
        self.connect_error: BaseException | None = None
        self.closed = False
        self.low = 0
        """The fewest idle connections since the last reap: those were not needed."""
        self.closing: set[asyncio.Task[None]] = set()
        self.listener = _Listener(store, self)
        self.reaper: asyncio.TimerHandle | None = loop.call_later(REAP_INTERVAL, self._reap)

    async def acquire(self) -> _Connection:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if len(idle) < self.low:
                self.low = len(idle)
            if not conn.is_closed():
                return conn
            self.size -= 1  # closed by the server while idle: forget it
        if self.size < self.store.max_size:
            return await self._open()
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.store.timeout):
                handed = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed over as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise StoreBusy(
                    f"postgresql ledger {self.store.where}: no connection came free within"
                    f" {self.store.timeout:g} s ({self.store.max_size} in use); raise max_size"
                ) from None
            raise
        if handed is not None and handed.is_closed():  # ended by the server meanwhile
            self.size -= 1
            handed = None
        if handed is None:  # a connection slot came free: it is ours
            return await self._open()
        return handed

    async def _open(self) -> _Connection:
        if self.closed:
            raise StoreUnavailable(f"postgresql ledger {self.store.where}: the store is closed")
        if self.connect_error is not None and self.loop.time() < self.connect_after:
            self._pass_slot()
            raise self.store.error(self.connect_error, " (reconnecting)")
        self.size += 1
        try:
            conn = await self.store.connect()
        except BaseException as exc:
            self.size -= 1
            if isinstance(exc, _CONNECT_ERRORS):
                self.connect_error = exc
                self.connect_after = self.loop.time() + min(RECONNECT_DELAY, self.store.timeout)
            self._pass_slot()
            raise
        self.connect_error = None
        if self.closed:
            self._discard(conn)
            raise StoreUnavailable(f"postgresql ledger {self.store.where}: the store is closed")
        return conn

    def release(self, conn: _Connection, exc: BaseException | None = None) -> None:
        """Take ``conn`` back; after ``exc``, only if the connection is sure to be sound."""
        if exc is not None and not _leaves_connection_sound(exc):
            self._discard(conn)  # timed out, cancelled or cut mid-statement: never reuse
            if isinstance(exc, _DB_ERRORS):
                # Most likely the server went away (restart, failover, a cut network): the
                # idle connections are as good as dead, so the next requests open new ones
                # rather than each finding one more dead connection.
                self._expire_idle()
            return
        if self.closed or conn.is_closed() or conn.is_in_transaction():
            self._discard(conn)
            return
        self._give_back(conn)

    def _give_back(self, conn: _Connection | None) -> None:
        if conn is None:
            self._pass_slot()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def _pass_slot(self) -> None:
        """A connection slot came free: let the first waiter open a connection in it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _discard(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            conn.terminate()
        self.size -= 1
        self._pass_slot()

    def _expire_idle(self) -> None:
        idle, self.idle = self.idle, []
        self.size -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.terminate()
            self._pass_slot()

    def _close_later(self, conn: _Connection) -> None:
        task = self.loop.create_task(_close_quietly(conn, self.store.timeout))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def _reap(self) -> None:
        if self.closed:
            self.reaper = None
            return
        self.reaper = self.loop.call_later(REAP_INTERVAL, self._reap)
        surplus = min(self.low, len(self.idle) - self.store.min_size)
        if surplus > 0:
            doomed = self.idle[:surplus]  # the bottom of the stack: the least recently used
            del self.idle[:surplus]
            self.size -= surplus
            for conn in doomed:
                self._close_later(conn)
        self.low = len(self.idle)

    async def close(self) -> None:
        self.closed = True
        if self.reaper is not None:
            self.reaper.cancel()
            self.reaper = None
        idle, self.idle = self.idle, []
        self.size -= len(idle)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # they try to open, and learn the store is closed
        await self.listener.close()
        await asyncio.gather(
            *(_close_quietly(conn, self.store.timeout) for conn in idle), *self.closing
        )

    def abandon(self) -> None:
        """Drop this pool from another event loop or a forked child, touching little."""
        self.closed = True
        if self.forks != _forks:
            _inherited.append(self)  # the parent's: leave its sockets and loop alone
            return
        if self.loop.is_closed():
            return  # nothing can be done on a closed loop; the sockets close when collected
        if self.reaper is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.reaper.cancel)
        for conn in [*self.idle, *self.listener.connections()]:
            with contextlib.suppress(Exception):
                self.loop.call_soon_threadsafe(conn.terminate)
        self.idle = []


def _leaves_connection_sound(exc: BaseException) -> bool:
    """Whether a connection on which ``exc`` was raised can serve the next statement.

    The server's own errors (a statement refused) leave it ready; so do this module's
    errors raised after a statement answered. Anything else (a timeout, a cancellation, a
    network error, class 08 "connection exception") may leave it mid-protocol.
    """
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", ""))
        # 57P0x: the server is shutting down or the database is gone; 25006: a read-only
        # server (a standby after a failover): reconnect, to find the new primary.
        return not state.startswith(("08", "57P")) and state != "25006"
    return isinstance(exc, (StoreUnavailable, CorruptRecord))


async def _close_quietly(conn: _Connection, within: float) -> None:
    try:
        await conn.close(timeout=min(within, 2.0))
    except Exception:
        conn.terminate()


class _Listener:
    """One connection per pool that LISTENs on the table's channel for every waiter."""

    def __init__(self, store: PostgresStore, pool: _Pool) -> None:
        self.store = store
        self.pool = pool
        self.conn: _Connection | None = None
        self.connecting: asyncio.Task[bool] | None = None
        self.retry_at = 0.0
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.probing: asyncio.Task[None] | None = None

    def connections(self) -> list[_Connection]:
        return [] if self.conn is None else [self.conn]

    async def ensure(self) -> bool:
        """Whether notifications can be received now; connects (again) if need be.

        The connect runs as a task of its own: a waiter whose time runs out does not cancel
        it, so short waits cannot keep the listener from ever connecting.
        """
        conn = self.conn
        if conn is not None and not conn.is_closed():
            return True
        if self.pool.closed or self.pool.loop.time() < self.retry_at:
            return False
        task = self.connecting
        if task is None:
            task = self.connecting = self.pool.loop.create_task(self._connect())
        return await asyncio.shield(task)

    async def _connect(self) -> bool:
        conn = None
        try:
            conn = await self.store.connect()
            conn.add_termination_listener(self._lost)
            await conn.add_listener(self.store.channel, self._notified)
        except BaseException as exc:
            if conn is not None:
                conn.terminate()
            if not isinstance(exc, Exception):
                raise  # cancelled: the store is closing
            self.retry_at = self.pool.loop.time() + LISTEN_RETRY
            logger.warning(
                "retrysafe: cannot listen for %s, polling instead: %s",
                self.store.where,
                self.store.scrub(f"{type(exc).__name__}: {exc}"),
            )
            return False
        finally:
            self.connecting = None
        if self.pool.closed:
            conn.terminate()
            return False
        self.conn = conn
        return True

    def register(self, key: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = self.pool.loop.create_future()
        self.waiters.setdefault(key, set()).add(waiter)
        return waiter

    def unregister(self, key: str, waiter: asyncio.Future[None]) -> None:
        waiting = self.waiters.get(key)
        if waiting is not None:
            waiting.discard(waiter)
            if not waiting:
                del self.waiters[key]

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        for waiter in self.waiters.pop(payload, ()):
            if not waiter.done():
                waiter.set_result(None)

    def probe(self) -> None:
        """A notification seems lost: check, in the background, that the listening
        connection still answers, and end it if not (its waiters are woken; the next wait
        connects again). A flow a NAT or firewall dropped while idle looks open forever."""
        conn = self.conn
        if conn is None or conn.is_closed() or self.probing is not None:
            return
        self.probing = self.pool.loop.create_task(self._probe(conn))

    async def _probe(self, conn: _Connection) -> None:
        try:
            await conn.execute("SELECT 1")  # bounded by the connection's command_timeout
        except Exception as exc:
            logger.warning(
                "retrysafe: listening again after a failed check: %s", self.store.error(exc)
            )
            conn.terminate()  # its termination listener wakes the waiters (_lost)
        finally:
            self.probing = None

    def _lost(self, conn: object) -> None:
        """The connection ended: notifications may have been missed, so wake every waiter."""
        if conn is self.conn:
            self.conn = None
        waiters, self.waiters = self.waiters, {}
        for waiting in waiters.values():
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        tasks = [task for task in (self.connecting, self.probing) if task is not None]
        self.connecting = self.probing = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn, self.conn = self.conn, None
        if conn is not None:
            await _close_quietly(conn, self.store.timeout)
        self._lost(None)


# -- the store --------------------------------------------------------------------------------


class PostgresStore(Store):
    """A ledger in one PostgreSQL table, shared by every process and host that opens it.

    Needs PostgreSQL 9.5 or newer (tested on 15). Bound to one event loop at a time: used
    from another loop (a second ``asyncio.run``) or in a forked child, it opens new
    connections; call :meth:`aclose` before a loop ends to close its connections cleanly.
    """

    poll_interval = 0.1
    """How often waiters look again while notifications cannot be received."""
    recheck_interval = 1.0
    """How often a waiter looks at the record again while it waits for a notification: one
    can be lost without the listening connection noticing (a NAT or firewall that dropped
    its idle flow, a pooler in transaction mode), which bounds what such a loss costs."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "retrysafe_records",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        create: bool = True,
        statement_cache_size: int = 100,
    ) -> None:
        self.where = _redact(dsn)
        """The ledger's URL, without its password, for messages."""
        parts = urlsplit(dsn)
        if parts.scheme not in {"postgresql", "postgres"}:
            raise ConfigError(f"{self.where}: not a postgresql:// URL")
        if not _TABLE_RE.fullmatch(table):
            raise ConfigError(
                f"{self.where}: table must be an identifier of letters, digits and _"
                f" (at most 48): {table!r}"
            )
        if not (isinstance(max_size, int) and max_size >= 1):
            raise ConfigError(f"{self.where}: max_size must be an integer >= 1: {max_size!r}")
        if not (isinstance(min_size, int) and 0 <= min_size <= max_size):
            raise ConfigError(
                f"{self.where}: min_size must be an integer from 0 to max_size: {min_size!r}"
            )
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"{self.where}: timeout must be a number of seconds > 0: {timeout}")
        if not (isinstance(statement_cache_size, int) and statement_cache_size >= 0):
            raise ConfigError(
                f"{self.where}: statement_cache_size must be an integer >= 0:"
                f" {statement_cache_size!r}"
            )
        self._dsn = dsn
        self._secrets = _secrets(dsn)
        self.table = table
        self.channel = table
        """Notifications go to a channel named like the table (channels have a namespace
        of their own)."""
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = float(timeout)
        self.create = create
        self._connect_options: dict[str, Any] = {
            "timeout": self.timeout,
            "command_timeout": self.timeout,
            "statement_cache_size": statement_cache_size,
            "max_cached_statement_lifetime": 0,
        }
        if "application_name" not in dict(parse_qsl(parts.query)):
            self._connect_options["server_settings"] = {"application_name": "retrysafe"}
        self._pool: _Pool | None = None

        t = f'"{table}"'
        self._t = t
        # The claim, in one statement. `cur` is the live record as of the statement's
        # snapshot. Only when there is none (absent, expired, or in flight with its lease run
        # out) does `ins` insert, or take over the old row through ON CONFLICT: a replay or an
        # in-flight duplicate neither writes nor locks. The row comes from `ins` (taken) or
        # from `cur` (the existing record).
        #
        # Under READ COMMITTED one race gives no row at all: another claim inserted (or took
        # over) the record after this statement's snapshot was taken, so `cur` did not see
        # it, and ON CONFLICT found it live and left it alone. That is rare (concurrent
        # duplicates of one key) and the next statement's snapshot sees the winner, so the
        # claim simply runs again (CLAIM_ATTEMPTS at most, then StoreBusy). The alternative,
        # a DO UPDATE that always fires so that RETURNING yields the winner's row, would
        # write a dead tuple per loser.
        #
        # A takeover may first wait for the old row's lock (an app's marking transaction
        # that outlived its lease, then rolled back): its lease starts when it writes
        # (clock_timestamp(), read after the wait), not when the statement began, or the
        # wait would be cut from the new holder's lease, which could end before its first
        # renewal and let a third request take the key over while it runs.
        self._sql_claim = (
            f"WITH cur AS (SELECT {_CLAIMED_COLUMNS} FROM {t} WHERE rid = $1::bytea"
            f" AND expires_at > {_NOW}"
            f" AND (state <> 0 OR lease_until > {_NOW})),"
            f" ins AS (INSERT INTO {t} AS r (rid, token, state, fingerprint, lease_until,"
            " expires_at, response, scope, created_at, watched)"
            " SELECT $1::bytea, $2::bigint, 0, $3::bytea, c.now + $4::float8,"
            " c.now + $5::float8, NULL, $6::bytea, c.now, false"
            f" FROM (SELECT {_NOW} AS now) AS c WHERE NOT EXISTS (SELECT FROM cur)"
            " ON CONFLICT (rid) DO UPDATE SET token = excluded.token, state = 0,"
            " fingerprint = excluded.fingerprint, (lease_until, expires_at, created_at) ="
            " (SELECT k.now + $4::float8, k.now + $5::float8, k.now"
            " FROM (SELECT date_part('epoch', clock_timestamp()) AS now) AS k),"
            " response = NULL, scope = excluded.scope, watched = false"
            " WHERE r.expires_at <= excluded.created_at"
            " OR (r.state = 0 AND r.lease_until <= excluded.created_at)"
            " RETURNING true)"
            " SELECT true, NULL::smallint, NULL::bigint, NULL::bytea, NULL::float8,"
            " NULL::float8, NULL::bytea, NULL::bytea, NULL::float8 FROM ins"
            f" UNION ALL SELECT false, {_COLUMNS} FROM cur"
        )
        self._sql_renew = (
            f"UPDATE {t} SET lease_until = {_NOW} + $3,"
            f" expires_at = greatest(expires_at, {_NOW} + $3"
            " + CASE WHEN state = 3 THEN expires_at - lease_until ELSE 0 END)"
            " WHERE rid = $1 AND token = $2 AND state IN (0, 3)"
        )
        # Notify only records a waiter marked (see wait()); one row back: done, none: not held.
        notify = (
            f"SELECT (CASE WHEN watched THEN pg_notify({_literal(self.channel)},"
            " encode(rid, 'hex')) END) IS NULL"
        )
        self._sql_complete = (
            f"WITH u AS (UPDATE {t} SET state = $3, response = $4, lease_until = {_NOW},"
            f" expires_at = {_NOW} + $5 WHERE rid = $1 AND token = $2 AND state IN (0, 3)"
            f" RETURNING rid, watched) {notify} FROM u"
        )
        self._sql_release = (
            f"WITH d AS (DELETE FROM {t} WHERE rid = $1 AND token = $2 AND state <> 3"
            f" RETURNING rid, watched) {notify} FROM d"
        )  # a committed effect's record is never released (State.COMMITTED)
        # Run by the app inside its own transaction: (rid, token, ttl). clock_timestamp(), not
        # now(): that transaction may have begun long before its lease ran out.
        self._sql_mark = (
            f"UPDATE {t} AS r SET state = 3, expires_at = greatest(r.expires_at,"
            " r.lease_until + x.ttl) FROM (SELECT $1::bytea AS rid, $2::bigint AS token,"
            " $3::float8 AS ttl) AS x WHERE r.rid = x.rid AND r.token = x.token"
            " AND r.state IN (0, 3) AND r.lease_until > date_part('epoch', clock_timestamp())"
        )
        self._sql_delete = (
            f"WITH d AS (DELETE FROM {t} WHERE rid = $1 RETURNING rid, watched) {notify} FROM d"
        )
        # A waiter marks the in-flight record (once: later waiters find it marked) and learns
        # how long its lease has left; no row: the record is no longer in flight.
        self._sql_watch = (
            f"WITH cur AS (SELECT watched, lease_until - {_NOW} AS remaining FROM {t}"
            f" WHERE rid = $1 AND state IN (0, 3) AND lease_until > {_NOW}),"
            f" u AS (UPDATE {t} SET watched = true WHERE rid = $1 AND state IN (0, 3)"
            " AND NOT watched"
            f" AND lease_until > {_NOW} RETURNING lease_until - {_NOW} AS remaining)"
            " SELECT remaining FROM u UNION ALL SELECT remaining FROM cur WHERE watched"
        )
        self._sql_get = f"SELECT {_COLUMNS} FROM {t} WHERE rid = $1 AND expires_at > {_NOW}"
        self._sql_purge = (
            f"DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t}"
            f" WHERE expires_at <= {_NOW} ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))"
            f" AND expires_at <= {_NOW}"
        )
        self._sql_scan = (
            f"SELECT rid, {_COLUMNS} FROM {t} WHERE rid > $1 AND expires_at > {_NOW}"
            " ORDER BY rid LIMIT $2"
        )
        self._sql_stats = f"SELECT expires_at > {_NOW}, state, count(*) FROM {t} GROUP BY 1, 2"
        self._sql_version = (
            "SELECT c.oid IS NOT NULL, obj_description(c.oid, 'pg_class')"
            " FROM (SELECT to_regclass($1) AS oid) AS c"
        )

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """The store a ``postgresql://`` or ``postgres://`` URL names (see the module)."""
        where = _redact(url)
        parts = urlsplit(url)
        for host in parts.netloc.rpartition("@")[2].split(","):  # h1:5432,h2:5433: each port
            port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host else ""
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(f"{where}: not a valid port: {port!r}")
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"{where}: option(s) given more than once: {', '.join(repeated)}")
        unknown = sorted(set(names) - _OPTIONS - _PASSTHROUGH)
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; the ledger's are"
                f" {', '.join(sorted(_OPTIONS))}, and connection parameters such as sslmode"
            )
        options = {name: value for name, value in pairs if name in _OPTIONS}
        passed = [(name, value) for name, value in pairs if name in _PASSTHROUGH]
        if "sslmode" in dict(passed) and dict(passed)["sslmode"] not in {
            "disable", "allow", "prefer", "require", "verify-ca", "verify-full",
        }:  # fmt: skip
            raise ConfigError(f"{where}: unknown sslmode {dict(passed)['sslmode']!r}")
        kwargs: dict[str, Any] = {}
        if "table" in options:
            kwargs["table"] = options["table"]
        for name in ("min_size", "max_size", "statement_cache_size"):
            if name in options:
                try:
                    kwargs[name] = int(options[name])
                except ValueError:
                    raise ConfigError(
                        f"{where}: {name} must be an integer, not {options[name]!r}"
                    ) from None
        if "timeout" in options:
            try:
                kwargs["timeout"] = float(options["timeout"])
            except ValueError:
                raise ConfigError(
                    f"{where}: timeout must be a number of seconds, not {options['timeout']!r}"
                ) from None
        if "create" in options:
            kwargs["create"] = parse_flag(url, "create", options["create"])
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if "@" in userinfo:
            # A raw '@' in the password (postgres:p@ss@host): the last '@' ends the user
            # information, but asyncpg splits at the first one. Percent-encoded, it agrees.
            parts = parts._replace(netloc=f"{userinfo.replace('@', '%40')}{at}{hosts}")
        dsn = parts._replace(query=urlencode(passed)).geturl()
        try:
            store = cls(dsn, **kwargs)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(_redact(dsn), where)) from None
        store.where = where  # with its options: what `retrysafe store init` needs too
        return store

    # -- connections ------------------------------------------------------------------------

    async def connect(self) -> _Connection:
        """A new connection of the ledger's (for the pool and the listener)."""
        conn: _Connection = await asyncpg.connect(self._dsn, **self._connect_options)
        return conn

    def scrub(self, text: str) -> str:
        """``text`` without the password (asyncpg's messages might quote it)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def error(self, exc: BaseException, what: str = "") -> StoreUnavailable:
        """The error to raise for ``exc``: :class:`StoreBusy` if contended, else unavailable."""
        if isinstance(exc, TimeoutError):
            text = f"no answer within {self.timeout:g} s"
        else:
            text = self.scrub(f"{type(exc).__name__}: {exc}")
        if getattr(exc, "sqlstate", None) in _BUSY_STATES:
            return StoreBusy(f"postgresql ledger {self.where} is busy{what}: {text}")
        return StoreUnavailable(f"postgresql ledger {self.where}{what}: {text}")

    def _current_pool(self) -> _Pool:
        pool = self._pool
        loop = asyncio.get_running_loop()
        if pool is None or pool.loop is not loop or pool.forks != _forks:
            if pool is not None:
                pool.abandon()
            pool = self._pool = _Pool(self, loop)
        return pool

    async def _run(self, op: Callable[[_Connection], Awaitable[T]]) -> T:
        """Run ``op`` on one connection of the pool; map the ledger's failures."""
        pool = self._current_pool()
        if not pool.ready:
            await self._prepare(pool)
        return await self._execute(pool, op)

    async def _execute(self, pool: _Pool, op: Callable[[_Connection], Awaitable[T]]) -> T:
        try:
            conn = await pool.acquire()
        except _CONNECT_ERRORS as exc:
            raise self.error(exc) from exc
        try:
            for attempt in range(1, CLAIM_ATTEMPTS + 1):
                try:
                    result = await op(conn)
                    break
                except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                    # Under REPEATABLE READ or SERIALIZABLE (a server, role or URL default)
                    # two of the ledger's own writes to one row (a renewal and a completion,
                    # a waiter's mark) collide. Every operation is one statement, fenced by
                    # token, whose failed run left nothing: run it again.
                    if attempt == CLAIM_ATTEMPTS:
                        raise
        except BaseException as exc:
            pool.release(conn, exc)
            if isinstance(exc, _DB_ERRORS):
                if getattr(exc, "sqlstate", None) == "42P01":  # the table is gone
                    pool.ready = False
                raise self.error(exc) from exc
            raise
        pool.release(conn)
        return result

    # -- schema -----------------------------------------------------------------------------

    async def _prepare(self, pool: _Pool) -> None:
        """Check the schema once per pool (and create it on first use if ``create``)."""
        async with pool.prepare_lock:
            if not pool.ready:
                await self._execute(pool, lambda conn: self._ensure_schema(conn, self.create))
                pool.ready = True

    async def _version(self, conn: _Connection) -> int | None:
        """The table's schema version; None if there is no table."""
        exists, comment = await conn.fetchrow(self._sql_version, self._t)
        if not exists:
            return None
        found = _COMMENT_RE.search(comment or "")
        if found is None:
            # to_regclass reads the catalog as it is now, the comment as of the statement's
            # snapshot: a table another process created (with its comment) at this very
            # moment can look bare. A new statement has a new snapshot: look once more.
            exists, comment = await conn.fetchrow(self._sql_version, self._t)
            found = _COMMENT_RE.search(comment or "")
        if found is None:
            raise StoreUnavailable(
                f"postgresql ledger {self.where}: table {self.table!r} exists but is not a"
                " retrysafe ledger (its comment names no schema version)"
            )
        return int(found.group(1))

    def _check_version(self, version: int) -> None:
        if version != SCHEMA_VERSION:
            raise StoreUnavailable(
                f"postgresql ledger {self.where}: table {self.table!r} has ledger schema"
                f" {version}; this retrysafe knows {SCHEMA_VERSION}: upgrade retrysafe"
            )

    async def _ensure_schema(self, conn: _Connection, create: bool) -> None:
        version = await self._version(conn)
        if version is not None:
            self._check_version(version)
            return
        if not create:
            raise StoreUnavailable(
                f"postgresql ledger {self.where}: table {self.table!r} does not exist and"
                f" create=false: create it with `retrysafe store init {self.where}`"
            )
        await self._create(conn)

    async def _create(self, conn: _Connection) -> None:
        t = self._t
        try:
            async with conn.transaction():
                # Processes starting together: one creates, the others wait for it here.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"retrysafe {t}")
                version = await self._version(conn)
                if version is not None:
                    self._check_version(version)
                else:
                    await conn.execute(
                        f"CREATE TABLE {t} (rid bytea PRIMARY KEY, token bigint NOT NULL,"
                        " state smallint NOT NULL, fingerprint bytea NOT NULL,"
                        " lease_until double precision NOT NULL,"
                        " expires_at double precision NOT NULL, response bytea,"
                        " scope bytea NOT NULL DEFAULT ''::bytea,"
                        " created_at double precision NOT NULL,"
                        " watched boolean NOT NULL DEFAULT false)"
                    )
                    await conn.execute(
                        f"COMMENT ON TABLE {t} IS {_literal(_COMMENT.format(SCHEMA_VERSION))}"
                    )
                # CREATE INDEX locks the table against writes before it looks whether the
                # index exists: on a live ledger (`store init` again) it would queue behind any
                # open transaction that wrote a row (an app's mark) and hold every claim back.
                index = f'"{self.table}_expiry"'
                if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", index):
                    await conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)")
        except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
            # Made by the transaction this one waited for: the lookup above could not see it
            # yet (an advisory lock does not refresh the catalog cache; a new transaction does).
            version = await self._version(conn)
            if version is None:
                raise
            self._check_version(version)

    async def initialize(self) -> None:
        """Create the table and its index if missing (whatever ``create`` says); idempotent."""
        pool = self._current_pool()
        async with pool.prepare_lock:
            await self._execute(pool, self._create)
            pool.ready = True

    # -- primitives -------------------------------------------------------------------------

    @staticmethod
    def _record(row: Any, offset: int = 0) -> Record:
        state, token, fingerprint, lease_until, expires_at, response, scope, created_at = row[
            offset : offset + 8
        ]
        try:
            return Record(
                _STATES[state], token, fingerprint, lease_until, expires_at, response, scope,
                created_at,
            )  # fmt: skip
        except KeyError:
            raise CorruptRecord(f"undecodable ledger row: no state {state!r}", token) from None

    async def claim(
        self,
        rid: bytes,
        token: int,
        fingerprint: bytes,
        lease: float,
        ttl: float,
        *,
        scope: bytes = b"",
    ) -> Record | None:
        args = (rid, token, fingerprint, float(lease), float(max(ttl, lease)), scope)

        async def op(conn: _Connection) -> Any:
            for _ in range(CLAIM_ATTEMPTS):
                try:
                    row = await conn.fetchrow(self._sql_claim, *args)
                except asyncpg.SerializationError:
                    # The same race under REPEATABLE READ or SERIALIZABLE (a server or
                    # role default): the next statement's snapshot sees the winner.
                    continue
                if row is not None:
                    return row
            return None

        row = await self._run(op)
        if row is None:
            raise StoreBusy(
                f"postgresql ledger {self.where}: a claim lost {CLAIM_ATTEMPTS} races in a row"
            )
        if row[0]:
            return None
        return self._record(row, 1)

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        lease = float(lease)

        async def op(conn: _Connection) -> str:
            return await conn.execute(self._sql_renew, rid, token, lease)

        return (await self._run(op)) == "UPDATE 1"

    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        args = (rid, token, int(state), response, float(ttl))

        async def op(conn: _Connection) -> Any:
            return await conn.fetchval(self._sql_complete, *args)

        return (await self._run(op)) is not None

    async def release(self, rid: bytes, token: int) -> bool:
        async def op(conn: _Connection) -> Any:
            return await conn.fetchval(self._sql_release, rid, token)

        return (await self._run(op)) is not None

    dbapi_paramstyle = "format"

    def mark_statement(self, paramstyle: str) -> str:
        if paramstyle == "numeric_dollar":
            return self._sql_mark
        if paramstyle == "format":
            return self._sql_mark.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
        raise ConfigError(
            f"a postgresql ledger takes numeric_dollar or format parameters, not {paramstyle!r}"
        )

    async def get(self, rid: bytes) -> Record | None:
        async def op(conn: _Connection) -> Any:
            return await conn.fetchrow(self._sql_get, rid)

        row = await self._run(op)
        return None if row is None else self._record(row)

    async def delete(self, rid: bytes) -> bool:
        async def op(conn: _Connection) -> Any:
            return await conn.fetchval(self._sql_delete, rid)

        return (await self._run(op)) is not None

    async def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records, at most :data:`PURGE_BATCH` per statement.

        Rows locked by a concurrent claim (taking an expired record over) are skipped. The
        connection goes back to the pool between batches.
        """
        deleted = 0
        while deleted < limit:
            batch = min(PURGE_BATCH, limit - deleted)

            async def op(conn: _Connection, batch: int = batch) -> str:
                return await conn.execute(self._sql_purge, batch)

            n = int((await self._run(op)).rpartition(" ")[2])
            deleted += n
            if n < batch:
                break
        return deleted

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        after = cursor_after(cursor)

        async def op(conn: _Connection) -> list[Any]:
            return await conn.fetch(self._sql_scan, after, limit + 1)

        rows = await self._run(op)
        page: list[tuple[bytes, Record]] = []
        for row in rows[:limit]:
            try:
                page.append((row[0], self._record(row, 1)))
            except CorruptRecord:
                continue  # the request path drops it when the key comes back
        return page, (rows[limit - 1][0].hex() if len(rows) > limit else None)

    async def stats(self) -> StoreStats:
        async def op(conn: _Connection) -> list[Any]:
            return await conn.fetch(self._sql_stats)

        return StoreStats.tally(await self._run(op))

    async def wait(self, rid: bytes, timeout: float) -> None:  # noqa: ASYNC109
        """Return when ``rid`` is completed or released, its lease ends, or ``timeout`` passes.

        The waiter listens (on the store's one listening connection), then marks the record
        ``watched`` so that its completion or release notifies: a record completed before
        the mark is found no longer in flight, and the wait ends at once. If notifications
        cannot be received, it polls every :attr:`poll_interval` instead; while it listens,
        it still looks every :attr:`recheck_interval`, in case a notification was lost.
        """
        if timeout <= 0:
            return
        pool = self._current_pool()
        listener = pool.listener
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                if not await listener.ensure():
                    await asyncio.sleep(self.poll_interval)
                    return
                key = rid.hex()
                waiter = listener.register(key)
                try:

                    async def op(conn: _Connection) -> Any:
                        return await conn.fetchval(self._sql_watch, rid)

                    left = await self._run(op)
                    while left is not None:  # None: completed, released or lease ended
                        every = self.recheck_interval
                        await asyncio.wait([waiter], timeout=min(max(0.0, left) + 0.005, every))
                        if waiter.done() or not left >= every:  # woken, or the lease ended
                            return
                        try:
                            left = await self._run(op)
                        except StoreUnavailable:
                            return  # the engine looks again, and answers for the ledger
                        if left is None and not waiter.done():
                            listener.probe()  # changed, and no notification came
                finally:
                    listener.unregister(key, waiter)
        except TimeoutError:
            if not scope.expired():
                raise

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if pool.loop is loop and pool.forks == _forks:
            await pool.close()
        else:
            pool.abandon()


def _redact(url: str) -> str:
    """``url`` for messages: no password, neither in the host part nor in the options."""
    return redact_url(url)


def _secrets(url: str) -> list[str]:
    """The passwords ``url`` holds, as written and decoded, longest first."""
    parts = urlsplit(url)
    found = [parts.password or ""]
    found += [
        value
        for name, value in parse_qsl(parts.query)
        if name.lower() in {"password", "sslpassword"}
    ]
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (for names this module built itself)."""
    return "'" + text.replace("'", "''") + "'"
