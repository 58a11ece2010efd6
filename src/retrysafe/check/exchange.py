"""What one request of the checker got back, and how two answers differ.

Pure data and text: the checks judge :class:`Exchange` objects, the report prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Exchange", "body_diff", "headers_not_replayed", "problem_defects", "same_answer"]

REPLAYED_HEADER = "idempotent-replayed"
COMPARED_HEADERS = ("content-type", "location", "etag")
"""Headers a replay must carry with the original's very value (rule 16). Of the others, a replay
must carry every one the original had (:func:`headers_not_replayed`), but their values may
legitimately vary where a proxy in front sets them per answer (a request id)."""
NOT_REPLAYED = frozenset(
    {
        # rule 16's deny-list: hop-by-hop, Date, Set-Cookie
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authenticate", "proxy-authorization", "date", "set-cookie",
        # framing, and what a server or a proxy outside the layer adds to each answer as it
        # sees fit (a compressor compresses a stream but not a short body, say)
        "content-length", "content-encoding", "vary", "server", "age", "via",
        REPLAYED_HEADER,
    }
)  # fmt: skip
"""Headers a replay may lack although the original had them; every other header of the
original must come back in the replay, as many times (rule 15)."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request sent and the response it got."""

    label: str
    """What the request was for, in the check's words (``retry (key A)``)."""
    method: str
    target: str
    """Path and query."""
    status: int
    headers: tuple[tuple[str, str], ...]
    """Response headers, names in lower case, in order."""
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), None if absent."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower case), in order."""
        return [value for key, value in self.headers if key == name]

    @property
    def replayed(self) -> bool:
        """Whether the response says it is a replay (``Idempotent-Replayed: true``)."""
        value = self.header(REPLAYED_HEADER)
        return value is not None and value.strip().lower() in {"true", "?1"}

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()

    def summary(self) -> str:
        """``201 application/json 87 B, Idempotent-Replayed: true``: the evidence of one answer."""
        parts = [str(self.status)]
        if self.media_type:
            parts.append(_shown(self.media_type))
        parts.append(f"{len(self.body)} B")
        text = " ".join(parts)
        if self.replayed:
            text += ", Idempotent-Replayed: true"
        retry_after = self.header("retry-after")
        if retry_after is not None:
            text += f", Retry-After: {_shown(retry_after)}"
        return text

    def line(self) -> str:
        return f"{self.label}: {self.method} {self.target} -> {self.summary()}"


def _shown(value: str) -> str:
    """A header value as the report shows it: quoted when it holds what could drive a
    terminal (HTTP allows bytes 0x80 to 0xff, and some servers send controls)."""
    return value if value.isprintable() and value.isascii() else repr(value)


def same_answer(a: Exchange, b: Exchange) -> bool:
    """Same status and byte-identical body."""
    return a.status == b.status and a.body == b.body


def headers_not_replayed(original: Exchange, replay: Exchange) -> list[str]:
    """The headers of ``original`` that ``replay`` lacks, or carries fewer times (rule 15:
    stored headers come back, repeated ones included), leaving out :data:`NOT_REPLAYED`."""
    missing = []
    for name in dict.fromkeys(key for key, _ in original.headers):
        if name in NOT_REPLAYED:
            continue
        had, has = len(original.values(name)), len(replay.values(name))
        if has == 0:
            missing.append(name)
        elif has < had:
            missing.append(f"{name} ({has} of {had})")
    return missing


def _excerpt(body: bytes, start: int, width: int = 24) -> str:
    piece = body[start : start + width]
    text = repr(piece)[2:-1]
    return ("..." if start else "") + text + ("..." if start + width < len(body) else "")


def body_diff(original: bytes, other: bytes) -> str:
    """A one-line account of how ``other`` differs from ``original`` ('' if it does not)."""
    if original == other:
        return ""
    if original.startswith(other):
        return f"truncated: {len(other)} of {len(original)} bytes"
    if other.startswith(original):
        return f"{len(other) - len(original)} bytes more than the original ({len(original)} B)"
    at = next(i for i, (x, y) in enumerate(zip(original, other, strict=False)) if x != y)
    start = max(0, at - 8)
    return f"differ at byte {at}: {_excerpt(original, start)} vs {_excerpt(other, start)}"


def problem_defects(exchange: Exchange) -> list[str]:
    """What keeps ``exchange`` from being an RFC 9457 problem response with the right members."""
    if exchange.media_type != "application/problem+json":
        return [f"Content-Type {exchange.media_type or 'missing'}, not application/problem+json"]
    try:
        document = json.loads(exchange.body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python reads
        return ["the body is not JSON"]
    if not isinstance(document, dict):
        return ["the body is not a JSON object"]
    defects = [
        f"no {name!r} string" for name in ("type", "title", "detail")
        if not isinstance(document.get(name), str)
    ]  # fmt: skip
    status = document.get("status")
    if status != exchange.status:
        defects.append(f"'status' is {status!r}, the response {exchange.status}")
    return defects
