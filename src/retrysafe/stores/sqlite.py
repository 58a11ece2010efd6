"""``sqlite:///file.db``: the embedded default ledger, one file shared by a host's workers.

WAL mode lets readers (replays) run beside a writer.

Statements run inline, on the event loop: a claim costs tens of microseconds, far less than a
hop to a thread. That has costs to know about:

* ``synchronous=FULL`` (or ``EXTRA``) fsyncs every commit, and that fsync runs on the event
  loop too: commits survive a power loss, but every claim and completion is slower, as the
  whole loop waits for the disk. The default ``NORMAL`` survives process crashes; a power
  loss may undo the last commits. It syncs only at checkpoints, which a background thread
  runs.
* Two exceptions run in a worker thread, each on a short-lived connection of its own:
  :meth:`SQLiteStore.purge_expired`, in batches of at most 100 rows, and a completion whose
  response is larger than :data:`LARGE_WRITE` (256 KiB), which would otherwise hold the loop
  for milliseconds while it is copied into the file.

SQLite's own busy handler would stall the event loop, so it is off inline; a busy database is
retried here with asynchronous backoff, and past ``busy_timeout`` it becomes
:class:`StoreBusy` (a 503), never "database is locked" as a 500. Any other failure is
:class:`StoreUnavailable`.

The store is safe across ``fork()``: before a fork every store closes its connection (and
stops its checkpointer thread), and each process reopens one lazily on its next use. A
connection carried across a fork would share SQLite's per-process lock bookkeeping with the
parent's and could commit into a WAL the parent has already deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import ConfigError, CorruptRecord, StoreBusy, StoreUnavailable
from ..records import Record, State
from .base import Store, StoreStats, cursor_after

__all__ = ["SQLiteStore"]

T = TypeVar("T")
SCHEMA_VERSION = 1
MIN_SQLITE = (3, 35)
"""RETURNING and UPSERT ... DO UPDATE ... WHERE, which :meth:`SQLiteStore.claim` relies on."""
GROUP_COMMIT_MAX = 64
"""Most writes one transaction carries: the write lock is never held for long."""
GROUP_SAMPLE, GROUP_WORTHWHILE, GROUP_PAUSE = 32, 1.5, 256
"""Group commits looked at; writes per commit below which grouping stops; writes it stops for."""
PAGE_SIZE = 1024
"""Page size of a ledger file this store creates (SQLite's default is 4096)."""
LARGE_WRITE = 256 << 10
"""A completion carrying a response larger than this is written from a worker thread."""
PURGE_BATCH = 100
"""Most rows one purge statement deletes: the write lock is never held for long."""
FILE_CHECK_INTERVAL = 0.25
"""Seconds between two looks at whether the ledger file was deleted or replaced."""
_COLUMNS = "state, token, fingerprint, lease_until, expires_at, response, scope, created_at"
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


_Job = tuple[Callable[["sqlite3.Connection"], Any], "asyncio.Future[Any]"]
"""A write waiting for the next group commit, and where its outcome goes."""


class _Contended(Exception):
    """Busy in a way SQLite did not report itself (a claim that kept losing races)."""


def _is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` means "busy or locked right now", as opposed to "broken"."""
    if isinstance(exc, _Contended):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _BUSY_CODES  # extended codes: SQLITE_BUSY_SNAPSHOT, ...
    message = str(exc)  # no code (an error not raised by SQLite itself): judge by its text
    return "locked" in message or "busy" in message


# -- fork safety ------------------------------------------------------------------------------

_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_held = threading.local()
"""The locks the forking thread took in :func:`_before_fork` (its own: forks may overlap)."""
_forking = False
"""Set while a fork is being prepared: a running purge stops at its next batch."""


def _before_fork() -> None:
    """Close every store's connections, and hold its locks until the fork is done.

    Nothing of SQLite's is open across the fork, so neither process inherits lock state that
    does not match the locks it really holds; each reopens on its next use.
    """
    global _forking
    _forking = True
    held: list[threading.Lock] = []
    _held.locks = held
    for store in list(_stores):
        store._lock.acquire()
        held.append(store._lock)
        store._purge_lock.acquire()  # waits for a running purge to close its connection
        held.append(store._purge_lock)
        store._apart_lock.acquire()  # and for a large write in a worker thread
        held.append(store._apart_lock)
        if store._private:
            continue  # the connection IS the database: the parent keeps it (see the child)
        try:
            store._close()
        except Exception:  # pragma: no cover - a fork must not fail for a ledger
            store._conn = None
            store._checkpointer = None
    # Checkpointers already stopped (a closed or collected store) may still hold a connection.
    for thread in threading.enumerate():
        if isinstance(thread, _Checkpointer):
            thread.stop()
            thread.join()


def _after_fork() -> None:
    global _forking
    held: list[threading.Lock] = getattr(_held, "locks", [])
    _held.locks = []
    while held:
        held.pop().release()
    _forking = False


def _after_fork_in_child() -> None:
    # A private (":memory:") database is its process's own: the child starts an empty one
    # rather than use the parent's connection, which it drops without touching.
    for store in list(_stores):
        if store._private:
            store._conn = None
    _after_fork()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork_in_child
)


class SQLiteStore(Store):
    """A ledger in one SQLite file. Safe for many processes on one host; not for network disks.

    Its statements run inline on the event loop (see the module's notes on ``synchronous`` and
    large responses), except :meth:`purge_expired` and the completion of a large response.
    Safe across ``fork()``: connections are closed before a fork and reopened lazily. Needs
    SQLite 3.35 or newer.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        table: str = "retrysafe_records",
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ConfigError(
                "the sqlite ledger needs SQLite 3.35 or newer (RETURNING, UPSERT);"
                f" this Python's sqlite3 module has SQLite {sqlite3.sqlite_version}"
            )
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(
                f"sqlite synchronous must be OFF, NORMAL, FULL or EXTRA: {synchronous}"
            )
        if not table.isidentifier():
            raise ConfigError(f"sqlite table name must be an identifier: {table!r}")
        if not (math.isfinite(busy_timeout) and busy_timeout >= 0):
            raise ConfigError(
                f"sqlite busy_timeout must be a finite number of seconds >= 0: {busy_timeout}"
            )
        self.path = path
        self._file = path if path in {"", ":memory:"} else os.path.abspath(path)
        """The file every connection opens: resolved once, so a chdir() changes nothing."""
        self._file_id: tuple[int, int] | None = None
        self._file_checked = 0.0
        """When (monotonic) the file is next compared with ``_file_id``."""
        """(device, inode) of the file ``_conn`` opened: another one there means it moved."""
        self.busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._table = table
        self.create = create
        """Whether a missing ledger table is created on first use (else it is an error)."""
        self._clock = clock
        self._private = path in {"", ":memory:"}
        """Each connection to such a path is a database of its own."""
        self._lock = threading.Lock()
        self._purge_lock = threading.Lock()
        self._apart_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._queues: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        """Writes waiting for the next group commit, per event loop."""
        self._commits = self._grouped = 0
        """Group commits, and the writes they carried, since the last look at their sizes."""
        self._inline_writes = 0
        """How many more writes run inline before grouping is tried again."""
        t = f'"{table}"'  # quoted: a reserved word ("order") is a valid table name
        self._sql_get = f"SELECT {_COLUMNS} FROM {t} WHERE rid = ?"
        self._sql_claim = (
            f"INSERT INTO {t} (rid, token, state, fingerprint, lease_until, expires_at, response,"
            " scope, created_at) VALUES (?1, ?2, 0, ?3, ?4, ?5, NULL, ?6, ?7)"
            " ON CONFLICT (rid) DO UPDATE SET token = excluded.token, state = 0,"
            " fingerprint = excluded.fingerprint, lease_until = excluded.lease_until,"
            " expires_at = excluded.expires_at, response = NULL, scope = excluded.scope,"
            " created_at = excluded.created_at"
            " WHERE expires_at <= ?7 OR (state = 0 AND lease_until <= ?7) RETURNING token"
        )
        self._sql_renew = (
            # A COMMITTED record keeps the ttl the mark gave it past its lease (SET reads
            # the row's old values): its holder's death never lets it expire with the lease.
            f"UPDATE {t} SET lease_until = ?1, expires_at = MAX(expires_at,"
            " ?1 + CASE WHEN state = 3 THEN expires_at - lease_until ELSE 0 END)"
            " WHERE rid = ?2 AND token = ?3 AND state IN (0, 3)"
        )
        self._sql_complete = (
            f"UPDATE {t} SET state = ?, response = ?, lease_until = ?, expires_at = ?"
            " WHERE rid = ? AND token = ? AND state IN (0, 3)"
        )
        # A committed effect's record is never released (State.COMMITTED).
        self._sql_release = f"DELETE FROM {t} WHERE rid = ? AND token = ? AND state <> 3"
        # Run by the app, on its own connection and clock: (rid, token, ttl). The lease must
        # still run: a holder whose lease lapsed may be taken over at any moment.
        self._sql_mark = (
            f"UPDATE {t} SET state = 3, expires_at = MAX(expires_at, lease_until + ?3)"
            " WHERE rid = ?1 AND token = ?2 AND state IN (0, 3)"
            " AND lease_until > (julianday('now') - 2440587.5) * 86400.0"
        )
        self._sql_delete = f"DELETE FROM {t} WHERE rid = ?"
        self._sql_purge = (
            f"DELETE FROM {t} WHERE rid IN"
            f" (SELECT rid FROM {t} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
        )
        self._sql_scan = (
            f"SELECT rid, {_COLUMNS} FROM {t} WHERE rid > ? AND expires_at > ? ORDER BY rid LIMIT ?"
        )
        self._sql_stats = f"SELECT expires_at > ?, state, count(*) FROM {t} GROUP BY 1, 2"
        _stores.add(self)

    # -- connection -------------------------------------------------------------------------

    def _connect(self, busy_timeout: float = 0.0) -> sqlite3.Connection:
        conn = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if not self.create:
                self._check_table(conn)
            # Small pages for a new ledger (an existing file keeps its own): every write
            # copies whole pages into the WAL and back at the checkpoint, and a claim or a
            # completion touches a few scattered ones. 1 KiB pages cut that from ~23 KiB to
            # ~7 KiB per request, and the cost of a claim+complete by a third
            # (docs/benchmarks.md). Must come before WAL mode creates the file.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal" and not self._private:
                raise StoreUnavailable(
                    f"sqlite ledger {self.path}: cannot enter WAL mode (journal mode {mode})"
                )
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Checkpoints copy the WAL into the file and fsync: done inline they would stall
            # the event loop for milliseconds, so a background thread does them (below).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA journal_size_limit = 67108864")  # a reset WAL shrinks to 64 MiB
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path} has ledger schema {version};"
                    f" this retrysafe knows {SCHEMA_VERSION}"
                )
            t = self._table
            conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{t}" (rid BLOB PRIMARY KEY, token INTEGER NOT NULL,'
                " state INTEGER NOT NULL, fingerprint BLOB NOT NULL, lease_until REAL NOT NULL,"
                " expires_at REAL NOT NULL, response BLOB, scope BLOB NOT NULL DEFAULT x'',"
                " created_at REAL NOT NULL DEFAULT 0)"
            )
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{t}_expiry" ON "{t}" (expires_at)')
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_table(self, conn: sqlite3.Connection) -> None:
        """Refuse a file without the ledger's table before anything writes to it."""
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self._table,)
        ).fetchone()
        if found is None:
            option = "" if self._table == "retrysafe_records" else f"?table={self._table}"
            raise StoreUnavailable(
                f"sqlite ledger {self.path}: no ledger table {self._table!r} (not created"
                f" here: create it with `retrysafe store init sqlite:///{self.path}{option}`)"
            )

    def _connection(self) -> sqlite3.Connection:
        # Closed before every fork (_before_fork): each process opens its own, here.
        if self._file_id is not None and (now := time.monotonic()) >= self._file_checked:
            # The ledger file was deleted or replaced (rm, a restore) since it was opened:
            # writing on into the old one would keep a ledger no other process sees, and
            # every key claimed there would run again in the others. Looked at every
            # FILE_CHECK_INTERVAL, not at every operation (a stat is a system call).
            self._file_checked = now + FILE_CHECK_INTERVAL
            if self._file_id != self._stat():
                self._drop()
        if self._conn is None:
            self._conn = self._connect()
            if not self._private:
                self._file_id = self._stat()
                self._checkpointer = _Checkpointer(self._file, self)
        return self._conn

    def _stat(self) -> tuple[int, int] | None:
        """(device, inode) of the ledger file now; None if there is none."""
        try:
            st = os.stat(self._file)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _drop(self) -> None:
        """Close the connection, stop the checkpointer; the caller holds ``_lock``.

        The checkpointer is not joined: a checkpoint in progress would hold the event loop.
        It closes its connection as it ends; a fork waits for that (_before_fork).
        """
        checkpointer, self._checkpointer = self._checkpointer, None
        conn, self._conn = self._conn, None
        self._file_id = None
        if checkpointer is not None:
            checkpointer.stop()
        if conn is not None:
            conn.close()

    def _close(self) -> None:
        """Stop the checkpointer, close the connection; the caller holds ``_lock``."""
        checkpointer, self._checkpointer = self._checkpointer, None
        conn, self._conn = self._conn, None
        self._file_id = None
        if checkpointer is not None:
            checkpointer.stop()
            checkpointer.join()
        if conn is not None:
            conn.close()

    def _error(self, exc: BaseException, what: str = "") -> StoreUnavailable:
        """The error to raise for ``exc``: :class:`StoreBusy` if it was busy, else unavailable."""
        if _is_busy(exc):
            return StoreBusy(f"sqlite ledger {self.path} stayed busy{what}: {exc}")
        folder = os.path.dirname(self._file)
        if folder and not os.path.isdir(folder):
            # SQLite says only "unable to open database file"; it never makes directories.
            return StoreUnavailable(
                f"sqlite ledger {self.path}{what}: the directory {folder} does not exist"
            )
        return StoreUnavailable(f"sqlite ledger {self.path}{what}: {exc}")

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read inline, retrying a busy database with asynchronous backoff."""
        return await self._retrying(lambda: self._now(operation))

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run a write in the next group commit (or inline, while writes come one at a time),
        retrying a busy database with backoff."""
        if self._inline_writes > 0:
            self._inline_writes -= 1
            return await self._run(operation)
        return await self._retrying(lambda: self._enqueue(operation))

    async def _now(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return operation(self._connection())

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        deadline: float | None = None
        delay = 0.0005
        while True:
            try:
                return await attempt()
            except (sqlite3.Error, _Contended) as exc:
                if not _is_busy(exc):
                    raise self._error(exc) from exc
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.busy_timeout
                if now >= deadline:
                    raise self._error(exc) from exc
                await asyncio.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, 0.05)

    # -- group commit -----------------------------------------------------------------------
    #
    # Every write transaction pays for SQLite's locks and its commit record (a dozen system
    # calls, tens of microseconds), whatever it writes. Writes asked for during one turn of
    # the event loop are therefore queued and run together, each statement for itself, in
    # ONE transaction at the start of the next turn. An operation's own failure (a corrupt
    # row, a value that cannot be bound) is its own; a busy transaction is every queued
    # operation's, and each caller retries it as it would have alone. Any other failure of
    # the transaction (a disk too full for one large response) may be one write's own: the
    # group is rolled back and each of its writes made again alone, for its own outcome.
    #
    # Waiting for the next turn costs a write about 25 us, which only pays when writes
    # come several at a time. Every GROUP_SAMPLE commits, a store that has been committing
    # writes alone (fewer than GROUP_WORTHWHILE per commit) writes the next GROUP_PAUSE
    # inline, as it would have without grouping, then looks again.

    def _enqueue(self, operation: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = []
            loop.call_soon(self._commit, loop)
        queue.append((operation, future))
        return future

    def _commit(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = [job for job in self._queues.pop(loop, ()) if not job[1].cancelled()]
        if not queue:
            return  # all cancelled, or flushed by aclose(): nothing to open a connection for
        self._commits += 1
        self._grouped += len(queue)
        if self._commits >= GROUP_SAMPLE:
            if self._grouped < GROUP_WORTHWHILE * self._commits:
                self._inline_writes = GROUP_PAUSE
            self._commits = self._grouped = 0
        results: list[tuple[bool, Any]] = []
        try:
            with self._lock:
                conn = self._connection()
                if len(queue) == 1:  # alone: its statement is its own transaction
                    try:
                        results.append((True, queue[0][0](conn)))
                    except (CorruptRecord, _Contended) as exc:
                        results.append((False, exc))
                    queue = queue[:1]
                for start in range(0, len(queue) if len(queue) > 1 else 0, GROUP_COMMIT_MAX):
                    group = queue[start : start + GROUP_COMMIT_MAX]
                    conn.execute("BEGIN")
                    try:
                        for operation, _ in group:
                            try:
                                results.append((True, operation(conn)))
                            except (CorruptRecord, _Contended) as exc:
                                results.append((False, exc))
                            except sqlite3.Error:
                                raise  # busy, I/O, disk full: the transaction's failure
                            except Exception as exc:
                                # Raised in Python (a value that cannot be bound): the
                                # operation's own; the others' statements stand.
                                if not conn.in_transaction:
                                    raise
                                results.append((False, exc))
                        conn.execute("COMMIT")
                    except BaseException as exc:
                        del results[start:]  # first: none of them stands, even if ROLLBACK fails
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        if not isinstance(exc, sqlite3.Error) or _is_busy(exc):
                            raise  # busy: every caller retries, as it would alone
                        # Not busy (the disk too full for one large response, ...): perhaps
                        # one write's own failure. Each is made again alone, for its own outcome.
                        for operation, _ in group:
                            try:
                                results.append((True, operation(conn)))
                            except Exception as own:
                                results.append((False, own))
        except BaseException as exc:  # this group and every later one fail as a whole
            for _, future in queue[len(results) :]:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        for (ok, value), (_, future) in zip(results, queue, strict=False):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _record(row: Any) -> Record:
        state, token, fingerprint, lease_until, expires_at, response, scope, created_at = row
        # Each column must have the type this store writes: a converting decode would read an
        # INTEGER fingerprint as that many zero bytes (MemoryError, OverflowError: a 500).
        if (
            type(token) is not int
            or type(state) is not int
            or type(fingerprint) is not bytes
            or type(scope) is not bytes
            or (response is not None and type(response) is not bytes)
        ):
            raise CorruptRecord("undecodable ledger row: a column of the wrong type", token)
        try:
            return Record(
                State(state),
                token,
                fingerprint,
                float(lease_until),
                float(expires_at),
                response,
                scope,
                float(created_at),
            )
        except (ValueError, TypeError, OverflowError) as exc:
            raise CorruptRecord(f"undecodable ledger row: {exc}", token) from exc

    # -- primitives -------------------------------------------------------------------------

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
        expiry = max(ttl, lease)

        def live(row: Any, now: float) -> Record | None:
            """The record of ``row`` if it stands in the way of a claim at ``now``."""
            # Decoded before its times are compared: a damaged row is CorruptRecord, not 500.
            record = None if row is None else self._record(row)
            if (
                record is not None
                and record.expires_at > now
                and not (record.state is State.IN_FLIGHT and record.lease_until <= now)
            ):
                if record.state is State.COMMITTED and record.lease_until <= now:
                    # Its holder died after committing its effect: never run again.
                    return dataclasses.replace(record, state=State.NOT_REPLAYABLE)
                return record
            return None

        def op(conn: sqlite3.Connection) -> Record | None:
            # Alone, the read and the upsert are two transactions and a release may slip in
            # between (hence the rounds); in a group commit they share one.
            for _ in range(8):
                now = self._clock()
                record = live(conn.execute(self._sql_get, (rid,)).fetchone(), now)
                if record is not None:
                    return record  # a replay or an in-flight duplicate: nothing written
                taken = conn.execute(
                    self._sql_claim,
                    (rid, token, fingerprint, now + lease, now + expiry, scope, now),
                ).fetchall()
                if taken:
                    return None
            # Eight rounds of claim races lost to release races: report it as busy.
            raise _Contended("claim kept racing")

        return await self._write(op)

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        return await self._write(
            lambda conn: (
                conn.execute(self._sql_renew, (self._clock() + lease, rid, token)).rowcount == 1
            )
        )

    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            args = (int(state), response, now, now + ttl, rid, token)
            return conn.execute(self._sql_complete, args).rowcount == 1

        if response is not None and len(response) > LARGE_WRITE and not self._private:
            return await asyncio.to_thread(self._apart, op, " (writing a large response)")
        return await self._write(op)

    async def release(self, rid: bytes, token: int) -> bool:
        return await self._write(
            lambda conn: conn.execute(self._sql_release, (rid, token)).rowcount == 1
        )

    dbapi_paramstyle = "qmark"

    def mark_statement(self, paramstyle: str) -> str:
        if paramstyle != "qmark":
            raise ConfigError(f"an sqlite ledger takes qmark parameters, not {paramstyle!r}")
        return self._sql_mark

    async def get(self, rid: bytes) -> Record | None:
        def op(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute(self._sql_get, (rid,)).fetchone()
            record = None if row is None else self._record(row)
            if record is None or record.expires_at <= self._clock():
                return None
            return record

        return await self._run(op)

    async def delete(self, rid: bytes) -> bool:
        return await self._write(lambda conn: conn.execute(self._sql_delete, (rid,)).rowcount == 1)

    async def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records, from a worker thread; return the count.

        Large responses make deletion slow (about 2 ms per MiB), so it never runs on the
        event loop: a thread of its own opens a short-lived connection and deletes at most
        :data:`PURGE_BATCH` rows per statement, letting writers in between. A fork stops it
        early (at the count deleted so far).
        """
        if limit <= 0:
            return 0
        if self._private:  # a private database is only reachable through self._conn
            return await self._run(
                lambda conn: conn.execute(self._sql_purge, (self._clock(), limit)).rowcount
            )
        return await asyncio.to_thread(self._purge, limit)

    def _apart(self, operation: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``operation`` in this worker thread, on a short-lived connection of its own.

        Copying MiBs into the file takes milliseconds: done inline it would hold the event
        loop (and, through ``_lock``, every other statement) that long. Here SQLite's own busy
        handler waits for the write lock, up to ``busy_timeout``; a fork waits for it to end.
        """
        with self._apart_lock:  # _before_fork waits for this connection to be closed
            try:
                conn = self._connect(busy_timeout=self.busy_timeout)
                try:
                    return operation(conn)
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc

    def _purge(self, limit: int) -> int:
        deleted = 0
        with self._purge_lock:  # _before_fork waits for this connection to be closed
            try:
                conn = self._connect(busy_timeout=self.busy_timeout)
                try:
                    conn.execute("PRAGMA wal_autocheckpoint = 1000")  # off the loop: allowed
                    while deleted < limit and not _forking:
                        batch = min(PURGE_BATCH, limit - deleted)
                        n = conn.execute(self._sql_purge, (self._clock(), batch)).rowcount
                        deleted += n
                        if n < batch:
                            break  # none left
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                raise self._error(exc, " (purge)") from exc
        return deleted

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        after = cursor_after(cursor)

        def op(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(self._sql_scan, (after, self._clock(), limit + 1)).fetchall()

        rows = await self._run(op)
        page: list[tuple[bytes, Record]] = []
        for row in rows[:limit]:
            try:
                page.append((bytes(row[0]), self._record(row[1:])))
            except CorruptRecord:
                continue  # the request path drops it when the key comes back
        return page, (bytes(rows[limit - 1][0]).hex() if len(rows) > limit else None)

    async def stats(self) -> StoreStats:
        def op(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(self._sql_stats, (self._clock(),)).fetchall()

        return StoreStats.tally(await self._run(op))

    async def initialize(self) -> None:
        """Create the ledger file and its table now, if missing (``retrysafe store init``)."""
        create, self.create = self.create, True
        try:
            await self._run(lambda conn: None)
        finally:
            self.create = create

    async def aclose(self) -> None:
        # Writes queued on this loop are committed first: run later, they would open the
        # connection (and a checkpointer thread) again, on a store said to be closed.
        loop = asyncio.get_running_loop()
        if loop in self._queues:
            self._commit(loop)
        with self._lock:
            self._drop()


class _Checkpointer(threading.Thread):
    """Keeps the WAL short from a daemon thread, so that no checkpoint runs on the event loop.

    PASSIVE checkpoints never block the writers. If steady writing keeps them from ever
    catching up, the WAL would only grow; past ``RESTART_FRAMES`` a RESTART checkpoint makes
    writers wait (asynchronously, as for any busy moment) while the log is brought back to
    the start. It ends when stopped or when its store is garbage-collected unclosed.

    A RESTART holds the writers back while it waits for the readers, and a reader that keeps
    an old snapshot (a long query of the app's on the same file, a backup) pins the log: no
    RESTART can succeed until it ends. So a RESTART waits at most ``RESTART_WAIT``, and one
    that failed is tried again later and later (up to ``RESTART_BACKOFF`` apart), rather than
    every interval: that stalled every write of every process for a second at a time.
    """

    INTERVAL = 0.05
    RESTART_FRAMES = 4096
    RESTART_WAIT = 0.1
    RESTART_BACKOFF = 1.0, 16.0
    """Seconds before the next RESTART after a failed one: the first, and the most."""

    def __init__(self, path: str, owner: SQLiteStore) -> None:
        super().__init__(name="retrysafe-sqlite-checkpoint", daemon=True)
        self._path = path
        self._owner = weakref.ref(owner)
        self._stopping = threading.Event()
        self.start()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            # Only a RESTART waits (PASSIVE never calls the busy handler).
            conn.execute(f"PRAGMA busy_timeout = {int(self.RESTART_WAIT * 1000)}")
            frames, backoff, next_restart = 0, 0.0, 0.0
            while not self._stopping.wait(self.INTERVAL) and self._owner() is not None:
                restart = frames > self.RESTART_FRAMES and time.monotonic() >= next_restart
                try:
                    row = conn.execute(
                        f"PRAGMA wal_checkpoint({'RESTART' if restart else 'PASSIVE'})"
                    ).fetchone()
                    busy, log = row[0], row[1]
                except sqlite3.Error:
                    busy, log = 1, frames  # busy or transient: try again later
                if restart and busy:
                    first, most = self.RESTART_BACKOFF
                    backoff = min(max(backoff * 2, first), most)
                    next_restart = time.monotonic() + backoff
                elif restart:
                    backoff = 0.0
                frames = 0 if restart and not busy else log
        except sqlite3.Error:
            pass
        finally:
            conn.close()
