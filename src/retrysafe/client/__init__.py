"""The retrying client: one key per logical call, reused on every retry, retries only where
retrying is safe and useful (contract rules 25-27).

``policy`` and ``journal`` need nothing but the standard library; ``retrysafe.client.httpx``
needs httpx (the ``client`` extra), ``retrysafe.client.requests`` needs requests (the
``requests`` extra). Import those faces from their modules, or lazily from ``retrysafe``.
"""

from .journal import DEFAULT_RETENTION, JournalError, KeyJournal
from .policy import (
    IDEMPOTENT_METHODS,
    RETRY_STATUSES,
    Clock,
    RetryInfo,
    RetryPolicy,
    SystemClock,
    new_key,
    retry_info,
)

__all__ = [
    "DEFAULT_RETENTION",
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "Clock",
    "JournalError",
    "KeyJournal",
    "RetryInfo",
    "RetryPolicy",
    "SystemClock",
    "new_key",
    "retry_info",
]
