"""The engine: the contract's decisions, free of any web framework.

A face (ASGI middleware, gateway, ...) turns its request into a :class:`RequestView` and asks:

1. :meth:`Engine.policy_for` — is this method and path protected? (None: pass through)
2. :meth:`Engine.read_key` — the key, None, or a :class:`Problem` (missing or malformed key).
3. :meth:`Engine.begin` — with the body read, claim the key. The answer is a :class:`Problem`
   to send, a :class:`Replay` to send, or an :class:`Execution` to run the handler under.
4. While the handler answers, the face feeds the response to the Execution, then calls
   :meth:`Execution.finish` (store or release, by status) or :meth:`Execution.abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

from .errors import ClaimLost, ConfigError, CorruptRecord, StoreBusy, StoreError
from .fingerprint import RequestView, default_fingerprint
from .hooks import Decision, Event, Hook, log_decision, log_enabled
from .keys import MalformedKey, find_key
from .policy import Policy, PolicyOptions, Route
from .problems import DEFAULT_PROBLEM_BASE, Problem, ProblemType
from .records import State, StoredResponse
from .scope import ANONYMOUS
from .stores import Store, open_store

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_STORE",
    "Claim",
    "Engine",
    "EngineOptions",
    "Execution",
    "Replay",
    "current_claim",
    "record_id",
]

logger = logging.getLogger("retrysafe")

REPLAYED_HEADER = (b"idempotent-replayed", b"true")
PURGE_INTERVAL = 60.0
"""Seconds between two sweeps of expired records by one engine."""
PURGE_BATCH = 500
UNRELEASED = "the key could not be released; it stays busy until its lease ends"
CLOSE_GRACE = 5.0
"""Seconds :meth:`Engine.aclose` waits for executions still running to end."""
PERSIST_DELAYS = (0.05, 1.0)
"""Seconds between attempts to record an outcome the ledger refused: the first, the most."""
OFFLOAD_BODY = 256 << 10
"""Bodies larger than this are fingerprinted in a worker thread, off the event loop."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored response to send again, marked ``Idempotent-Replayed: true``."""

    response: StoredResponse

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*self.response.headers, REPLAYED_HEADER]

    @property
    def body(self) -> bytes:
        return self.response.body


class Claim:
    """The key a request holds while its handler runs (:func:`current_claim`).

    :meth:`mark` (or :meth:`amark`) lets the handler commit its effect and the ledger's
    "effect committed" mark in ONE transaction of its own database, which must be the ledger's
    (``sqlite:///`` on the app's file, or ``postgresql://`` on the app's database). From then
    on the key is never released or taken over: if the process dies before the response is
    recorded, retries get 410 ``replay-unavailable`` instead of running the effect again. If
    the claim is no longer held (its lease ran out and a retry took the key over), the mark
    raises :class:`~retrysafe.errors.ClaimLost` inside that transaction, which must then roll
    back: the effect is committed by one holder at most.
    """

    __slots__ = ("finished", "marked", "rid", "store", "token", "ttl")

    def __init__(self, store: Store, rid: bytes, token: int, ttl: float = 86400.0) -> None:
        self.store = store
        self.rid = rid
        self.token = token
        self.ttl = ttl
        """How long the record is kept past its lease once marked (the policy's ttl)."""
        self.marked = False
        """Whether a mark was made (its transaction may still have rolled back)."""
        self.finished = False
        """Whether the outcome was recorded or the key released: too late to mark."""

    def mark(self, connection: Any) -> None:
        """Mark the effect committed, in ``connection``'s open transaction (a DB-API
        connection: ``sqlite3``, psycopg). Commit it with the effect."""
        paramstyle = self.store.dbapi_paramstyle
        if paramstyle is None:
            self.store.mark_statement("")  # raises: this ledger cannot take part
        self._check_open()
        if getattr(connection, "autocommit", None) is True or (
            getattr(connection, "isolation_level", "") is None
            and not getattr(connection, "in_transaction", True)
        ):
            raise ConfigError(_NO_TRANSACTION)
        cursor = connection.cursor()
        try:
            cursor.execute(
                self.store.mark_statement(str(paramstyle)), (self.rid, self.token, self.ttl)
            )
            self._marked(cursor.rowcount)
        finally:
            cursor.close()

    async def amark(self, connection: Any) -> None:
        """:meth:`mark` for an asyncpg connection (or psycopg's ``AsyncConnection``), inside
        its transaction (``async with connection.transaction(): ...``)."""
        self._check_open()
        if hasattr(connection, "fetchval"):  # asyncpg: $n parameters, a status string back
            in_transaction = getattr(connection, "is_in_transaction", None)
            if in_transaction is None or not in_transaction():  # a pool, or autocommit
                raise ConfigError(_NO_TRANSACTION)
            sql = self.store.mark_statement("numeric_dollar")
            status: str = await connection.execute(sql, self.rid, self.token, self.ttl)
            self._marked(int(status.rsplit(" ", 1)[-1]))
        else:  # psycopg's AsyncConnection: execute() returns a cursor
            if getattr(connection, "autocommit", None) is True:
                raise ConfigError(_NO_TRANSACTION)
            sql = self.store.mark_statement(str(self.store.dbapi_paramstyle))
            cursor = await connection.execute(sql, (self.rid, self.token, self.ttl))
            self._marked(cursor.rowcount)

    def _check_open(self) -> None:
        if self.finished:
            raise ClaimLost(
                "this request's outcome is already recorded (or its key released): mark the"
                " effect before the response's last byte is sent, not in a background task"
            )

    def _marked(self, rows: int) -> None:
        if rows != 1:
            raise ClaimLost(
                "the claim on this key is no longer held (its lease ran out, and another"
                " request may have taken it over): roll the transaction back"
            )
        self.marked = True


_NO_TRANSACTION = (
    "mark the claim inside the transaction that commits the effect (the connection is in"
    " autocommit, or not in a transaction): a mark committed alone would refuse every retry"
    " of an effect that may never commit"
)
_CURRENT_CLAIM: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "retrysafe_claim", default=None
)


def current_claim() -> Claim | None:
    """The :class:`Claim` of the request being handled, or None: no key, an unprotected
    request, one running unprotected because the ledger failed (``fail_open``), or code that
    runs after its outcome was recorded (a background task)."""
    claim = _CURRENT_CLAIM.get()
    return None if claim is None or claim.finished else claim


DEFAULT_STORE = "sqlite:///retrysafe.db"
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP field name (RFC 9110 5.1: a token)."""
DEFAULT_NAMESPACE = "retrysafe"


def record_id(namespace: bytes, scope: str | bytes | int | None, key: str) -> tuple[bytes, bytes]:
    """Hash (namespace, scope, key) into a record's id; also return the scope's 8-byte tag.

    ``scope`` is what the scope function returned (None: anonymous). The tag is a short hash
    of (namespace, scope) that operators can filter records by; neither the key nor the
    credentials can be read back from either.
    """
    if scope is None:
        raw = ANONYMOUS
    elif isinstance(scope, bytes):
        raw = scope
    else:  # a str, or a user or tenant id of any other type
        raw = str(scope).encode("utf-8", "surrogatepass")
    scoped = b"%s\0%d\0%s" % (namespace, len(raw), raw)
    tag = hashlib.sha256(scoped).digest()[:8]
    return hashlib.sha256(b"%s\0%s" % (scoped, key.encode("ascii"))).digest(), tag


class EngineOptions(PolicyOptions, total=False):
    """Keyword options of :class:`Engine` and of every face built on it."""

    routes: Sequence[Route]
    namespace: str
    header: str
    problem_base: str
    fail_open: bool
    hooks: Iterable[Hook]


class Engine:
    """One ledger, one default policy and its per-route overrides, and the hooks to report to."""

    def __init__(
        self,
        store: Store | str = DEFAULT_STORE,
        *,
        routes: Sequence[Route] = (),
        namespace: str = DEFAULT_NAMESPACE,
        header: str = "Idempotency-Key",
        problem_base: str = DEFAULT_PROBLEM_BASE,
        fail_open: bool = False,
        hooks: Iterable[Hook] = (log_decision,),
        **options: Unpack[PolicyOptions],
    ) -> None:
        for name, value in (("header", header), ("namespace", namespace)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, not {value!r}")
        if not _FIELD_NAME.fullmatch(header):
            raise ConfigError(f"header must be an HTTP field name, not {header!r}")
        if not isinstance(problem_base, str):
            raise ConfigError(f"problem_base must be a string, not {problem_base!r}")
        self.store = open_store(store) if isinstance(store, str) else store
        self.policy = Policy().with_options(options)
        self.routes = [(route, self.policy.with_options(route.options)) for route in routes]
        self.namespace = namespace.encode()
        self.header = header.lower().encode("latin-1")
        self.header_name = header
        self.problem_base = problem_base
        self.fail_open = fail_open
        self.hooks = list(hooks)
        self.counts: Counter[Event] = Counter()
        """How many times each event happened in this process."""
        self._next_purge = 0.0
        self._background: set[asyncio.Task[None]] = set()
        # One timer per engine renews the leases of every running execution, rather than one
        # timer per request: most requests end long before their first renewal is due.
        self._running: dict[Execution, None] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._tick_loop: asyncio.AbstractEventLoop | None = None
        shortest = min(p.lease for p in [self.policy, *(p for _, p in self.routes)])
        self._tick_every = shortest / 3
        wait = getattr(self.store, "timeout", None) or getattr(self.store, "busy_timeout", None)
        if isinstance(wait, int | float) and wait > shortest * 2 / 3:
            # Renewals come a third of a lease apart: one that hangs for the ledger's whole
            # timeout outlives the lease, and a duplicate may take the key over meanwhile.
            logger.warning(
                "retrysafe: a lease of %gs is short for a ledger whose operations may take %gs"
                " (its timeout): a slow ledger can let a duplicate take over a running"
                " handler; keep the lease at least 1.5x the ledger's timeout",
                shortest, wait,
            )  # fmt: skip
        self._log_only = self.hooks == [log_decision]
        self._closing = False
        self._orphans: dict[tuple[bytes, int], tuple[float, float]] = {}
        """Claims to give back (record id, token): until when (monotonic) to try, and the
        claim's lease."""
        self._releasing: asyncio.Task[None] | None = None

    # -- reporting --------------------------------------------------------------------------

    def report(
        self,
        event: Event,
        request: RequestView,
        rid: bytes = b"",
        status: int | None = None,
        detail: str = "",
    ) -> None:
        """Count ``event`` and pass it to every hook."""
        self.counts[event] += 1
        if not self.hooks or (self._log_only and not log_enabled(event)):
            return
        decision = Decision(event, request.method, request.path, rid[:6].hex(), status, detail)
        for hook in self.hooks:
            try:
                hook(decision)
            except Exception:
                logger.exception("retrysafe hook %r failed", hook)

    # -- the steps of a request -------------------------------------------------------------

    def policy_for(self, method: str, path: str) -> Policy | None:
        """Return the policy protecting ``method`` on ``path``, or None to pass through."""
        policy = self.policy
        for route, route_policy in self.routes:
            if route.matches(path):
                policy = route_policy
                break
        return policy if method in policy.methods else None

    def read_key(self, request: RequestView, policy: Policy) -> str | Problem | None:
        """Return the request's key; a Problem if it is malformed or required and absent."""
        try:
            key = find_key(request.headers, self.header)
        except MalformedKey as exc:
            self.report(Event.MALFORMED_KEY, request, status=400, detail=str(exc))
            return Problem(ProblemType.MALFORMED_KEY, f"{self.header_name}: {exc}.")
        if key is None and policy.require_key:
            self.report(Event.MISSING_KEY, request, status=400)
            return Problem(
                ProblemType.MISSING_KEY,
                f"{request.method} {request.path} needs {self.header_name}.",
            )
        return key

    def body_too_large(self, request: RequestView, policy: Policy) -> Problem:
        """The refusal of a request whose body exceeds ``policy.max_request_body``."""
        self.report(Event.BODY_TOO_LARGE, request, status=413)
        return Problem(
            ProblemType.BODY_TOO_LARGE,
            f"Requests with {self.header_name} may carry at most {policy.max_request_body} bytes.",
        )

    def record_id(self, request: RequestView, key: str, policy: Policy) -> tuple[bytes, bytes]:
        """Hash (namespace, scope, key) into the record's id; also return the scope's tag.

        The tag is a short hash of (namespace, scope) that operators can filter records by;
        neither the key nor the credentials can be read back from either.
        """
        return record_id(self.namespace, policy.scope_function(request), key)

    def fingerprint(self, request: RequestView, policy: Policy) -> bytes:
        if policy.fingerprint is not None:
            return hashlib.sha256(policy.fingerprint(request)).digest()
        return default_fingerprint(request, policy.exclude_fields)

    async def begin(
        self, request: RequestView, key: str, policy: Policy
    ) -> Execution | Replay | Problem:
        """Claim ``key`` for ``request`` (whose body is read) and say what the face must do."""
        try:
            rid, scope = self.record_id(request, key, policy)
            if len(request.body) > OFFLOAD_BODY:  # canonicalising MiBs of JSON takes a while
                fingerprint = await asyncio.to_thread(self.fingerprint, request, policy)
            else:
                fingerprint = self.fingerprint(request, policy)
        except Exception as exc:  # the app's own scope or fingerprint function failed
            # Its message may quote the credentials it was parsing: only the type is told.
            self.report(Event.IDENTITY_FAILED, request, status=400, detail=type(exc).__name__)
            return Problem(
                ProblemType.MALFORMED_REQUEST,
                "Who sent this request, or what it asks, could not be worked out from it"
                " (the server's scope or fingerprint function failed); it was not executed.",
            )
        deadline = time.monotonic() + policy.wait
        self._maybe_purge()
        dropped = 0
        while True:
            # Unique, not secret: ``random`` is reseeded in every forked worker.
            token = random.getrandbits(63)
            try:
                record = await self.store.claim(
                    rid, token, fingerprint, policy.lease, policy.ttl, scope=scope
                )
            except asyncio.CancelledError:
                # Cancelled while the claim was written (a timeout middleware, a shutdown): it
                # may have landed with nobody left to run, renew or release it, a 409 for a
                # whole lease. Give it back, fenced by this token that no one else holds.
                self._release_later(rid, token, policy.lease)
                raise
            except CorruptRecord as exc:
                corrupt_token, why = exc.token, str(exc)
            except StoreError as exc:
                if not isinstance(exc, StoreBusy):
                    # No answer (a timeout, a connection lost): the claim may still land, once
                    # the ledger is reachable again, with nobody to run or release it. Busy
                    # means refused: nothing was written.
                    self._release_later(rid, token, policy.lease)
                return self._store_failed(request, rid, exc)
            else:
                if record is None:
                    self.report(Event.EXECUTED, request, rid)
                    return Execution(self, request, policy, rid, token)
                if record.fingerprint != fingerprint:
                    self.report(Event.KEY_REUSED, request, rid, 422)
                    return Problem(
                        ProblemType.KEY_REUSED,
                        f"This {self.header_name} was used for a different request"
                        " (method, path, query or body); use a new key for a new request.",
                    )
                if record.state is State.NOT_REPLAYABLE:
                    self.report(Event.REPLAY_UNAVAILABLE, request, rid, 410)
                    return Problem(
                        ProblemType.REPLAY_UNAVAILABLE,
                        f"The request with this {self.header_name} was executed, but its response"
                        " could not be kept (too large, or not whole); it will not be executed"
                        " again.",
                    )
                if record.state is State.IN_FLIGHT or record.state is State.COMMITTED:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.report(Event.IN_PROGRESS, request, rid, 409)
                        return Problem(
                            ProblemType.IN_PROGRESS,
                            f"A request with this {self.header_name} is being processed;"
                            " retry later.",
                            retry_after=1,
                        )
                    try:
                        await self.store.wait(rid, remaining)
                    except StoreError as exc:
                        # The original may still be running: never let it run twice.
                        return self._store_failed(request, rid, exc, may_fail_open=False)
                    continue
                try:
                    response = StoredResponse.decode(record.response or b"")
                except ValueError as exc:
                    corrupt_token, why = record.token, str(exc)
                else:
                    self.report(Event.REPLAYED, request, rid, response.status)
                    return Replay(response)
            # The record cannot be decoded: it counts as absent. Drop that very version and
            # claim again, a few times at most.
            self.report(Event.CORRUPT_RECORD, request, rid, detail=why)
            dropped += 1
            if dropped > 2:
                error = StoreError("a corrupt record keeps coming back")
                return self._store_failed(request, rid, error, may_fail_open=False)
            with contextlib.suppress(StoreError):  # the next claim reports the store's state
                await self.store.release(rid, corrupt_token)

    def _store_failed(
        self, request: RequestView, rid: bytes, exc: StoreError, *, may_fail_open: bool = True
    ) -> Execution | Problem:
        # Fail open only when the ledger is down, never when it is merely busy: under load
        # that would turn contention into duplicate executions.
        if self.fail_open and may_fail_open and not isinstance(exc, StoreBusy):
            self.report(Event.FAIL_OPEN, request, rid, detail=str(exc))
            return Execution(self, request, None, rid, 0)
        self.report(Event.STORE_ERROR, request, rid, 503, str(exc))
        return Problem(
            ProblemType.STORE_UNAVAILABLE,
            "The idempotency ledger is unavailable; the request was not executed. Retry later.",
            retry_after=1,
        )

    # -- background work --------------------------------------------------------------------

    def _release_later(self, rid: bytes, token: int, lease: float) -> None:
        """Release a claim that may have landed although its request got no answer from the
        ledger (fenced by ``token``, which nobody else holds: harmless if it never landed).

        One task works through all of them, again and again while the ledger fails, and for
        up to one lease after the ledger last failed (a claim that lands late, when the
        ledger answers again, lapses by itself one lease after that)."""
        self._orphans[(rid, token)] = (time.monotonic() + lease, lease)
        task = self._releasing
        # A task left pending on another loop (closed without cancelling it, or the parent's
        # before a fork) would never run again: this loop gets its own.
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._releasing = self.spawn(self._release_orphans())

    async def _release_orphans(self) -> None:
        delay = PERSIST_DELAYS[0]
        while self._orphans:
            failed = 0.0
            this_round = list(self._orphans.items())
            for key, (until, lease) in this_round:
                if time.monotonic() >= until:
                    self._orphans.pop(key, None)
                    continue
                try:
                    await self.store.release(*key)
                except (StoreError, CorruptRecord):
                    failed = lease
                    # The ledger still fails: the others wait for the next round, which starts
                    # after this one (a key whose shard is down must not hold back the rest).
                    if self._orphans.pop(key, None) is not None:
                        self._orphans[key] = (until, lease)
                    break
                self._orphans.pop(key, None)
            if self._closing:
                for key, _ in this_round:  # one round at close, not one lease; claims given
                    self._orphans.pop(key, None)  # up meanwhile still get theirs
            elif failed:
                # Each claim may still land once the ledger answers again: keep every one
                # until a lease after this failure.
                now = time.monotonic()
                for key, (until, lease) in list(self._orphans.items()):
                    self._orphans[key] = (max(until, now + lease), lease)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_DELAYS[1], failed / 10)

    def watch(self, execution: Execution) -> None:
        """Renew ``execution``'s lease until :meth:`unwatch` (the heartbeat)."""
        self._running[execution] = None
        loop = asyncio.get_running_loop()
        if self._tick is None or self._tick_loop is not loop:
            self._tick_loop = loop
            self._tick = loop.call_later(self._tick_every, self._heartbeat)

    def unwatch(self, execution: Execution) -> None:
        self._running.pop(execution, None)

    def _heartbeat(self) -> None:
        self._tick = None
        loop = self._tick_loop
        if not self._running or loop is None:
            return  # re-armed by the next watch()
        # Renew what falls due before the next tick, so that no lease goes unrenewed for more
        # than lease/3 whatever the phase between a claim and the ticks.
        horizon = loop.time() + self._tick_every
        now = loop.time()
        for execution in list(self._running):
            if execution.renew_at <= horizon:
                execution.renew_at = now + execution.renew_every
                self.spawn(execution.renew())
        self._tick = loop.call_later(self._tick_every, self._heartbeat)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coroutine`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def detach(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` (a ledger write) in a task of the engine's and wait for it; if
        the caller is cancelled meanwhile, the write goes on and :meth:`aclose` waits for it."""
        await asyncio.shield(self.spawn(coroutine))

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            self.spawn(self._purge())

    async def _purge(self) -> None:
        try:
            for _ in range(1000):  # bounded: at most this many batches per sweep
                if await self.store.purge_expired(PURGE_BATCH) < PURGE_BATCH:
                    break
        except StoreError as exc:
            logger.warning("retrysafe: purging expired records failed: %s", exc)

    async def aclose(self) -> None:
        """Wait for running executions (a while) and background work, then close the store.

        Servers cancel the requests still running at their shutdown timeout and then close
        the app at once: the cancelled requests' last ledger writes are let through first.
        """
        deadline = time.monotonic() + CLOSE_GRACE
        self._closing = True  # outcomes still being recorded again get one more attempt
        try:
            await asyncio.sleep(0)  # cancelled requests start their last writes
            loop, me = asyncio.get_running_loop(), asyncio.current_task()
            # Executions end in other tasks' code: polled, briefly, rather than signalled.
            # Never the caller's own (an app closing the layer from a request).
            while time.monotonic() < deadline and any(  # noqa: ASYNC110
                e.task is not me and e.task is not None and e.task.get_loop() is loop
                for e in self._running
            ):
                await asyncio.sleep(0.01)
            # This loop's only: a task left pending on a closed loop can never be awaited.
            if tasks := [t for t in self._background if t.get_loop() is loop]:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self.store.aclose()
        finally:
            self._closing = False  # a layer may serve again after its close (a new lifespan)


class Execution:
    """A claimed key while its handler runs: heartbeat, response capture, final write.

    Feed it the response as it is sent (:meth:`start`, :meth:`feed`), then call :meth:`finish`
    once the last byte is known, or :meth:`abort` if the handler failed. With ``policy`` None
    (the ledger failed and ``fail_open`` is on) the request runs unprotected and nothing is kept.
    """

    __slots__ = (
        "_body",
        "_declared",
        "_done",
        "_headers",
        "_refused",
        "_size",
        "_status",
        "_trailers",
        "claim",
        "engine",
        "policy",
        "renew_at",
        "renew_every",
        "request",
        "rid",
        "task",
        "token",
    )

    def __init__(
        self, engine: Engine, request: RequestView, policy: Policy | None, rid: bytes, token: int
    ) -> None:
        self.engine = engine
        self.request = request
        self.policy = policy
        self.rid = rid
        self.token = token
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] | None = []
        self._size = 0
        self._declared: int | None = None
        self._trailers = False
        self._refused = False
        self._done = policy is None
        self.claim = None if policy is None else Claim(engine.store, rid, token, policy.ttl)
        """What the handler sees as :func:`current_claim` (None when running unprotected)."""
        self.renew_every = 0.0 if policy is None else policy.lease / 3
        self.task = asyncio.current_task()
        """The request's task (its loop is the one the execution lives on)."""
        self.renew_at = asyncio.get_running_loop().time() + self.renew_every
        """When the engine's heartbeat renews the lease next (event loop time)."""
        if policy is not None:
            engine.watch(self)

    async def renew(self) -> None:
        """Renew the lease (called by the engine's heartbeat).

        A renewal the ledger refused is tried again soon, not at the next heartbeat a third
        of a lease later. The lease in the ledger still ends one lease after the last renewal
        that went through (up to a third of a lease before the outage began): a running
        handler is sure to ride out an outage of two thirds of its lease.
        """
        policy = self.policy
        assert policy is not None
        loop = asyncio.get_running_loop()
        delay, most = PERSIST_DELAYS[0], policy.lease / 10
        failed = False
        # One renewal at a time: the heartbeat leaves this execution alone until it ends (a
        # renewal hanging for the ledger's timeout would otherwise get a twin every tick).
        next_at, self.renew_at = self.renew_at, math.inf
        try:
            while True:
                try:
                    held = await self.engine.store.renew(self.rid, self.token, policy.lease)
                    break
                except (StoreError, CorruptRecord) as exc:
                    if not failed:  # reported once per outage, not once per attempt
                        self.engine.report(
                            Event.STORE_ERROR, self.request, self.rid, None,
                            f"the lease could not be renewed, will retry: {exc}",
                        )  # fmt: skip
                    failed = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, most)
                    if self._done:
                        return
                    if self.engine._closing:
                        next_at = loop.time()  # still running: the heartbeat's again
                        return
            if failed:
                next_at = loop.time() + self.renew_every
        finally:
            self.renew_at = next_at
        if not held and not self._done:
            self.engine.unwatch(self)
            self.engine.report(
                Event.LEASE_LOST, self.request, self.rid, detail="the claim was taken over"
            )

    def _stop(self) -> bool:
        """Mark the execution done; False if it already was."""
        if self._done:
            return False
        self._done = True
        if self.claim is not None:
            self.claim.finished = True
        self.engine.unwatch(self)
        return True

    # -- response capture -------------------------------------------------------------------

    def start(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], *, trailers: bool = False
    ) -> None:
        """Record the response's status and the headers that may be replayed; ``trailers``:
        the response announces trailers, which a record cannot hold (kept not replayable)."""
        self._status = status
        self._trailers = trailers
        if self.policy is not None:
            headers = list(headers)
            self._declared = self._declared_length(status, headers)
            denied = self.policy.denied_header_bytes
            for name, value in headers:
                if name.lower() == b"connection":  # it names more hop-by-hop headers (RFC 9110)
                    denied = denied.union(v.strip() for v in value.lower().split(b","))
            self._headers = [(name, value) for name, value in headers if name.lower() not in denied]

    def _declared_length(self, status: int, headers: list[tuple[bytes, bytes]]) -> int | None:
        """The body length the response declares (0 for 204 and 304, which have none); -1 if
        it declares it unusably; None if it declares none, or answers a HEAD."""
        if self.request.method == "HEAD":
            return None  # a HEAD response declares the length of a body it omits
        if status in (204, 304):
            return 0  # bodiless whatever they declare (a 304 may give the 200's length)
        lengths = {v.strip() for n, v in headers if n.lower() == b"content-length"}
        if not lengths:
            return None
        if len(lengths) > 1:
            return -1  # two different lengths: no client can frame it
        value = lengths.pop()
        return int(value) if value.isdigit() and len(value) < 19 else -1

    def feed(self, chunk: bytes) -> None:
        """Record one chunk of the response body; past the storable size, keep only the count."""
        if self.policy is None:
            return
        self._size += len(chunk)
        if self._body is None:
            return
        if self._size > self.policy.max_response_body:
            self._body = None
        elif chunk:
            # Copy a mutable buffer (bytearray, memoryview): the app may reuse it for the next
            # chunk once the server has written this one, which would change the stored copy.
            self._body.append(chunk if type(chunk) is bytes else bytes(chunk))

    async def finish(self, cut_short: str = "") -> None:
        """The response is complete, or with ``cut_short`` (why) it began and will not end:
        store it if its status is final (as not replayable unless whole), else release the key.
        """
        if self._done:
            return
        assert self.policy is not None
        try:
            final = bool(self._status) and self.policy.store_status(self._status)
        except BaseException:
            await self.abort("the store_status policy raised an exception")
            raise
        if not final:
            await self.abort(cut_short)
            return
        engine, rid = self.engine, self.rid
        # The handler ran: whatever is kept, its retries never run it again (rule 18).
        state, data, event, detail = State.NOT_REPLAYABLE, None, Event.NOT_REPLAYABLE, ""
        if cut_short and not self._all_sent():
            detail = f"the response was cut short ({cut_short}); kept as not replayable"
        elif self._body is None:
            pass  # too large to keep
        elif self._trailers:
            detail = "its trailers cannot be recorded; kept as not replayable"
        elif not self._length_matches():
            event = Event.BROKEN_RESPONSE
            expected = "none" if self._declared == 0 else "its Content-Length"
            detail = f"its body ({self._size} bytes) is not {expected}; kept as not replayable"
        else:
            try:
                body = b"".join(self._body)
                data = StoredResponse(self._status, self._headers, body).encode()
                state, event = State.DONE, Event.STORED
            except Exception as exc:  # headers that are not bytes, too many, ...
                event = Event.BROKEN_RESPONSE
                detail = f"its headers cannot be recorded ({exc}); kept as not replayable"
        self._stop()
        try:
            held = await engine.store.complete(rid, self.token, state, data, self.policy.ttl)
        except asyncio.CancelledError:
            # Cancelled mid-write (a server's shutdown): the write may not have happened. It
            # is fenced by token, so it is simply made again, in a task aclose() waits for.
            engine.spawn(
                self._again(engine.store.complete(rid, self.token, state, data, self.policy.ttl))
            )
            raise
        except (StoreError, CorruptRecord) as exc:
            # The client gets its response all the same (rule 21). A ledger that failed once
            # (a failover, a lock) may take the write a moment later: until the lease ends
            # the key is still this execution's, so the outcome is recorded then, and a
            # retry replays it instead of running the handler again once the lease ends.
            self._lost(f"the outcome was not recorded ({exc}); trying again for one lease")
            engine.spawn(self._persist(state, data, event, detail))
            return
        self._recorded(held, event, detail)

    def _recorded(self, held: bool, event: Event, detail: str) -> None:
        if not held:
            self.engine.report(
                Event.LEASE_LOST,
                self.request,
                self.rid,
                self._status,
                "the outcome was not recorded",
            )
        else:
            self.engine.report(event, self.request, self.rid, self._status, detail)

    async def _persist(self, state: State, data: bytes | None, event: Event, detail: str) -> None:
        """Record the outcome the ledger refused, again and again until one lease has passed
        (fenced by token: a retry that took the key over since is never overwritten)."""
        engine, policy = self.engine, self.policy
        assert policy is not None
        give_up = time.monotonic() + policy.lease
        delay, most = PERSIST_DELAYS[0], min(PERSIST_DELAYS[1], policy.lease / 10)
        while True:
            await asyncio.sleep(
                0 if engine._closing else min(delay, max(0.0, give_up - time.monotonic()))
            )
            try:
                held = await engine.store.complete(self.rid, self.token, state, data, policy.ttl)
            except (StoreError, CorruptRecord) as exc:
                if engine._closing or time.monotonic() >= give_up:
                    self._lost(f"the outcome was not recorded; the lease bounds the key: {exc}")
                    return
                delay = min(delay * 2, most)
                continue
            self._recorded(held, event, f"recorded late{f': {detail}' if detail else ''}")
            return

    def _lost(self, detail: str) -> None:
        self.engine.report(Event.STORE_ERROR, self.request, self.rid, self._status or None, detail)

    def _all_sent(self) -> bool:
        """Whether the body sent is all the response declared (a HEAD answer declares none)."""
        declared = 0 if self.request.method == "HEAD" else self._declared
        return declared is not None and declared == self._size

    def _length_matches(self) -> bool:
        """False if the response declares a Content-Length its body does not have."""
        return self._declared is None or self._declared == self._size

    @property
    def overflowed(self) -> bool:
        """Whether the body sent so far is longer than the response's own Content-Length.

        The server refuses such a response (uvicorn raises from ``send``): it is recorded
        at once, before that failure reaches the app and would release the key.
        """
        return self._declared is not None and self._size > self._declared

    async def abort(self, reason: str = "the handler failed") -> None:
        """The handler failed, never answered or answered a status that is not final: release
        the key for a retry."""
        if not self._stop():
            return
        try:
            await self._give_back(reason)
        except asyncio.CancelledError:
            self.engine.spawn(self._again(self._give_back(reason)))  # as in finish()
            raise

    @staticmethod
    async def _again(write: Coroutine[Any, Any, object]) -> None:
        """A fenced ledger write made again after a cancellation; its failure is the lease's
        to bound, as for any write that fails."""
        with contextlib.suppress(StoreError, CorruptRecord):
            await write

    async def _give_back(self, reason: str) -> None:
        """Release the key; or, if the handler marked its effect committed, keep it.

        Made again after a cancellation, it resumes where it stopped: once the release was
        refused (a mark), releasing again could delete the not-replayable record it kept.
        """
        try:
            released = False
            if not self._refused:
                released = await self.engine.store.release(self.rid, self.token)
                self._refused = not released
            if not released and self.claim is not None and self.claim.marked:
                # Its effect was committed with the mark: never run it again (a mark whose
                # transaction rolled back leaves the record releasable, as released above).
                assert self.policy is not None
                kept = await self.engine.store.complete(
                    self.rid, self.token, State.NOT_REPLAYABLE, None, self.policy.ttl
                ) or await self._holds(State.NOT_REPLAYABLE)  # kept by a cancelled attempt
                if kept:
                    event, detail = (
                        Event.NOT_REPLAYABLE,
                        (f"{reason} after committing its effect; kept as not replayable"),
                    )
                else:  # gone: its mark rolled back, and the record expired or was deleted
                    event, detail = Event.LEASE_LOST, f"{reason}; the claim was no longer held"
                self.engine.report(event, self.request, self.rid, self._status or None, detail)
                return
            if not released and await self._taken_over():
                detail = f"{reason}; the key had been taken over, nothing was released"
                self.engine.report(
                    Event.LEASE_LOST, self.request, self.rid, self._status or None, detail
                )
                return
        except (StoreError, CorruptRecord) as exc:
            self._lost(f"{UNRELEASED}: {exc}")
            return
        self.engine.report(Event.RELEASED, self.request, self.rid, self._status or None, reason)

    async def _holds(self, state: State) -> bool:
        """Whether the ledger holds this claim's record in ``state``."""
        record = await self.engine.store.get(self.rid)
        return record is not None and record.token == self.token and record.state is state

    async def _taken_over(self) -> bool:
        """Whether another claim holds the key now (a release that found none did nothing)."""
        record = await self.engine.store.get(self.rid)
        return record is not None and record.token != self.token
