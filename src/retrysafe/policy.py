"""Policies: which requests are protected, and how. One default, overridden per route."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TypedDict, Unpack

from .errors import ConfigError
from .fingerprint import Fingerprinter
from .scope import ScopeFunction, credentials_scope

__all__ = [
    "DEFAULT_DENIED_HEADERS",
    "Policy",
    "PolicyOptions",
    "Route",
    "default_store_status",
]

UNSTORED_4XX = frozenset({408, 409, 423, 425, 429})

MAX_LEASE = 1e9
"""The longest ``lease`` (about 31 years): longer ones only overflow time arithmetic."""

MAX_STORED_RESPONSE = 256 << 20
"""The largest ``max_response_body``: every ledger keeps a record this large as one value."""

DEFAULT_DENIED_HEADERS = frozenset(
    {
        # hop-by-hop (RFC 9110 7.6.1), and headers that belong to one response only
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authenticate", "proxy-authorization", "date", "set-cookie",
    }
)  # fmt: skip


def default_store_status(status: int) -> bool:
    """Final outcomes are stored: 2xx, 3xx, and 4xx but 408, 409, 423, 425 and 429.

    Everything else (5xx, the transient 4xx) releases the key so that a retry runs again.
    """
    return status < 500 and status not in UNSTORED_4XX


@dataclass(frozen=True, slots=True)
class Policy:
    """How a protected route behaves. Times are seconds, sizes are bytes."""

    methods: Collection[str] = frozenset({"POST", "PATCH"})
    """Methods protected; any other passes through untouched, key or not."""
    require_key: bool = False
    """Refuse protected requests that carry no key (400 ``missing-key``)."""
    ttl: float = 86400.0
    """How long a final outcome is kept and replayed."""
    lease: float = 15.0
    """How long a claim outlives its holder; renewed while the handler runs."""
    wait: float = 0.0
    """How long a duplicate waits for an in-flight original before getting 409; 0: no wait."""
    store_status: Callable[[int], bool] = default_store_status
    """Which statuses are final (stored and replayed); the others release the key."""
    max_request_body: int = 1 << 20
    """Larger request bodies get 413 ``body-too-large`` and are not executed."""
    max_response_body: int = 1 << 20
    """Larger responses are delivered whole but not kept: retries get ``replay-unavailable``."""
    exclude_fields: Collection[str] = frozenset()
    """Top-level JSON body fields left out of the fingerprint."""
    fingerprint: Fingerprinter | None = None
    """Replaces the default fingerprint (method, path, query, canonical body)."""
    scope: ScopeFunction | None = None
    """Replaces the default scope: ``Authorization``, ``scope_headers`` and ``scope_cookies``."""
    scope_headers: Collection[str] = ()
    """Credential headers that make up the scope, besides ``Authorization`` (an API-key header)."""
    scope_cookies: Collection[str] = ()
    """Credential cookies that make up the scope (a session cookie)."""
    denied_headers: Collection[str] = DEFAULT_DENIED_HEADERS
    """Response headers neither stored nor replayed; replaces the default list (extend it with
    ``DEFAULT_DENIED_HEADERS | {...}``)."""
    denied_header_bytes: frozenset[bytes] = field(init=False, repr=False, compare=False)
    scope_function: ScopeFunction = field(init=False, repr=False, compare=False)
    """The scope in force: ``scope``, or the credentials scope built from the options."""

    def __post_init__(self) -> None:
        for name in ("ttl", "lease", "wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
        for name in ("max_request_body", "max_response_body"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number of bytes, not {value!r}")
        if not self.ttl > 0:  # NaN fails too; an infinite ttl keeps outcomes for good
            raise ConfigError("ttl must be a positive number of seconds")
        if not 0 < self.lease <= MAX_LEASE:
            # A dead holder's key would never be taken over: a stuck key. (And a lease near
            # the float limit overflows the ledgers' time arithmetic.)
            raise ConfigError(
                f"lease must be a positive, finite number of seconds (at most {MAX_LEASE:g})"
            )
        if not self.wait >= 0:
            raise ConfigError("wait must be >= 0 seconds")
        for name in ("max_request_body", "max_response_body"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 bytes")
        if self.max_response_body > MAX_STORED_RESPONSE:
            # A record past what a ledger holds in one value (SQLite and PostgreSQL: 1 GB,
            # Redis: 512 MB) would fail its completion after the handler ran: the key would
            # run again once the lease ends, instead of being kept as not replayable.
            raise ConfigError(
                f"max_response_body must be <= {MAX_STORED_RESPONSE} bytes (256 MiB), the"
                " most every ledger can keep as one record"
            )
        for name in _COLLECTIONS:
            value = getattr(self, name)
            if isinstance(value, str | bytes):
                # "POST" would silently become {"P", "O", "S", "T"}: refuse it.
                raise ConfigError(f"{name} takes a collection of names, not {value!r}")
        setattr_ = object.__setattr__
        setattr_(self, "methods", frozenset(m.upper() for m in self.methods))
        setattr_(self, "exclude_fields", frozenset(self.exclude_fields))
        setattr_(self, "scope_headers", tuple(h.lower() for h in self.scope_headers))
        setattr_(self, "scope_cookies", tuple(self.scope_cookies))
        denied = frozenset(h.lower() for h in self.denied_headers)
        setattr_(self, "denied_headers", denied)
        setattr_(self, "denied_header_bytes", frozenset(h.encode() for h in denied))
        scope = self.scope or credentials_scope(
            ("authorization", *self.scope_headers), self.scope_cookies
        )
        setattr_(self, "scope_function", scope)

    def with_options(self, options: PolicyOptions) -> Policy:
        """Return this policy with ``options`` overriding it."""
        _check_options(options, "policy")
        return replace(self, **options)


class PolicyOptions(TypedDict, total=False):
    """Keyword options that override a :class:`Policy` (globally or for one route)."""

    methods: Collection[str]
    require_key: bool
    ttl: float
    lease: float
    wait: float
    store_status: Callable[[int], bool]
    max_request_body: int
    max_response_body: int
    exclude_fields: Collection[str]
    fingerprint: Fingerprinter | None
    scope: ScopeFunction | None
    scope_headers: Collection[str]
    scope_cookies: Collection[str]
    denied_headers: Collection[str]


_FIELD_NAMES = frozenset(f.name for f in fields(Policy) if f.init)
_COLLECTIONS = ("methods", "exclude_fields", "scope_headers", "scope_cookies", "denied_headers")


def _check_options(options: Mapping[str, object], where: str) -> None:
    unknown = set(options) - _FIELD_NAMES
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")


_PATTERN_PART = re.compile(r"\*\*|\*|\{[^}/]*\}")
_REPEATED_STARS = re.compile(r"(?:/\*\*){2,}(?=/|$)")


def _compile(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ConfigError(f"route pattern must start with '/': {pattern!r}")
    # "/**/**" means what "/**" means; merged, the zero-segment forms below need no special case.
    pattern = _REPEATED_STARS.sub("/**", pattern)
    out, pos = [], 0
    for match in _PATTERN_PART.finditer(pattern):
        start, end, token = match.start(), match.end(), match.group()
        if token == "**" and pattern[start - 1] == "/" and pattern[end : end + 1] in ("", "/"):
            # A whole segment of "**" stands for zero or more segments: "/payments/**" is
            # "/payments" too (the create endpoint), "/a/**/b" is "/a/b" too.
            if end == len(pattern):
                out.append(re.escape(pattern[pos : start - 1]))
                out.append("(?:/.*)?")
                pos = end
            else:
                out.append(re.escape(pattern[pos:start]))
                out.append("(?:.*/)?")
                pos = end + 1
            continue
        out.append(re.escape(pattern[pos:start]))
        out.append(".*" if token == "**" else "[^/]*" if token == "*" else "[^/]+")
        pos = end
    out.append(re.escape(pattern[pos:]))
    # DOTALL: a path may hold a newline (%0A); it must not slip past a route's policy.
    return re.compile("".join(out), re.DOTALL)


class Route:
    """A path pattern and the policy options that apply to it.

    ``{name}`` matches one path segment, ``*`` any text within a segment, ``**`` anything;
    ``**`` as a whole segment also matches no segment at all (``/payments/**`` matches
    ``/payments`` as well as ``/payments/7/refund``). Routes are tried in order; the first
    whose pattern matches the whole path applies.
    """

    __slots__ = ("_regex", "options", "pattern")

    def __init__(self, pattern: str, **options: Unpack[PolicyOptions]) -> None:
        self.pattern = pattern
        self.options = options
        self._regex = _compile(pattern)
        _check_options(options, f"route {pattern!r}")

    def matches(self, path: str) -> bool:
        return self._regex.fullmatch(path) is not None

    def __repr__(self) -> str:
        return f"Route({self.pattern!r}, {self.options!r})"
