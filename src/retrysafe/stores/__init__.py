"""Ledgers, chosen by URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs.db``."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigError
from .base import Store
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store", "open_store"]


def open_store(url: str) -> Store:
    """Return the store a URL names. Nothing is connected until first use."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
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
        kwargs: dict[str, object] = {}
        try:
            if "busy_timeout" in options:
                kwargs["busy_timeout"] = float(options.pop("busy_timeout"))
        except ValueError:
            raise ConfigError(f"{url!r}: busy_timeout must be a number of seconds") from None
        for name in ("synchronous", "table"):
            if name in options:
                kwargs[name] = options.pop(name)
        _no_options(url, options)
        return SQLiteStore(path, **kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"unknown store URL {url!r}: use memory:// or sqlite:///file.db")


def _no_options(url: str, options: dict[str, str]) -> None:
    if options:
        raise ConfigError(f"{url!r}: unknown option(s) {', '.join(sorted(options))}")
