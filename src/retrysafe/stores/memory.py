"""``memory://``: a ledger in one process's memory, for tests and experiments."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from ..records import Record, State
from .base import Store, StoreStats, cursor_after

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Records in a dict. Not shared between processes; lost on exit."""

    poll_interval = 0.01

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._records: dict[bytes, Record] = {}
        self._lock = threading.Lock()  # a sync face may call from several threads
        self._clock = clock

    def _live(self, rid: bytes, now: float) -> Record | None:
        record = self._records.get(rid)
        if record is not None and record.expires_at <= now:
            del self._records[rid]
            return None
        return record

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
        with self._lock:
            now = self._clock()
            record = self._live(rid, now)
            if record is not None and not (
                record.state is State.IN_FLIGHT and record.lease_until <= now
            ):
                return record
            self._records[rid] = Record(
                State.IN_FLIGHT, token, fingerprint, now + lease, now + max(ttl, lease),
                None, scope, now,
            )  # fmt: skip
            return None

    def _held(self, rid: bytes, token: int) -> Record | None:
        record = self._records.get(rid)
        if record is None or record.token != token or record.state is not State.IN_FLIGHT:
            return None
        return record

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        with self._lock:
            record = self._held(rid, token)
            if record is None:
                return False
            until = self._clock() + lease
            self._records[rid] = replace(
                record, lease_until=until, expires_at=max(record.expires_at, until)
            )
            return True

    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        with self._lock:
            record = self._held(rid, token)
            if record is None:
                return False
            now = self._clock()
            self._records[rid] = Record(
                state, token, record.fingerprint, now, now + ttl, response, record.scope,
                record.created_at,
            )  # fmt: skip
            return True

    async def release(self, rid: bytes, token: int) -> bool:
        with self._lock:
            record = self._records.get(rid)
            if record is None or record.token != token:
                return False
            del self._records[rid]
            return True

    async def get(self, rid: bytes) -> Record | None:
        with self._lock:
            return self._live(rid, self._clock())

    async def delete(self, rid: bytes) -> bool:
        with self._lock:
            return self._records.pop(rid, None) is not None

    async def purge_expired(self, limit: int = 1000) -> int:
        with self._lock:
            now = self._clock()
            expired = [rid for rid, r in self._records.items() if r.expires_at <= now][:limit]
            for rid in expired:
                del self._records[rid]
            return len(expired)

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        with self._lock:
            now = self._clock()
            after = cursor_after(cursor)
            live = sorted(
                (rid, r) for rid, r in self._records.items() if rid > after and r.expires_at > now
            )
        page = live[:limit]
        return page, (page[-1][0].hex() if len(live) > limit else None)

    async def stats(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            states = Counter(
                r.state if r.expires_at > now else None for r in self._records.values()
            )
        return StoreStats(
            in_flight=states[State.IN_FLIGHT],
            done=states[State.DONE],
            not_replayable=states[State.NOT_REPLAYABLE],
            expired=states[None],
        )
