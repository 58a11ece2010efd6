"""The retrying client's decisions, free of any HTTP library: which outcome is retried, how long
to wait, when to stop. The httpx and requests faces drive :meth:`RetryPolicy.plan` and do I/O.

The retry loop is written once, as a generator of steps (:class:`Attempt`, :class:`Wait`) that
a driver performs and answers with the attempt's :class:`Answered` or :class:`Failed`
outcome; its return value is the call's :class:`RetryInfo`. A sync driver sleeps with
``clock.sleep``, an async one awaits ``clock.asleep``: no sync copy of async code.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import json
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import ConfigError

__all__ = [
    "IDEMPOTENT_METHODS",
    "PROBLEM_BODY_LIMIT",
    "RETRY_STATUSES",
    "SYSTEM_CLOCK",
    "Answered",
    "Attempt",
    "Call",
    "Clock",
    "Failed",
    "Reach",
    "RetryInfo",
    "RetryPolicy",
    "SystemClock",
    "Wait",
    "advance",
    "new_key",
    "retry_info",
]

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses worth another attempt (contract rule 26); 409 is added only for ``in-progress``."""

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 §9.2.2: sending these twice has the effect of sending them once."""

IN_PROGRESS = "in-progress"
"""The slug ending the ``type`` of the problem a retrysafe server answers a concurrent duplicate."""

PROBLEM_BODY_LIMIT = 64 * 1024
"""Most bytes of a 409 body read to tell whether it is the ``in-progress`` problem (a few
hundred bytes): a longer body is not that problem, and drivers read no more than one byte past
this to find out."""

_DELTA_SECONDS = re.compile(r"[0-9]+")
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"[0-9]{2}:[0-9]{2}:[0-9]{2}"
_HTTP_DATE = re.compile(
    rf"{_DAY}, [0-9]{{2}} {_MONTH} [0-9]{{4}} {_TIME} GMT"  # IMF-fixdate
    rf"|(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rf"[0-9]{{2}}-{_MONTH}-[0-9]{{2}} {_TIME} GMT"  # obsolete RFC 850 form
    rf"|{_DAY} {_MONTH} [ 0-9][0-9] {_TIME} [0-9]{{4}}",  # obsolete asctime() form
    re.IGNORECASE,
)
"""RFC 9110 §5.6.7 HTTP-date, in the three forms a recipient accepts."""


def new_key() -> str:
    """A fresh idempotency key: a UUIDv7 where the standard library has it, else a UUIDv4."""
    uuid7: Callable[[], uuid.UUID] | None = getattr(uuid, "uuid7", None)
    return str(uuid7() if uuid7 is not None else uuid.uuid4())


class Clock(Protocol):
    """Time as the retry loop sees it; tests pass a fake one so that nothing really sleeps."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: attempts and deadlines are timed with it."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch: ``Retry-After`` dates are read against it."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds`` (sync drivers)."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Wait for ``seconds`` (async drivers)."""
        ...


class SystemClock:
    """The real clocks; ``asleep`` works under asyncio and trio (through anyio, as httpx does)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        import anyio  # an httpx dependency; only async drivers get here

        await anyio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class Reach(enum.Enum):
    """How far a request that failed without an answer may have gone."""

    NOT_SENT = "not-sent"
    """It never left (connect error or timeout, no free connection): always safe to retry."""
    MAYBE_SENT = "maybe-sent"
    """It may have reached the server (reset, read or write error or timeout, lost response)."""
    FATAL = "fatal"
    """Retrying cannot fix it (bad URL, unsupported scheme, a local protocol misuse, a TLS
    certificate that does not verify or another TLS failure)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """An attempt that ended with an error instead of a response."""

    reach: Reach
    label: str
    """What happened, for :attr:`RetryInfo.outcomes`: the exception's class name."""


@dataclass(frozen=True, slots=True)
class Answered:
    """An attempt that got a response."""

    status: int
    retry_after: str | None = None
    content_type: str | None = None
    replayed: bool = False
    body: bytes | None = None
    """The decoded body, when :meth:`RetryPolicy.needs_body` asked the driver to read it (no
    more than ``PROBLEM_BODY_LIMIT + 1`` bytes of it: a longer body is not the problem)."""


Outcome = Answered | Failed


@dataclass(frozen=True, slots=True)
class Attempt:
    """Step: send the request (attempt ``number``, from 1) and answer with its outcome."""

    number: int
    budget: float | None
    """Seconds left before the deadline: the driver caps the attempt's timeouts to it."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Step: discard the last response, sleep ``seconds``, then answer None."""

    seconds: float


Step = Attempt | Wait


@dataclass(frozen=True, slots=True)
class Call:
    """What the policy needs to know about one logical call."""

    method: str
    key: str | None
    """The idempotency key it carries (minted or the caller's), None if it has none."""
    replayable: bool = True
    """False when the body is a one-shot stream: it cannot be sent again once it was sent."""


@dataclass(frozen=True, slots=True)
class RetryInfo:
    """What happened during one call: ``response.extensions["retrysafe"]`` (httpx), or
    ``retry_info(response)`` for httpx and requests alike (contract rule 27)."""

    attempts: int
    """How many times the request was sent (1 when it was not retried)."""
    key: str | None
    """The ``Idempotency-Key`` every attempt carried, None if the call had none."""
    replayed: bool
    """The final response was a replay (``Idempotent-Replayed: true``): the server had executed
    this key before, in an earlier attempt or an earlier run of the same operation."""
    delays: tuple[float, ...] = ()
    """The seconds waited before each retry."""
    outcomes: tuple[str, ...] = ()
    """Each attempt's outcome: a status (``"503"``) or an exception name (``"ReadTimeout"``)."""
    stopped: str = "final"
    """Why the loop stopped: ``final`` (an outcome not worth retrying), ``unsafe`` (retryable,
    but the request may have been executed and is neither keyed nor idempotent, or its body
    cannot be sent again), ``attempts`` or ``deadline``."""


def retry_info(response: object) -> RetryInfo | None:
    """The :class:`RetryInfo` of a response from a retrysafe client (httpx or requests), or of
    the exception a call ended with (its ``retrysafe`` attribute): how many attempts it made
    and the key they carried, which a later run of the same operation must send again."""
    extensions = getattr(response, "extensions", None)
    info = extensions.get("retrysafe") if isinstance(extensions, dict) else None
    if info is None:
        info = getattr(response, "retrysafe", None)
    return info if isinstance(info, RetryInfo) else None


def _names(value: Collection[str] | str, what: str) -> frozenset[str]:
    if isinstance(value, str):
        raise ConfigError(f"{what} takes a collection of names, not the string {value!r}")
    return frozenset(name.upper() for name in value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a call is retried: one object shared by every client face.

    The defaults: 5 attempts within 60 s; the n-th retry waits a random time up to
    ``min(max_backoff, backoff * 2**(n-1))`` (full jitter), and at least what ``Retry-After``
    asks for, capped at ``max_retry_after``; no retry starts with less than ``min_budget``
    (0.5 s) left before the deadline. POST and PATCH get a fresh key per call.
    """

    attempts: int = 5
    """Most times one call is sent, the first included."""
    deadline: float | None = 60.0
    """Seconds from the start of the first attempt, on the clock's ``monotonic`` time (waits
    and the time spent in attempts alike), after which no attempt starts (None: no deadline).
    Each attempt's timeouts are cut to the time left, and a body the driver reads in the loop
    that is still coming in at the deadline is given up on (a read timeout): a long download
    wants ``stream()`` (read outside the loop) or a longer deadline."""
    min_budget: float = 0.5
    """A retry is not started with less than this many seconds left before the deadline (it
    would only time out): the loop stops with ``deadline`` instead of waiting for it."""
    backoff: float = 0.5
    """The first retry's backoff ceiling; it doubles with every retry."""
    max_backoff: float = 10.0
    """The cap on the backoff ceiling."""
    max_retry_after: float = 30.0
    """A longer ``Retry-After`` is waited for this long only."""
    statuses: Collection[int] = RETRY_STATUSES
    """Statuses retried (plus a 409 ``in-progress`` problem while ``retry_in_progress``)."""
    retry_in_progress: bool = True
    key_methods: Collection[str] = frozenset({"POST", "PATCH"})
    """Methods that get an ``Idempotency-Key`` minted when the caller did not send one."""
    header: str = "Idempotency-Key"
    key_factory: Callable[[], str] = new_key
    jitter: Callable[[], float] = random.random
    """A number in [0, 1): the fraction of the backoff ceiling waited (full jitter)."""
    clock: Clock = field(default=SYSTEM_CLOCK)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError("attempts must be at least 1")
        for name in ("deadline", "min_budget", "backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0")
        object.__setattr__(self, "key_methods", _names(self.key_methods, "key_methods"))
        object.__setattr__(self, "statuses", frozenset(self.statuses))
        if not self.header or isinstance(self.header, bytes):
            raise ConfigError("header must be a non-empty str")

    # --- the pure decisions -------------------------------------------------------------

    def wants_key(self, method: str) -> bool:
        """Whether a call with ``method`` and no key gets one minted."""
        return method.upper() in self.key_methods

    def needs_body(self, status: int, content_type: str | None) -> bool:
        """Whether the driver must read the body to classify the response: a 409 problem."""
        return (
            status == 409
            and self.retry_in_progress
            and content_type is not None
            and "json" in content_type.lower()
        )

    def is_retryable(self, outcome: Outcome) -> bool:
        """Whether retrying could fix this outcome (leaving aside whether it is safe)."""
        if isinstance(outcome, Failed):
            return outcome.reach is not Reach.FATAL
        if outcome.status in self.statuses:
            return True
        return outcome.status == 409 and self.retry_in_progress and _is_in_progress(outcome)

    @staticmethod
    def is_safe(call: Call, outcome: Outcome) -> bool:
        """Whether sending the call again cannot execute it twice (or send a spent body).

        A request that never left is always safe. Once it may have reached the server it is
        safe only if the server can tell the attempts are one (a key) or the method is
        idempotent, and only if its body can be sent again.
        """
        if isinstance(outcome, Failed) and outcome.reach is Reach.NOT_SENT:
            return True
        if not call.replayable:
            return False
        return call.key is not None or call.method.upper() in IDEMPOTENT_METHODS

    def backoff_for(self, retry: int) -> float:
        """The wait before retry number ``retry`` (from 1), without ``Retry-After``."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(retry - 1, 64))
        return self.jitter() * ceiling

    def retry_after(self, value: str | None) -> float | None:
        """Seconds a ``Retry-After`` value asks for, capped at ``max_retry_after``; None if
        absent or not one of the two forms RFC 9110 §10.2.3 allows: delta-seconds (ASCII digits
        only: no sign, fraction, exponent or inner space) or an HTTP-date."""
        if value is None:
            return None
        value = value.strip(" \t")
        if _DELTA_SECONDS.fullmatch(value):
            seconds = float(value)  # only digits: at worst inf for a huge number, then capped
        elif _HTTP_DATE.fullmatch(value):
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            if when.tzinfo is None:  # asctime() has no zone: RFC 9110 dates are GMT
                when = when.replace(tzinfo=datetime.UTC)
            seconds = when.timestamp() - self.clock.time()
        else:
            return None
        if math.isnan(seconds):
            return None
        return min(max(0.0, seconds), self.max_retry_after)

    # --- the loop ------------------------------------------------------------------------

    def plan(self, call: Call) -> Generator[Step, Outcome | None, RetryInfo]:
        """The retry loop of one call, as steps for a driver (see the module docstring)."""
        clock = self.clock
        started = clock.monotonic()
        delays: list[float] = []
        outcomes: list[str] = []
        attempt = 0

        def info(outcome: Outcome, stopped: str) -> RetryInfo:
            replayed = isinstance(outcome, Answered) and outcome.replayed
            return RetryInfo(attempt, call.key, replayed, tuple(delays), tuple(outcomes), stopped)

        while True:
            attempt += 1
            budget = None
            if self.deadline is not None:
                budget = max(0.0, self.deadline - (clock.monotonic() - started))
            outcome = yield Attempt(attempt, budget)
            if outcome is None:
                raise RuntimeError("the driver must answer an Attempt with its outcome")
            outcomes.append(outcome.label if isinstance(outcome, Failed) else str(outcome.status))
            if not self.is_retryable(outcome):
                return info(outcome, "final")
            if not self.is_safe(call, outcome):
                return info(outcome, "unsafe")
            if attempt >= self.attempts:
                return info(outcome, "attempts")
            delay = self.backoff_for(attempt)
            if isinstance(outcome, Answered):
                asked = self.retry_after(outcome.retry_after)
                if asked is not None:
                    delay = max(delay, asked)
            if self.deadline is not None:
                # Time in attempts counts as much as time asleep: the clock is read again here.
                left = self.deadline - (clock.monotonic() - started + delay)
                if left <= 0 or left < self.min_budget:
                    return info(outcome, "deadline")
            delays.append(delay)
            yield Wait(delay)


def advance(
    plan: Generator[Step, Outcome | None, RetryInfo], value: Outcome | None
) -> Step | RetryInfo:
    """Send ``value`` (an attempt's outcome, or None) into a plan: its next step, or its result."""
    try:
        return plan.send(value)
    except StopIteration as stop:
        info: RetryInfo = stop.value
        return info


def _is_in_progress(outcome: Answered) -> bool:
    """Whether a 409's body is the ``in-progress`` problem (RFC 9457), whatever the type base.

    A body over :data:`PROBLEM_BODY_LIMIT`, or one the JSON parser gives up on (malformed,
    or nested deeper than the interpreter's recursion limit), is not that problem."""
    body = outcome.body
    if not body or len(body) > PROBLEM_BODY_LIMIT:
        return False
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):
        return False
    kind = document.get("type") if isinstance(document, dict) else None
    if not isinstance(kind, str):
        return False
    for separator in ("/", ":", "#"):
        kind = kind.rpartition(separator)[2]
    return kind == IN_PROGRESS
