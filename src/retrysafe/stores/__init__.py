"""Ledgers, chosen by URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs.db``."""

from __future__ import annotations

from collections import Counter
from typing import TypedDict
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigError
from .base import Store
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store", "open_store"]


class _SQLiteOptions(TypedDict, total=False):
    """The keyword arguments of :class:`SQLiteStore` a URL can set."""

    busy_timeout: float
    synchronous: str
    table: str


def open_store(url: str) -> Store:
    """Return the store a URL names. Nothing is connected until first use.

    Options are query parameters (``sqlite:///ledger.db?busy_timeout=2``); an unknown,
    repeated or malformed one is a :class:`ConfigError`.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    repeated = sorted(name for name, n in Counter(name for name, _ in pairs).items() if n > 1)
    if repeated:
        raise ConfigError(f"{url!r}: option(s) given more than once: {', '.join(repeated)}")
    options = dict(pairs)
    if parts.scheme == "memory":
        _no_options(url, options)
        return MemoryStore()
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ConfigError(
                f"{url!r}: write sqlite:///relative.db or sqlite:////absolute.db (three slashes)"
            )
        path = parts.path[1:]
        if not path:
            raise ConfigError(f"{url!r}: the sqlite URL names no file")
        kwargs: _SQLiteOptions = {}
        if "busy_timeout" in options:
            raw = options.pop("busy_timeout")
            try:
                kwargs["busy_timeout"] = float(raw)
            except ValueError:
                raise ConfigError(
                    f"{url!r}: busy_timeout must be a number of seconds, not {raw!r}"
                ) from None
        if "synchronous" in options:
            kwargs["synchronous"] = options.pop("synchronous")
        if "table" in options:
            kwargs["table"] = options.pop("table")
        _no_options(url, options)
        try:
            return SQLiteStore(path, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None
    raise ConfigError(f"unknown store URL {url!r}: use memory:// or sqlite:///file.db")


def _no_options(url: str, options: dict[str, str]) -> None:
    if options:
        raise ConfigError(f"{url!r}: unknown option(s) {', '.join(sorted(options))}")
