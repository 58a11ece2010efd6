"""retrysafe: the ``Idempotency-Key`` header, done right.

The first outcome of each key is recorded in a ledger and replayed to every retry; concurrent
duplicates never both run. See ``retrysafe.asgi`` for the middleware and ``retrysafe.stores``
for the ledgers; ``retrysafe.client`` for the retrying client (whose names are exported here
lazily, so that ``import retrysafe`` needs neither httpx nor requests).
"""

from typing import TYPE_CHECKING, Any

from .asgi import IdempotencyMiddleware
from .engine import Claim, Engine, Execution, Replay, current_claim
from .errors import (
    ClaimLost,
    ConfigError,
    CorruptRecord,
    RetrysafeError,
    StoreBusy,
    StoreError,
    StoreUnavailable,
)
from .fingerprint import RequestView
from .hooks import Decision, Event, Hook, log_decision
from .policy import DEFAULT_DENIED_HEADERS, Policy, Route, default_store_status
from .problems import Problem, ProblemType
from .stores import MemoryStore, SQLiteStore, Store, open_store

if TYPE_CHECKING:  # the lazy names below, for type checkers (``X as X``: re-exported)
    from .client.httpx import AsyncClient as AsyncClient
    from .client.httpx import AsyncRetryTransport as AsyncRetryTransport
    from .client.httpx import Client as Client
    from .client.httpx import RetryTransport as RetryTransport
    from .client.journal import KeyJournal as KeyJournal
    from .client.policy import RetryInfo as RetryInfo
    from .client.policy import RetryPolicy as RetryPolicy
    from .client.policy import retry_info as retry_info
    from .client.requests import RetryAdapter as RetryAdapter
    from .client.requests import RetrySession as RetrySession

_LAZY = {
    "AsyncClient": "httpx",
    "AsyncRetryTransport": "httpx",
    "Client": "httpx",
    "RetryTransport": "httpx",
    "KeyJournal": "journal",
    "RetryInfo": "policy",
    "RetryPolicy": "policy",
    "retry_info": "policy",
    "RetryAdapter": "requests",
    "RetrySession": "requests",
}
"""The client's names, imported on first use from ``retrysafe.client.<module>``. They are left
out of ``__all__`` so that ``from retrysafe import *`` works without httpx and requests."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'retrysafe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".client.{module}", __name__), name)


__all__ = [
    "DEFAULT_DENIED_HEADERS",
    "Claim",
    "ClaimLost",
    "ConfigError",
    "CorruptRecord",
    "Decision",
    "Engine",
    "Event",
    "Execution",
    "Hook",
    "IdempotencyMiddleware",
    "MemoryStore",
    "Policy",
    "Problem",
    "ProblemType",
    "Replay",
    "RequestView",
    "RetrysafeError",
    "Route",
    "SQLiteStore",
    "Store",
    "StoreBusy",
    "StoreError",
    "StoreUnavailable",
    "current_claim",
    "default_store_status",
    "log_decision",
    "open_store",
]
