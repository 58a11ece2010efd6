"""What the ledger holds: records, their states, and the stored response's byte format."""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = ["Record", "State", "StoredResponse"]


class State(enum.IntEnum):
    """The life of a record: claimed, then done (replayable or not). Released records are gone."""

    IN_FLIGHT = 0
    DONE = 1
    NOT_REPLAYABLE = 2
    """Executed, but the response could not be kept (too large, or not whole): retries are
    refused, never re-run."""
    COMMITTED = 3
    """In flight, and the handler has committed its effect together with this mark, in one
    transaction of the ledger's own database (:meth:`retrysafe.Claim.mark`): the lease is
    still renewed and the response still recorded, but the key is never taken over or
    released. If its holder dies, retries are refused (as not replayable), never re-run."""


@dataclass(frozen=True, slots=True)
class Record:
    """One entry of the ledger, as a store returns it. Times are the store's clock, in seconds."""

    state: State
    token: int
    """The fencing token of the claim that wrote this record."""
    fingerprint: bytes
    lease_until: float
    expires_at: float
    response: bytes | None = None
    """The encoded :class:`StoredResponse` of a DONE record."""
    scope: bytes = b""
    """A short hash of the caller's scope (never the credentials): lets operators filter."""
    created_at: float = 0.0
    """When the claim that wrote this record was taken."""


_MAGIC = b"RS1"
_HEAD = struct.Struct(">3sIHH")  # magic, crc32 of the rest, status, number of headers
_NAME = struct.Struct(">H")
_VALUE = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as replayed: status, headers in order (repeats kept), body byte for byte."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def encode(self) -> bytes:
        parts: list[bytes] = []
        for name, value in self.headers:
            parts += (_NAME.pack(len(name)), name, _VALUE.pack(len(value)), value)
        parts.append(self.body)
        rest = struct.pack(">HH", self.status, len(self.headers)) + b"".join(parts)
        return _MAGIC + struct.pack(">I", zlib.crc32(rest)) + rest

    @classmethod
    def decode(cls, data: bytes) -> StoredResponse:
        """Decode :meth:`encode`'s output; raise ValueError for anything else."""
        try:
            magic, crc, status, count = _HEAD.unpack_from(data)
        except struct.error:
            raise ValueError("stored response truncated") from None
        if magic != _MAGIC or zlib.crc32(memoryview(data)[7:]) != crc:
            raise ValueError("stored response damaged")
        offset = _HEAD.size
        headers: list[tuple[bytes, bytes]] = []
        try:
            for _ in range(count):
                (size,) = _NAME.unpack_from(data, offset)
                offset += _NAME.size
                name = data[offset : offset + size]
                offset += size
                (size,) = _VALUE.unpack_from(data, offset)
                offset += _VALUE.size
                value = data[offset : offset + size]
                offset += size
                headers.append((name, value))
        except struct.error:
            raise ValueError("stored response truncated") from None
        if offset > len(data) or not 100 <= status <= 999:
            raise ValueError("stored response damaged")
        return cls(status, headers, data[offset:])
