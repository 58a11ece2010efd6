"""RFC 9457 problem responses: every refusal retrysafe makes is one of these."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

__all__ = ["DEFAULT_PROBLEM_BASE", "Problem", "ProblemType"]

DEFAULT_PROBLEM_BASE = "urn:retrysafe:problem:"
"""Type URIs are this base plus the problem's slug; point it at your own docs if you like."""


class ProblemType(enum.Enum):
    """Each refusal, with its HTTP status and title."""

    MISSING_KEY = ("missing-key", 400, "Idempotency-Key required")
    MALFORMED_KEY = ("malformed-key", 400, "Malformed Idempotency-Key")
    KEY_REUSED = ("key-reused", 422, "Idempotency-Key reused for another request")
    IN_PROGRESS = ("in-progress", 409, "Request with this Idempotency-Key in progress")
    REPLAY_UNAVAILABLE = ("replay-unavailable", 410, "Response cannot be replayed")
    STORE_UNAVAILABLE = ("store-unavailable", 503, "Idempotency store unavailable")
    BODY_TOO_LARGE = ("body-too-large", 413, "Request body too large")
    UPSTREAM_UNAVAILABLE = ("upstream-unavailable", 502, "Upstream unavailable")
    """The gateway could not reach the upstream, or lost it before its answer was complete."""
    UPSTREAM_TIMEOUT = ("upstream-timeout", 504, "Upstream timed out")
    """The gateway gave up waiting for the upstream's answer."""
    MALFORMED_REQUEST = ("malformed-request", 400, "Malformed request")
    """A request the layer cannot identify or forward unambiguously (the gateway: its Host;
    any face: the app's scope or fingerprint function failed on it)."""
    SHUTTING_DOWN = ("shutting-down", 503, "Server shutting down")
    """The server stopped before the answer was ready (the key, if any, was released)."""

    def __init__(self, slug: str, status: int, title: str) -> None:
        self.slug = slug
        self.status = status
        self.title = title


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem response, ready to be rendered by any face."""

    type: ProblemType
    detail: str
    retry_after: int | None = None

    @property
    def status(self) -> int:
        return self.type.status

    def body(self, base: str = DEFAULT_PROBLEM_BASE) -> bytes:
        """The ``application/problem+json`` document."""
        document = {
            "type": base + self.type.slug,
            "title": self.type.title,
            "status": self.type.status,
            "detail": self.detail,
        }
        return json.dumps(document).encode()

    def headers(self, body_length: int) -> list[tuple[bytes, bytes]]:
        """The response headers, ``Retry-After`` included where the problem is transient."""
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(body_length).encode()),
            (b"cache-control", b"no-store"),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers
