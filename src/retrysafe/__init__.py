"""retrysafe: the ``Idempotency-Key`` header, done right.

The first outcome of each key is recorded in a ledger and replayed to every retry; concurrent
duplicates never both run. See ``retrysafe.asgi`` for the middleware and ``retrysafe.stores``
for the ledgers.
"""

from .asgi import IdempotencyMiddleware
from .engine import Engine, Execution, Replay
from .errors import (
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

__all__ = [
    "DEFAULT_DENIED_HEADERS",
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
    "default_store_status",
    "log_decision",
    "open_store",
]
