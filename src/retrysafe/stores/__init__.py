"""Ledgers, chosen by URL.

* ``memory://``: one process, for tests;
* ``sqlite:///relative.db``, ``sqlite:////absolute.db``: the embedded default;
* ``redis://host:port/db``, ``rediss://...`` (TLS), ``redis+cluster://host:port[,host:port]``;
* ``postgresql://...`` or ``postgres://...``.

The Redis and PostgreSQL stores are imported only when their URL is used. The Redis store
speaks the protocol itself (no dependency); the PostgreSQL store needs asyncpg, the optional
extra ``retrysafe[postgres]``.
"""

from __future__ import annotations

from collections import Counter
from typing import TypedDict
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from ..errors import ConfigError
from .base import Store, StoreStats
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store", "StoreStats", "open_store", "redact_url"]


class _SQLiteOptions(TypedDict, total=False):
    """The keyword arguments of :class:`SQLiteStore` a URL can set."""

    busy_timeout: float
    synchronous: str
    table: str
    create: bool


def open_store(url: str) -> Store:
    """Return the store a URL names. Nothing is connected until first use.

    Options are query parameters (``sqlite:///ledger.db?busy_timeout=2``); an unknown,
    repeated or malformed one is a :class:`ConfigError`.
    """
    try:
        # Host lists (redis+cluster://h1:1,h2:2, postgresql://h1,h2/db) are the Redis and
        # PostgreSQL parsers' to check: no port is read here.
        parts = urlsplit(url)
    except ValueError:  # its text may quote a piece of a password: never shown
        raise ConfigError(f"{redact_url(url)}: not a valid store URL") from None
    if _late_at(url, parts):
        raise ConfigError(
            f"{redact_url(url)}: a raw '@' after the host part; percent-encode '@' in option"
            " values (%40, as in ?user=admin%40server), and '/', '?', '#' in passwords (%2F,"
            " %3F, %23)"
        )
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    repeated = sorted(name for name, n in Counter(name for name, _ in pairs).items() if n > 1)
    if repeated:
        raise ConfigError(
            f"{redact_url(url)}: option(s) given more than once: {', '.join(repeated)}"
        )
    options = dict(pairs)
    if parts.scheme == "memory":
        _no_options(url, options)
        return MemoryStore()
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ConfigError(
                f"{redact_url(url)}: write sqlite:///relative.db or sqlite:////absolute.db"
                " (three slashes)"
            )
        path = parts.path[1:]
        if not path:
            raise ConfigError(f"{redact_url(url)}: the sqlite URL names no file")
        if parts.fragment or url.endswith("#"):
            raise ConfigError(
                f"{redact_url(url)}: a '#' in a sqlite URL starts a fragment, so the file name"
                " cannot hold one (pass SQLiteStore(path) for such a file)"
            )
        kwargs: _SQLiteOptions = {}
        if "busy_timeout" in options:
            raw = options.pop("busy_timeout")
            try:
                kwargs["busy_timeout"] = float(raw)
            except ValueError:
                raise ConfigError(
                    f"{redact_url(url)}: busy_timeout must be a number of seconds, not {raw!r}"
                ) from None
        if "synchronous" in options:
            kwargs["synchronous"] = options.pop("synchronous")
        if "table" in options:
            kwargs["table"] = options.pop("table")
        if "create" in options:
            kwargs["create"] = parse_flag(url, "create", options.pop("create"))
        _no_options(url, options)
        try:
            return SQLiteStore(path, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{redact_url(url)}: {exc}") from None
    if parts.scheme in REDIS_SCHEMES:
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise ConfigError(
                f"{redact_url(url)}: the Redis ledger cannot be loaded ({exc})"
            ) from None
        return RedisStore.from_url(url)
    if parts.scheme in POSTGRES_SCHEMES:
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"{redact_url(url)}: the PostgreSQL ledger needs asyncpg:"
                f" pip install 'retrysafe[postgres]' ({exc})"
            ) from None
        return PostgresStore.from_url(url)
    raise ConfigError(
        f"unknown store URL {redact_url(url)}: use memory://, sqlite:///file.db, redis://host:port,"
        " redis+cluster://host:port or postgresql://host/db"
    )


REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+cluster", "rediss+cluster"})
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


_SECRET_NAMES = frozenset({"password", "sslpassword"})
"""Options whose value is a secret (compared decoded and in lower case)."""


def redact_url(url: str) -> str:
    """``url`` (quoted) without its password, in the netloc or as an option, for messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # an unparsable port, say: hide everything after the scheme
        return repr(url.partition("://")[0] + "://***")
    if _late_at(url, parts):
        # Maybe a password whose raw '/', '?' or '#' ended the host part early: where it
        # would end is anyone's guess, so hide everything.
        return repr(f"{parts.scheme}://***")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = parts.query
    if any(name.lower() in _SECRET_NAMES for name, _ in pairs):
        query = urlencode(
            [(n, "***" if n.lower() in _SECRET_NAMES else v) for n, v in pairs], safe="*/:,"
        )
    if password is None and parts.username and parts.scheme in REDIS_SCHEMES:
        # redis://secret@host: Redis clients read a lone userinfo as the password.
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    elif password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    elif query == parts.query:
        return repr(url)
    return repr(parts._replace(query=query).geturl())


def _late_at(url: str, parts: SplitResult) -> bool:
    """Whether a Redis or PostgreSQL URL holds a raw '@' after its host part.

    A password with a raw '/', '?' or '#' ends the host part early and leaves the '@' that
    closed it behind, in the path, the options or the fragment. Nothing tells that apart from
    an '@' in an option's value, so a raw '@' is only allowed in the host part: such a URL is
    refused (an option value writes it %40) and never echoed.
    """
    if parts.scheme not in REDIS_SCHEMES and parts.scheme not in POSTGRES_SCHEMES:
        return False  # sqlite and memory URLs carry no credentials
    return "@" in url.partition("://")[2][len(parts.netloc) :]


def parse_flag(url: str, name: str, text: str) -> bool:
    """A true/false URL option."""
    flag = text.lower()
    if flag not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
        raise ConfigError(f"{redact_url(url)}: {name} must be true or false, not {text!r}")
    return flag in {"true", "1", "yes", "on"}


def _no_options(url: str, options: dict[str, str]) -> None:
    if options:
        raise ConfigError(f"{redact_url(url)}: unknown option(s) {', '.join(sorted(options))}")
