"""The key journal: a local SQLite file mapping an operation's name to its idempotency key, so
that running an operation again, even after the client process crashed, sends the same key.

The key is committed (and synced) before the first attempt leaves. A missing directory of the
file is created (the last one with mode 0700, any above it as ``mkdir -p`` would). The file is
safe to share between processes and threads: every call opens its own connection (so forks
need no care), in WAL mode, and the mint-or-read is one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, RetrysafeError
from .policy import new_key

__all__ = ["DEFAULT_RETENTION", "JournalError", "KeyJournal"]

DEFAULT_RETENTION = 86400.0
"""How long an operation keeps its key: the server's default retention (24 h)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retrysafe_operations (
    operation  TEXT PRIMARY KEY,
    key        TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retrysafe_operations_expiry ON retrysafe_operations (expires_at);
"""


class JournalError(RetrysafeError):
    """The journal file could not be read or written; the ``sqlite3`` error is the cause.

    The call is not sent: a key that was not recorded would not survive a crash.
    """


class KeyJournal:
    """Operation name -> idempotency key, kept in a SQLite file for ``retention`` seconds.

    ``journal.key_for("order-42/charge")`` returns the operation's key, minting and committing
    it on first use; every later call (from any process on this host) returns the same key
    until it expires, so the server replays the first outcome instead of executing again.

    ``synchronous="FULL"`` (the default) syncs the WAL at each commit, so a recorded key also
    survives a power loss or a kernel crash; one sync per *operation* (not per request) costs
    little next to a network call. ``"NORMAL"`` survives a crash of the process only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: float = DEFAULT_RETENTION,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 5.0,
        key_factory: Callable[[], str] = new_key,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not retention > 0:
            raise ConfigError("retention must be a positive number of seconds")
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = Path(path)
        self.retention = float(retention)
        self.synchronous = synchronous
        self.busy_timeout = float(busy_timeout)
        self.key_factory = key_factory
        self.clock = clock
        self._ready = False

    def __repr__(self) -> str:
        return f"KeyJournal({str(self.path)!r}, retention={self.retention:g})"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            try:
                # A missing directory is created, private to the user: the file holds keys.
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # So is a new file (SQLite gives its -wal and -shm files the same mode).
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise JournalError(f"key journal {self.path}: {exc}") from exc
        try:
            with closing(
                sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            ) as db:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                if not self._ready:
                    self._prepare(db)
                yield db
        except sqlite3.Error as exc:
            raise JournalError(f"key journal {self.path}: {exc}") from exc

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Enter WAL mode and create the table, once per instance.

        Switching to WAL needs the file to itself, and SQLite answers "database is locked" at
        once, without its busy handler, when other connections open it at the same moment (the
        first uses of a new journal by several processes): that is retried here, up to
        ``busy_timeout``.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
        self._ready = True

    def key_for(self, operation: str) -> str:
        """The key of ``operation``: the recorded one while it lives, else a new one, recorded
        (committed and synced) before this returns."""
        _check(operation)
        now = self.clock()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # one writer: concurrent first uses agree on a key
            try:
                row = db.execute(
                    "SELECT key FROM retrysafe_operations WHERE operation = ? AND expires_at > ?",
                    (operation, now),
                ).fetchone()
                if row is not None:
                    db.execute("COMMIT")
                    key: str = row[0]
                    return key
                key = self.key_factory()
                db.execute("DELETE FROM retrysafe_operations WHERE expires_at <= ?", (now,))
                db.execute(
                    "INSERT OR REPLACE INTO retrysafe_operations VALUES (?, ?, ?, ?)",
                    (operation, key, now, now + self.retention),
                )
                db.execute("COMMIT")
                return key
            except BaseException:
                with suppress(sqlite3.Error):  # the transaction may be gone already
                    db.execute("ROLLBACK")
                raise

    def get(self, operation: str) -> str | None:
        """The live key of ``operation``, or None (nothing is written)."""
        _check(operation)
        with self._connect() as db:
            row = db.execute(
                "SELECT key FROM retrysafe_operations WHERE operation = ? AND expires_at > ?",
                (operation, self.clock()),
            ).fetchone()
        return None if row is None else str(row[0])

    def forget(self, operation: str) -> bool:
        """Drop ``operation``'s key: its next run is a new operation. True if there was one."""
        _check(operation)
        with self._connect() as db:
            cursor = db.execute(
                "DELETE FROM retrysafe_operations WHERE operation = ?", (operation,)
            )
        return cursor.rowcount > 0

    def purge(self) -> int:
        """Delete the expired entries now; return how many (``key_for`` also purges)."""
        with self._connect() as db:
            cursor = db.execute(
                "DELETE FROM retrysafe_operations WHERE expires_at <= ?", (self.clock(),)
            )
        return cursor.rowcount


def _check(operation: str) -> None:
    if not isinstance(operation, str) or not operation:
        raise ConfigError("an operation is named by a non-empty string")
