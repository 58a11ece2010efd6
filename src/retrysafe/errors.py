"""The exceptions retrysafe raises.

RetrysafeError
├── ClaimLost             the claim was taken over: the handler must not commit its effect
├── ConfigError           bad configuration, found at start-up
├── CorruptRecord         a stored record cannot be decoded (treated as absent)
├── ResponseCutShort      a response began with its status but could not be finished
└── StoreError            the ledger failed
    └── StoreUnavailable  the ledger cannot be reached or is too busy right now
"""

from __future__ import annotations

__all__ = [
    "ClaimLost",
    "ConfigError",
    "CorruptRecord",
    "ResponseCutShort",
    "RetrysafeError",
    "StoreBusy",
    "StoreError",
    "StoreUnavailable",
]


class RetrysafeError(Exception):
    """Base class of every error raised by retrysafe."""


class ConfigError(RetrysafeError, ValueError):
    """The configuration is invalid (an unknown store URL, a negative lease, ...)."""


class ClaimLost(RetrysafeError):
    """:meth:`retrysafe.Claim.mark` found the claim no longer held (its lease ran out and
    another request took the key over, or it was deleted): raised inside the handler's own
    transaction, so that its effect rolls back instead of being committed twice."""


class ResponseCutShort(RetrysafeError):
    """Raised by an app whose response began but cannot be finished for a reason that is not
    the handler failing (its work is done; delivering the rest failed).

    The middleware then keeps the key, as not replayable when the status is final, instead of
    releasing it into a second execution; the exception still reaches the server, which drops
    the client's connection so that the truncated response never looks complete.
    """


class StoreError(RetrysafeError):
    """The ledger failed; the original backend error is chained as ``__cause__``."""


class StoreUnavailable(StoreError):
    """The ledger cannot be reached (or is busy: see :class:`StoreBusy`)."""


class StoreBusy(StoreUnavailable):
    """The ledger is up but stayed busy (contended) past its time budget.

    Unlike an outage this never lets ``fail_open`` run a request unprotected: under load,
    that would turn contention into duplicate executions.
    """


class CorruptRecord(RetrysafeError):
    """A stored record could not be decoded; retrysafe treats it as absent.

    ``token`` names the exact version found, so that it can be removed without touching a
    record written after it.
    """

    def __init__(self, message: str, token: int) -> None:
        super().__init__(message)
        self.token = token
