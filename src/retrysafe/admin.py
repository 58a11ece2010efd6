"""Operators' tools over any ledger: list, show, delete and purge records; count them.

The work behind ``retrysafe keys ...``, ``retrysafe stats`` and ``retrysafe store init``;
:mod:`retrysafe.cli` only parses arguments and prints. Nothing here is on the request path:
listing and counting scan the whole ledger on some stores.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import record_id
from .fingerprint import RequestView
from .records import Record, State, StoredResponse
from .scope import credentials_scope
from .stores import Store

__all__ = [
    "Listing",
    "find_records",
    "format_duration",
    "list_records",
    "parse_age",
    "purge",
    "record_as_dict",
    "record_table",
    "scope_of",
]

STATE_NAMES = {
    State.IN_FLIGHT: "in-flight",
    State.DONE: "done",
    State.NOT_REPLAYABLE: "not-replayable",
    State.COMMITTED: "committed",
}
STATES_BY_NAME = {name: state for state, name in STATE_NAMES.items()}
_HELD = (State.IN_FLIGHT, State.COMMITTED)
"""The states of a record whose claim is still held, by a lease."""


def seen_state(record: Record, now: float) -> State:
    """The state requests see: an effect committed by a holder that died (its lease ran
    out) is not replayable, never a stuck key to clear."""
    if record.state is State.COMMITTED and record.lease_until <= now:
        return State.NOT_REPLAYABLE
    return record.state


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h`` or ``7d``; ValueError otherwise."""
    match = _AGE.match(text.lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write 90s, 15m, 2h or 7d)")
    return float(match[1]) * _UNITS[match[2]]


def format_duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``3m12s``, ``5h02m``, ``2d03h``; negatives are ``-``."""
    if seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def scope_of(
    *,
    scope: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    scope_headers: Iterable[str] = (),
    scope_cookies: Iterable[str] = (),
) -> str | bytes | int | None:
    """The scope a request would get: ``scope`` as a custom scope function returned it, or
    the default credentials scope of ``headers`` (Authorization, plus the app's
    ``scope_headers`` and ``scope_cookies``, as configured in the app)."""
    if scope is not None:
        return scope
    view = RequestView(
        "POST",
        "/",
        b"",
        # The bytes typed, as a client sends them (argv's undecodable bytes come back as-is).
        [(_wire(name.lower()), _wire(value)) for name, value in headers],
        b"",
    )
    function = credentials_scope(("authorization", *scope_headers), scope_cookies)
    return function(view)


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def record_id_of(namespace: str, scope: str | bytes | int | None, key: str) -> bytes:
    """The id of ``key``'s record in ``scope`` (see :func:`retrysafe.engine.record_id`)."""
    return record_id(namespace.encode(), scope, key)[0]


@dataclass(frozen=True, slots=True)
class Listing:
    records: list[tuple[bytes, Record]]
    cursor: str | None
    """Where the next page starts; None when the ledger has been read to the end."""


async def list_records(
    store: Store,
    *,
    limit: int = 50,
    cursor: str | None = None,
    scope_tag: bytes | None = None,
    state: State | None = None,
    older_than: float | None = None,
    newer_than: float | None = None,
    now: float | None = None,
) -> Listing:
    """Live records matching every filter given, a page at a time.

    Whole pages of ``limit`` records are read until ``limit`` records matched or the ledger
    ends, and kept whole: with filters, or on a store that pages loosely (Redis's SCAN), a
    listing may hold more than ``limit``. Ages are measured from the claim that wrote it.
    """
    now = time.time() if now is None else now
    found: list[tuple[bytes, Record]] = []
    while True:
        # Whole pages of ``limit``: asking only for the few still missing would read a
        # filtered Redis ledger a record at a time. The pages are kept whole (the cursor
        # continues after them), so a filtered listing may hold up to ``limit - 1`` more.
        page, cursor = await store.scan(cursor, limit)
        for rid, record in page:
            age = now - record.created_at
            if (
                (scope_tag is None or record.scope.startswith(scope_tag))
                and (state is None or seen_state(record, now) is state)
                and (older_than is None or age >= older_than)
                and (newer_than is None or age <= newer_than)
            ):
                found.append((rid, record))
        if cursor is None or len(found) >= limit:
            return Listing(found, cursor)


async def find_records(store: Store, prefix: bytes) -> list[tuple[bytes, Record]]:
    """Every live record whose id starts with ``prefix`` (logs show the first 6 bytes)."""
    if len(prefix) == 32:
        record = await store.get(prefix)
        return [] if record is None else [(prefix, record)]
    matches: list[tuple[bytes, Record]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.scan(cursor, 500)
        matches += [(rid, record) for rid, record in page if rid.startswith(prefix)]
        if cursor is None:
            return matches


async def purge(store: Store, limit: int | None = None, batch: int = 1000) -> int:
    """Delete expired records, at most ``limit`` (all of them if None); return the count."""
    total = 0
    while limit is None or total < limit:
        want = batch if limit is None else min(batch, limit - total)
        deleted = await store.purge_expired(want)
        total += deleted
        if deleted < want:
            break
    return total


def _response(record: Record) -> StoredResponse | None:
    if record.response is None:
        return None
    try:
        return StoredResponse.decode(record.response)
    except ValueError:
        return None


def record_as_dict(
    rid: bytes, record: Record, now: float, *, detail: bool = False
) -> dict[str, Any]:
    """A record as JSON-ready data; ``detail`` adds the stored response's headers and body."""
    response = _response(record)
    data: dict[str, Any] = {
        "id": rid.hex(),
        "scope": record.scope.hex(),
        "state": STATE_NAMES[seen_state(record, now)],
        "token": record.token,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "lease_until": record.lease_until if seen_state(record, now) in _HELD else None,
        "age": round(now - record.created_at, 3),
        "status": None if response is None else response.status,
        "body_bytes": None if response is None else len(response.body),
    }
    if record.response is not None and response is None:
        data["damaged"] = True
    if detail and response is not None:
        data["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers]
        data["body_base64"] = base64.b64encode(response.body).decode("ascii")
    return data


def record_table(rows: Sequence[tuple[bytes, Record]], now: float) -> str:
    """Records as an aligned text table, one line each."""
    header = ("ID", "SCOPE", "STATE", "STATUS", "AGE", "EXPIRES IN", "LEASE LEFT")
    lines: list[tuple[str, ...]] = [header]
    for rid, record in rows:
        response = _response(record)
        status = "-" if response is None else str(response.status)
        if record.response is not None and response is None:
            status = "damaged"
        lease = "-"
        if seen_state(record, now) in _HELD:
            # A lease run out marks a stuck key (its process died): say so, not "-".
            left = record.lease_until - now
            lease = format_duration(left) if left >= 0 else "expired"
        lines.append(
            (
                rid.hex(),
                record.scope.hex() or "-",
                STATE_NAMES[seen_state(record, now)],
                status,
                format_duration(now - record.created_at),
                format_duration(record.expires_at - now),
                lease,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
