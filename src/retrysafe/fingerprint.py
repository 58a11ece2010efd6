"""Fingerprints of requests, so that a key reused for another request is caught.

The fingerprint covers the method, the path, the query string and the body. A JSON body is
canonicalised first, so key order and insignificant whitespace do not count; named top-level
fields can be left out (a client-side timestamp, a nonce).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["Fingerprinter", "RequestView", "canonical_json", "default_fingerprint"]


@dataclass(slots=True)
class RequestView:
    """What retrysafe knows of a request: enough to scope and fingerprint it, framework-free.

    Faces fill ``body`` in once they have read it; callables should treat the view as read-only.
    """

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    """Raw header pairs, names in lower case, in arrival order."""
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header ``name`` (lower case), None if absent."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


Fingerprinter = Callable[[RequestView], bytes]
"""A replacement fingerprint: bytes that are equal exactly when two requests are the same."""


def _is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _exact_float(text: str) -> float:
    """Parse a JSON number the way ``float`` does, unless that would lose digits.

    ``10.0000000000000001`` and ``10.0`` are one float but two amounts to an app that parses
    with ``Decimal``: such a body is then fingerprinted byte for byte, never merged.
    """
    value = float(text)
    if repr(value) == text:  # most are their repr
        return value
    try:
        exact = Decimal(repr(value)) == Decimal(text)
    except ArithmeticError:  # an exponent past Decimal's range (1e-99999999999999999999)
        exact = False
    if not exact:
        raise ValueError("a number that a float cannot hold exactly")
    return value


_decode = json.JSONDecoder(parse_float=_exact_float).decode
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(body: bytes, exclude: Collection[str] = ()) -> bytes | None:
    """Return the canonical form of a JSON body, or None if it is not valid JSON."""
    try:
        try:
            document: Any = _decode(body.decode())
        except UnicodeDecodeError:
            # UTF-16 or UTF-32, detected by json; numbers judged as in UTF-8 bodies
            document = json.loads(body, parse_float=_exact_float)
    except (ValueError, RecursionError):
        return None
    if exclude and isinstance(document, dict):
        document = {k: v for k, v in document.items() if k not in exclude}
    try:
        text = _encode(document)
    except (ValueError, RecursionError):
        return None
    return text.encode("utf-8", "surrogatepass")


_OTHER_ENCODING = 1 << 31
"""Set in a path's size when the path was encoded with ``surrogatepass``."""


def _size(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big")


def default_fingerprint(request: RequestView, exclude: Collection[str] = ()) -> bytes:
    """SHA-256 over method, path, query and (canonical JSON or raw) body."""
    body = request.body
    if body and _is_json(request.header(b"content-type")):
        body = canonical_json(body, exclude) or body
    method = request.method.encode()
    try:
        path = request.path.encode("utf-8", "surrogateescape")
        path_size = _size(path)
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: never a 500
        path = request.path.encode("utf-8", "surrogatepass")
        # Flagged in the size's top bit: this encoding must not meet surrogateescape's bytes.
        path_size = (len(path) | _OTHER_ENCODING).to_bytes(4, "big")
    query = request.query
    head = b"%b%b%b%b%b%b" % (_size(method), method, path_size, path, _size(query), query)
    digest = hashlib.sha256(head)
    digest.update(body)  # apart: a large body is not copied
    return digest.digest()
