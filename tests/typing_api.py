"""Typing checks of the public API: mypy --strict must accept this file (pytest never runs it).

It pins the shapes users write against, so that an API change shows up as a type error here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from retrysafe import (
    Decision,
    Engine,
    Event,
    IdempotencyMiddleware,
    MemoryStore,
    RequestView,
    Route,
    SQLiteStore,
    Store,
    default_store_status,
    log_decision,
    open_store,
)


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """A bare ASGI app."""


def tenant(request: RequestView) -> str | None:
    """A scope callable: the tenant a request belongs to."""
    value = request.header(b"x-tenant")
    return None if value is None else value.decode()


def count(decision: Decision) -> None:
    """A hook."""
    if decision.event is Event.REPLAYED:
        print(decision.record, decision.status)


store: Store = open_store("memory://")
sqlite_store: Store = SQLiteStore("ledger.db", busy_timeout=1.0)
middleware = IdempotencyMiddleware(
    app,
    store=MemoryStore(),
    ttl=3600,
    lease=2.5,
    require_key=True,
    methods=["POST"],
    wait=1,
    scope=tenant,
    exclude_fields=["timestamp"],
    hooks=[log_decision, count],
    routes=[Route("/v1/charges/{id}", store_status=lambda s: s < 400, max_response_body=0)],
)
engine: Engine = middleware.engine
counts: int = engine.counts[Event.EXECUTED]
stored: bool = default_store_status(201)
