"""The store interface: the few primitives the engine needs from a ledger.

Every primitive is one atomic operation in the store. Policy (what to store, when to replay,
what a conflict means) lives in the engine, never here. Times are judged by the store's clock.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from ..errors import ConfigError
from ..records import Record, State

__all__ = ["Store", "StoreStats"]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """How many records a store holds, by state; ``expired`` are awaiting a purge."""

    in_flight: int = 0
    done: int = 0
    not_replayable: int = 0
    expired: int = 0
    committed: int = 0
    """In flight with their effect committed (:attr:`State.COMMITTED`)."""

    @classmethod
    def tally(cls, rows: Iterable[Sequence[Any]]) -> StoreStats:
        """Sum ``(live, state, count)`` rows (a SQL ``GROUP BY``); unknown states are skipped."""
        counts = dict.fromkeys(State, 0)
        expired = 0
        for live, state, n in rows:
            if not live:
                expired += n
            elif state in counts:
                counts[State(state)] += n
        return cls(
            counts[State.IN_FLIGHT],
            counts[State.DONE],
            counts[State.NOT_REPLAYABLE],
            expired,
            counts[State.COMMITTED],
        )


class Store(abc.ABC):
    """A ledger of idempotency records, keyed by an opaque record id (a hash)."""

    dbapi_paramstyle: str | None = None
    """The parameter style of :meth:`mark_statement` for the app's DB-API connections; None
    for a ledger that cannot take part in the app's transaction."""
    poll_interval: float = 0.05
    """How often :meth:`wait` looks again, for stores that cannot notify."""
    create: bool = True
    """Whether first use may create what the ledger needs (its table); false: a missing
    table is an error. Stores without a schema ignore it."""

    @abc.abstractmethod
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
        """Claim ``rid`` for the caller, atomically; return None when the claim is taken.

        The claim is taken when there is no record, when the record has expired, or when it is
        in flight and its lease ran out (its holder is presumed dead). Otherwise nothing is
        written and the existing record is returned; a :attr:`State.COMMITTED` record whose
        lease ran out is never taken over: it is returned as NOT_REPLAYABLE. A claimed record
        expires no sooner than its lease ends: ``expires_at = now + max(ttl, lease)``.
        ``scope`` (a short hash) and the claim time are kept in the record for operators.
        """

    @abc.abstractmethod
    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        """Extend the lease of the in-flight claim ``token``; False if it is no longer held.

        ``expires_at`` is pushed to the new lease end if it was earlier, so that a record never
        expires under a live holder (a handler that runs longer than ``ttl``).
        """

    @abc.abstractmethod
    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        """Turn the in-flight (or committed) claim ``token`` into a final record; False if it is
        not held."""

    @abc.abstractmethod
    async def release(self, rid: bytes, token: int) -> bool:
        """Delete the record written by ``token``; False if another wrote it since, or if it is
        :attr:`State.COMMITTED` (an effect committed with it: the key is never released)."""

    @abc.abstractmethod
    async def get(self, rid: bytes) -> Record | None:
        """Return the live record of ``rid``; None when absent or expired."""

    @abc.abstractmethod
    async def delete(self, rid: bytes) -> bool:
        """Delete ``rid`` whatever its state (an operator's tool); False if it was absent."""

    @abc.abstractmethod
    async def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records; return how many were deleted."""

    @abc.abstractmethod
    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        """Return a page of live records and the cursor of the next page (None: no more).

        Pass the returned cursor back to continue; the order is the store's own. A cursor this
        store did not return is a ValueError. For operators' tools, not for the request path.
        """

    @abc.abstractmethod
    async def stats(self) -> StoreStats:
        """Count the records by state (a full scan on some stores: operators only)."""

    def mark_statement(self, paramstyle: str) -> str:
        """The SQL that turns the in-flight claim into :attr:`State.COMMITTED`, for the app to
        run in its own transaction with parameters (record id, token, ttl); one row changed
        means the claim was held, with its lease running. The record is then kept at least
        ``ttl`` past its lease, renewals included. ``paramstyle``: ``"qmark"`` (``?``),
        ``"format"`` (``%s``) or ``"numeric_dollar"`` (``$1``). Only a ledger in the app's own
        database can do this.
        """
        raise ConfigError(
            f"a {type(self).__name__} cannot take part in the app's transaction: keep the"
            " ledger in the app's own database (sqlite:/// or postgresql://) to mark effects"
        )

    async def wait(self, rid: bytes, timeout: float) -> None:  # noqa: ASYNC109
        """Return when ``rid`` may have changed, or after ``timeout`` seconds at most.

        The default polls; stores that can be notified override it.
        """
        await asyncio.sleep(min(timeout, self.poll_interval))

    async def initialize(self) -> None:  # noqa: B027 - most stores create what they need lazily
        """Create what the ledger needs (tables, schema) now, if missing; idempotent.

        Stores create it on first use anyway; this is for ``retrysafe store init``, run once
        by someone allowed to, where the application's own account may not create tables.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections and files."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def cursor_after(cursor: str | None) -> bytes:
    """The record id a keyset cursor (the hex of the last id returned) continues after."""
    if not cursor:
        return b""
    try:
        return bytes.fromhex(cursor)
    except ValueError:
        raise ValueError(f"not a cursor of this store: {cursor!r}") from None
