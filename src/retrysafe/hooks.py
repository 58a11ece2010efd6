"""Observability: every decision retrysafe takes is reported to hooks as a :class:`Decision`.

A hook is any callable taking a Decision. Hooks run inline and must be quick; an exception in a
hook is logged and never reaches the request. Decisions carry hashes, never keys or credentials.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Decision", "Event", "Hook", "log_decision", "log_enabled"]

logger = logging.getLogger("retrysafe")


class Event(enum.StrEnum):
    """What happened to one request (or one stage of it)."""

    EXECUTED = "executed"
    """The claim was taken; the handler runs."""
    STORED = "stored"
    """The handler's final outcome was recorded for replay."""
    NOT_REPLAYABLE = "not-replayable"
    """The handler ran but its response was too large to keep, or was cut short after its
    final status was sent (the client left, the app returned early)."""
    BROKEN_RESPONSE = "broken-response"
    """The handler ran but its body did not match its own Content-Length (an app bug the
    server cuts off): kept as not replayable, so retries are refused, never run again."""
    RELEASED = "released"
    """The outcome was not final (5xx, exception, ...): the key is free again."""
    REPLAYED = "replayed"
    IN_PROGRESS = "in-progress"
    KEY_REUSED = "key-reused"
    REPLAY_UNAVAILABLE = "replay-unavailable"
    MALFORMED_KEY = "malformed-key"
    MISSING_KEY = "missing-key"
    BODY_TOO_LARGE = "body-too-large"
    STORE_ERROR = "store-error"
    """The ledger failed; the request was refused (or, after execution, the record was lost)."""
    FAIL_OPEN = "fail-open"
    """The ledger failed and ``fail_open`` let the request run unprotected."""
    CORRUPT_RECORD = "corrupt-record"
    """A stored record could not be decoded and was treated as absent."""
    LEASE_LOST = "lease-lost"
    """A running handler's claim was taken over or vanished; its outcome will not be recorded."""
    IDENTITY_FAILED = "identity-failed"
    """The policy's own ``scope`` or ``fingerprint`` function raised: the request was refused
    (400 ``malformed-request``) and not executed. Only the exception's type is reported (its
    message may quote credentials)."""


_WARNINGS = frozenset(
    {
        Event.STORE_ERROR, Event.FAIL_OPEN, Event.CORRUPT_RECORD, Event.LEASE_LOST,
        Event.BROKEN_RESPONSE, Event.IDENTITY_FAILED,
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision, as hooks see it."""

    event: Event
    method: str
    path: str
    record: str
    """A short prefix of the record id's hex: enough to correlate log lines, nothing secret."""
    status: int | None = None
    """The HTTP status sent or recorded, where there is one."""
    detail: str = ""


Hook = Callable[[Decision], None]


def log_enabled(event: Event) -> bool:
    """Whether :func:`log_decision` would log ``event`` (so a Decision need not be built)."""
    return logger.isEnabledFor(logging.WARNING if event in _WARNINGS else logging.DEBUG)


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a client's path cannot forge a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def log_decision(decision: Decision) -> None:
    """The built-in hook: one log line per decision on the ``retrysafe`` logger."""
    if log_enabled(decision.event):
        level = logging.WARNING if decision.event in _WARNINGS else logging.DEBUG
        logger.log(
            level,
            "%s %s %s record=%s status=%s %s",
            decision.event.value,
            one_line(decision.method),
            one_line(decision.path),
            decision.record,
            decision.status,
            one_line(decision.detail),
        )
