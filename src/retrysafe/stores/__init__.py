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

import re
from collections import Counter
from collections.abc import Callable
from typing import TypedDict
from urllib.parse import SplitResult, parse_qsl, urlsplit

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
    if _split_userinfo(parts):
        raise ConfigError(
            f"{redact_url(url)}: the password seems to hold a raw '/', '?' or '#', which end"
            " the host part; percent-encode them (%2F, %3F, %23)"
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
        return _quietly(url, parts, RedisStore.from_url)
    if parts.scheme in POSTGRES_SCHEMES:
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"{redact_url(url)}: the PostgreSQL ledger needs asyncpg:"
                f" pip install 'retrysafe[postgres]' ({exc})"
            ) from None
        return _quietly(url, parts, PostgresStore.from_url)
    raise ConfigError(
        f"unknown store URL {redact_url(url)}: use memory://, sqlite:///file.db, redis://host:port,"
        " redis+cluster://host:port or postgresql://host/db"
    )


REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+cluster", "rediss+cluster"})
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


_SECRET_OPTIONS = re.compile(r"(?i)(^|&)((?:ssl)?password)=[^&]*")


def redact_url(url: str) -> str:
    """``url`` (quoted) without its password, in the netloc or as an option, for messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # an unparsable port, say: hide everything after the scheme
        return repr(url.partition("://")[0] + "://***")
    scheme, _, rest = url.partition("://")
    if _split_userinfo(parts) or (scheme != "sqlite" and "@" in rest and "@" not in parts.netloc):
        # Maybe a password whose raw '/', '?' or '#' ended the host part early (or only an
        # '@' in an option): where a password would end is anyone's guess, so hide it all.
        return repr(f"{scheme}://***")
    query = _SECRET_OPTIONS.sub(r"\1\2=***", parts.query)
    if password is None and parts.username and parts.scheme in REDIS_SCHEMES:
        # redis://secret@host: Redis clients read a lone userinfo as the password.
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    elif password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    elif query == parts.query:
        return repr(url)
    return repr(parts._replace(query=query).geturl())


def _quietly(url: str, parts: SplitResult, parse: Callable[[str], Store]) -> Store:
    """``parse(url)``; if it refuses a URL whose only '@' after the host part is in an option
    value, say so without its words: they may be pieces of a password cut short."""
    try:
        return parse(url)
    except ConfigError:
        if "@" in parts.netloc or "@" not in parts.query:
            raise
        raise ConfigError(
            f"{redact_url(url)}: not a valid store URL (if its password holds a raw '/', '?'"
            " or '#', percent-encode them: %2F, %3F, %23)"
        ) from None


def _split_userinfo(parts: SplitResult) -> bool:
    """Whether a password with a raw '/', '?' or '#' ended the host part early, leaving a
    piece of it (and the '@' after it) in the path, fragment or an option's name: such a URL
    is never echoed, nor read. An '@' in an option's value (``?user=admin@server``) is fine;
    sqlite URLs have no credentials."""
    if parts.scheme not in REDIS_SCHEMES and parts.scheme not in POSTGRES_SCHEMES:
        return False
    names = (pair.partition("=")[0] for pair in parts.query.split("&"))
    if "@" in parts.path or "@" in parts.fragment or any("@" in name for name in names):
        return True  # whatever the host part holds ("a@b/c@host": a password "b/c")
    if "@" in parts.netloc or "@" not in parts.query:
        return False
    # Only an option's value holds the '@': fine (?user=admin@server), unless what is left of
    # the host part ends in a colon and no port, the mark of "user:pass" cut short.
    last = parts.netloc.rsplit(",", 1)[-1].rpartition("]")[2]
    return ":" in last and not last.rpartition(":")[2].isdigit()


def parse_flag(url: str, name: str, text: str) -> bool:
    """A true/false URL option."""
    flag = text.lower()
    if flag not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
        raise ConfigError(f"{redact_url(url)}: {name} must be true or false, not {text!r}")
    return flag in {"true", "1", "yes", "on"}


def _no_options(url: str, options: dict[str, str]) -> None:
    if options:
        raise ConfigError(f"{redact_url(url)}: unknown option(s) {', '.join(sorted(options))}")
