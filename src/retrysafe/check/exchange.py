"""What one request of the checker got back, and how two answers differ.

Pure data and text: the checks judge :class:`Exchange` objects, the report prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Exchange", "body_diff", "problem_defects", "same_answer"]

REPLAYED_HEADER = "idempotent-replayed"
COMPARED_HEADERS = ("content-type", "location", "etag")
"""Headers a replay must carry as the original did (rule 16); the rest may legitimately vary."""


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
            parts.append(self.media_type)
        parts.append(f"{len(self.body)} B")
        text = " ".join(parts)
        if self.replayed:
            text += ", Idempotent-Replayed: true"
        retry_after = self.header("retry-after")
        if retry_after is not None:
            text += f", Retry-After: {retry_after}"
        return text

    def line(self) -> str:
        return f"{self.label}: {self.method} {self.target} -> {self.summary()}"


def same_answer(a: Exchange, b: Exchange) -> bool:
    """Same status and byte-identical body."""
    return a.status == b.status and a.body == b.body


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
    except ValueError:
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
