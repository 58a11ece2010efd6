"""Scopes: whose key is it?

A record belongs to (namespace, scope, key). By default the scope is derived from the caller's
credentials, so two callers that pick the same key never share a record. Requests without
credentials share the anonymous scope.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from .fingerprint import RequestView

__all__ = ["ANONYMOUS", "ScopeFunction", "credentials_scope"]

ANONYMOUS = b""
"""The scope of requests that carry no credentials."""

ScopeFunction = Callable[[RequestView], "str | bytes | int | None"]
"""Return the caller's identity (tenant id, user id, ...); None means anonymous."""


def _cookie(header: bytes, name: bytes) -> bytes | None:
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value
    return None


def credentials_scope(
    headers: Iterable[str] = ("authorization",), cookies: Iterable[str] = ()
) -> ScopeFunction:
    """Build the default scope: the named headers and cookies, hashed together.

    Header and cookie names are matched case-insensitively and case-sensitively respectively,
    as HTTP defines them.
    """
    header_names = tuple(name.lower().encode("latin-1") for name in headers)
    cookie_names = tuple(name.encode("latin-1") for name in cookies)

    def scope(request: RequestView) -> bytes | None:
        digest = None
        for i, name in enumerate(header_names):
            value = request.header(name)
            if value is not None:
                digest = digest or hashlib.sha256()
                digest.update(b"h%d:%d:" % (i, len(value)) + value)
        if cookie_names:
            cookie_header = b"; ".join(v for k, v in request.headers if k == b"cookie")
            for i, name in enumerate(cookie_names):
                value = _cookie(cookie_header, name)
                if value is not None:
                    digest = digest or hashlib.sha256()
                    digest.update(b"c%d:%d:" % (i, len(value)) + value)
        return None if digest is None else digest.digest()

    return scope
