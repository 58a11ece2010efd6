"""``sqlite:///file.db``: the embedded default ledger, one file shared by a host's workers.

WAL mode lets readers (replays) run beside a writer. Statements run inline: a claim costs tens
of microseconds, far less than a hop to a thread. SQLite's own busy handler would stall the
event loop, so it is off; a busy database is retried here with asynchronous backoff, and past
the time budget it becomes :class:`StoreUnavailable` (a 503), never "database is locked" as a 500.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError, CorruptRecord, StoreUnavailable
from ..records import Record, State
from .base import Store, StoreStats

__all__ = ["SQLiteStore"]

T = TypeVar("T")
SCHEMA_VERSION = 1
_COLUMNS = "state, token, fingerprint, lease_until, expires_at, response, scope, created_at"


_forks = 0
"""How many forks this process descends from: a connection opened before a fork is not reused."""


def _after_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork)


class SQLiteStore(Store):
    """A ledger in one SQLite file. Safe for many processes on one host; not for network disks."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        table: str = "retrysafe_records",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(
                f"sqlite synchronous must be OFF, NORMAL, FULL or EXTRA: {synchronous}"
            )
        if not table.isidentifier():
            raise ConfigError(f"sqlite table name must be an identifier: {table!r}")
        if busy_timeout < 0:
            raise ConfigError("sqlite busy_timeout must be >= 0")
        self.path = path
        self.busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._table = table
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._generation = -1
        t = table
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
            f"UPDATE {t} SET lease_until = ?1, expires_at = MAX(expires_at, ?1)"
            " WHERE rid = ?2 AND token = ?3 AND state = 0"
        )
        self._sql_complete = (
            f"UPDATE {t} SET state = ?, response = ?, lease_until = ?, expires_at = ?"
            " WHERE rid = ? AND token = ? AND state = 0"
        )
        self._sql_release = f"DELETE FROM {t} WHERE rid = ? AND token = ?"
        self._sql_delete = f"DELETE FROM {t} WHERE rid = ?"
        self._sql_purge = (
            f"DELETE FROM {t} WHERE rid IN"
            f" (SELECT rid FROM {t} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
        )

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal" and self.path != ":memory:":
                raise sqlite3.OperationalError("database is locked (cannot enter WAL mode)")
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
                f"CREATE TABLE IF NOT EXISTS {t} (rid BLOB PRIMARY KEY, token INTEGER NOT NULL,"
                " state INTEGER NOT NULL, fingerprint BLOB NOT NULL, lease_until REAL NOT NULL,"
                " expires_at REAL NOT NULL, response BLOB, scope BLOB NOT NULL DEFAULT x'',"
                " created_at REAL NOT NULL DEFAULT 0)"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_expiry ON {t} (expires_at)")
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: worker processes each open their own.
        if self._conn is None or self._generation != _forks:
            self._conn = self._connect()
            self._generation = _forks
            if self.path != ":memory:":
                self._checkpointer = _Checkpointer(self.path)
        return self._conn

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        deadline: float | None = None
        delay = 0.0005
        while True:
            try:
                with self._lock:
                    return operation(self._connection())
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy:
                    raise StoreUnavailable(f"sqlite ledger {self.path}: {exc}") from exc
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.busy_timeout
                if now >= deadline:
                    raise StoreUnavailable(f"sqlite ledger {self.path} stayed busy") from exc
                await asyncio.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, 0.05)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite ledger {self.path}: {exc}") from exc

    @staticmethod
    def _record(row: Any) -> Record:
        state, token, fingerprint, lease_until, expires_at, response, scope, created_at = row
        try:
            return Record(
                State(state),
                token,
                bytes(fingerprint),
                float(lease_until),
                float(expires_at),
                None if response is None else bytes(response),
                bytes(scope),
                float(created_at),
            )
        except (ValueError, TypeError) as exc:
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

        def op(conn: sqlite3.Connection) -> Record | None:
            for _ in range(8):
                now = self._clock()
                # Read first: replays and in-flight duplicates then need no write lock at all.
                row = conn.execute(self._sql_get, (rid,)).fetchone()
                # Decoded before its times are compared: a damaged row is CorruptRecord, not 500.
                record = None if row is None else self._record(row)
                if (
                    record is not None
                    and record.expires_at > now
                    and not (record.state is State.IN_FLIGHT and record.lease_until <= now)
                ):
                    return record
                taken = conn.execute(
                    self._sql_claim,
                    (rid, token, fingerprint, now + lease, now + expiry, scope, now),
                ).fetchall()
                if taken:
                    return None
            # Eight rounds of claim races lost to release races: report it as busy.
            raise sqlite3.OperationalError("database is busy (claim kept racing)")

        return await self._run(op)

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        return await self._run(
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

        return await self._run(op)

    async def release(self, rid: bytes, token: int) -> bool:
        return await self._run(
            lambda conn: conn.execute(self._sql_release, (rid, token)).rowcount == 1
        )

    async def get(self, rid: bytes) -> Record | None:
        def op(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute(self._sql_get, (rid,)).fetchone()
            record = None if row is None else self._record(row)
            if record is None or record.expires_at <= self._clock():
                return None
            return record

        return await self._run(op)

    async def delete(self, rid: bytes) -> bool:
        return await self._run(lambda conn: conn.execute(self._sql_delete, (rid,)).rowcount == 1)

    async def purge_expired(self, limit: int = 1000) -> int:
        return await self._run(
            lambda conn: conn.execute(self._sql_purge, (self._clock(), limit)).rowcount
        )

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        after = bytes.fromhex(cursor) if cursor else b""

        def op(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                f"SELECT rid, {_COLUMNS} FROM {self._table} WHERE rid > ? AND expires_at > ?"
                " ORDER BY rid LIMIT ?",
                (after, self._clock(), limit + 1),
            ).fetchall()

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
            return conn.execute(
                f"SELECT expires_at > ?, state, count(*) FROM {self._table} GROUP BY 1, 2",
                (self._clock(),),
            ).fetchall()

        counts = {State.IN_FLIGHT: 0, State.DONE: 0, State.NOT_REPLAYABLE: 0}
        expired = 0
        for live, state, n in await self._run(op):
            if not live:
                expired += n
            elif state in counts:
                counts[State(state)] += n
        return StoreStats(
            in_flight=counts[State.IN_FLIGHT],
            done=counts[State.DONE],
            not_replayable=counts[State.NOT_REPLAYABLE],
            expired=expired,
        )

    async def aclose(self) -> None:
        with self._lock:
            if self._conn is not None and self._generation == _forks:
                if self._checkpointer is not None:
                    self._checkpointer.stop()
                self._conn.close()
            self._conn = None
            self._checkpointer = None


class _Checkpointer(threading.Thread):
    """Keeps the WAL short from a daemon thread, so that no checkpoint runs on the event loop.

    PASSIVE checkpoints never block the writers. If steady writing keeps them from ever
    catching up, the WAL would only grow; past ``RESTART_FRAMES`` a RESTART checkpoint makes
    writers wait (asynchronously, as for any busy moment) while the log is brought back to
    the start.
    """

    INTERVAL = 0.05
    RESTART_FRAMES = 4096

    def __init__(self, path: str) -> None:
        super().__init__(name="retrysafe-sqlite-checkpoint", daemon=True)
        self._path = path
        self._stopping = threading.Event()
        self.start()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        with conn:
            conn.execute("PRAGMA busy_timeout = 1000")
            frames = 0
            while not self._stopping.wait(self.INTERVAL):
                mode = "RESTART" if frames > self.RESTART_FRAMES else "PASSIVE"
                try:
                    busy, log, _ = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                except sqlite3.Error:
                    continue  # busy or transient: try again at the next interval
                frames = 0 if mode == "RESTART" and not busy else log
        conn.close()
