"""The ASGI face: :class:`IdempotencyMiddleware`, a pure ASGI middleware over the engine.

It wraps ``receive`` and ``send`` and nothing else: no task per request, no response buffering.
Non-HTTP scopes and unprotected requests go straight to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Unpack

from .engine import _CURRENT_CLAIM, DEFAULT_STORE, Engine, EngineOptions, Execution, Replay
from .errors import ConfigError, ResponseCutShort
from .fingerprint import RequestView
from .policy import Policy
from .problems import Problem
from .stores import Store

__all__ = ["IdempotencyMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


class IdempotencyMiddleware:
    """Give an ASGI app the ``Idempotency-Key`` contract.

    ``IdempotencyMiddleware(app, store="sqlite:///retrysafe.db", ttl=86400, lease=15, ...)``;
    with Starlette or FastAPI, ``app.add_middleware(IdempotencyMiddleware, store=...)``.
    Policy options (``methods``, ``require_key``, ``ttl``, ``lease``, ``wait``, ...) set the
    default; ``routes=[Route("/payments/**", require_key=True)]`` override it per path.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | str | None = None,
        engine: Engine | None = None,
        **options: Unpack[EngineOptions],
    ) -> None:
        self.app = app
        if engine is not None:
            if store is not None or options:
                raise ConfigError("pass either engine= or the store and options, not both")
            self.engine = engine
        else:
            self.engine = Engine(DEFAULT_STORE if store is None else store, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_send(send))
            else:
                await self.app(scope, receive, send)
            return
        engine = self.engine
        policy = engine.policy_for(scope["method"], _route_path(scope))
        if policy is None or engine.namespace in scope.get(CLAIMED, ()):
            # Unprotected, or inside a layer of the same namespace that already holds the
            # claim (a second claim would find the first in flight: 409 forever).
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if not policy.require_key and not _has_header(headers, engine.header):
            await self.app(scope, receive, send)  # the common case: no key, nothing to do
            return
        request = RequestView(
            scope["method"], scope["path"], scope.get("query_string", b""), headers, b""
        )
        key = engine.read_key(request, policy)
        if key is None:
            await self.app(scope, receive, send)
            return
        if isinstance(key, Problem):
            await self._send_problem(send, key)
            return
        try:
            body = await _read_body(request, receive, policy)
        except _Disconnected:
            return  # nobody to answer, nothing claimed, nothing executed
        if body is None:
            await self._send_problem(send, engine.body_too_large(request, policy))
            return
        request.body = body
        answer = await engine.begin(request, key, policy)
        if isinstance(answer, Problem):
            await self._send_problem(send, answer)
        elif isinstance(answer, Replay):
            await send(
                {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
            )
            await send({"type": "http.response.body", "body": answer.body})
        else:
            # The scope object itself is passed on, changed for the app's time only: middleware
            # outside reads what the app's router writes into it (route, path_params).
            extensions: dict[str, Any] = scope.get("extensions") or {}
            hidden: dict[str, Any] | None = None
            if any(name in extensions for name in _FILE_SENDS):
                # A file sent by reference would never pass through us to be recorded.
                hidden = scope["extensions"] = {
                    name: value for name, value in extensions.items() if name not in _FILE_SENDS
                }
            outer = scope.get(CLAIMED)
            scope[CLAIMED] = (*(outer or ()), engine.namespace)
            try:
                await _Responder(self.app, answer, body)(scope, receive, send)
            finally:
                current: dict[str, Any] | None = scope.get("extensions")
                if hidden is not None and current is hidden:
                    # The file sends back, and whatever the app put in meanwhile.
                    back = dict(current)
                    back.update((n, v) for n, v in extensions.items() if n in _FILE_SENDS)
                    scope["extensions"] = back
                if outer is None:
                    scope.pop(CLAIMED, None)
                else:
                    scope[CLAIMED] = outer

    def _closing_send(self, send: Send) -> Send:
        """Close the ledger when the app reports its shutdown complete."""

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.engine.aclose()
            await send(message)

        return closing_send

    async def _send_problem(self, send: Send, problem: Problem) -> None:
        body = problem.body(self.engine.problem_base)
        await send(
            {
                "type": "http.response.start",
                "status": problem.status,
                "headers": problem.headers(len(body)),
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def aclose(self) -> None:
        """Close the ledger (for apps that manage their own lifespan)."""
        await self.engine.aclose()


_FILE_SENDS = ("http.response.pathsend", "http.response.zerocopysend")
CLAIMED = "retrysafe.claimed"
"""The scope key naming the namespaces whose layers hold a claim for this request: an inner
layer of one of them passes the request through."""


def _route_path(scope: Scope) -> str:
    """The path routes are matched against: without the ``root_path`` the app is mounted
    under (as Starlette routes), so that ``Route("/charges")`` means the same under
    ``uvicorn --root-path /api`` or a ``Mount``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    size = len(name)
    return any(len(header) == size and header.lower() == name for header, _ in headers)


async def _read_body(request: RequestView, receive: Receive, policy: Policy) -> bytes | None:
    """Read the whole request body; None if it exceeds the policy's limit."""
    limit = policy.max_request_body
    declared = request.header(b"content-length")
    if declared is not None:
        digits = declared.strip().lstrip(b"0")
        # Longer than the limit's own digits is larger: never int() thousands of digits
        # (Python refuses them with a ValueError, which would be a 500).
        if digits.isdigit() and (len(digits) > len(str(limit)) or int(digits) > limit):
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the common case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


class _Responder:
    """Runs the app for one claimed request: replays the body read, watches the response."""

    __slots__ = (
        "app",
        "body",
        "body_sent",
        "complete",
        "disconnect",
        "execution",
        "gave_up",
        "gone_at",
        "hold_until",
        "receive",
        "send",
    )

    def __init__(self, app: ASGIApp, execution: Execution, body: bytes) -> None:
        self.app = app
        self.execution = execution
        self.body = body
        self.body_sent = False
        self.gone_at: float | None = None
        """When sending to the client first failed: the client is gone."""
        self.gave_up: OSError | None = None
        """What this layer raised to stop an app streaming to a client long gone."""
        self.complete = asyncio.Event()
        """Set once the app has sent its whole response (or has returned)."""
        self.disconnect: Message | None = None
        """The server's ``http.disconnect``, once heard: held back, then given on every call."""
        self.hold_until = 0.0
        """Until when the disconnect is held back: one lease after it was first heard."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send
        claimed = _CURRENT_CLAIM.set(self.execution.claim)
        try:
            await self.app(scope, self.wrapped_receive, self.wrapped_send)
        except BaseException as exc:
            if isinstance(exc, ResponseCutShort):
                await self.execution.finish(cut_short=str(exc) or "the app could not finish it")
            elif isinstance(exc, asyncio.CancelledError):
                # The server stopped the request (its shutdown timeout ran out, say): not the
                # app's failure. After a final status the handler has run, so that status
                # decides, as on a return; before any, the key is released. The write runs
                # in a task of the engine's, which its close waits for: this task may be
                # cancelled again (anyio cancels at every await) or the loop torn down.
                await self.execution.engine.detach(
                    self.execution.finish(cut_short="the server cancelled the request")
                )
            elif self.gave_up is not None and _caused_by(exc, self.gave_up):
                # This layer stopped the stream (frameworks may turn that into an error of
                # their own): the status already sent decides, as on a return.
                await self.execution.finish(cut_short="the client left")
            else:
                await self.execution.abort("the handler raised an exception")
            raise
        finally:
            _CURRENT_CLAIM.reset(claimed)
            self.complete.set()
        # Returned without finishing its response: after a status it had sent, the handler ran
        # (a stream stopped because its client left, say), so that status decides (rule 14);
        # with none, there is no outcome and the key is released.
        await self.execution.finish(cut_short="the handler returned before the end of its body")

    async def wrapped_receive(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        policy = self.execution.policy
        if self.disconnect is not None:
            # Heard already: a server may say it only once, and the app may ask again.
            message: Message = dict(self.disconnect)
        else:
            message = await self.receive()
        if message["type"] == "http.disconnect" and policy is not None:
            # The client left, but the handler has run for this key: hold the news back (for
            # one lease at most) so that an app that stops streaming at a disconnect, such as
            # Starlette's StreamingResponse, still completes the response kept for the retry.
            # The lease counts from the first time it was heard, not from each call: an app
            # that polls (Starlette's is_disconnected() cancels its receive at once) would
            # otherwise restart the hold on every poll and never hear of it.
            if self.disconnect is None:
                self.disconnect = dict(message)
                self.hold_until = time.monotonic() + policy.lease
            remaining = self.hold_until - time.monotonic()
            if remaining > 0 and not self.complete.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.complete.wait(), remaining)
        return message

    async def wrapped_send(self, message: Message) -> None:
        kind = message["type"]
        final = False
        if kind == "http.response.start":
            headers = message.get("headers", ())
            if not isinstance(headers, list | tuple):
                # ASGI allows any iterable: read a one-shot one (a generator) once, for both
                # the ledger and the server, or the client would get no headers at all.
                headers = list(headers)
                message = {**message, "headers": headers}
            self.execution.start(
                message["status"], headers, trailers=bool(message.get("trailers", False))
            )
        elif kind == "http.response.body":
            self.execution.feed(message.get("body", b""))
            if not message.get("more_body", False) or self.execution.overflowed:
                # Recorded before the last byte leaves: a client that saw the answer can
                # rely on a retry replaying it. A body past its own Content-Length is
                # recorded (not replayable) before the server refuses it: that refusal
                # reaches the app as an exception, which must not release the key.
                await self.execution.finish()
                final = True
        if self.gone_at is None:
            try:
                await self.send(message)
            except OSError:
                if self.execution.policy is None:
                    raise  # running unprotected (fail-open): nothing to keep
                # The client left (ASGI 2.4 servers say so by raising). The handler has run
                # for this key, so let the app finish its response for the ledger instead
                # of failing mid-stream and releasing the key into a second execution.
                self.gone_at = time.monotonic()
        elif self.execution.policy is not None and (
            time.monotonic() - self.gone_at > self.execution.policy.lease
        ):
            # An endless stream: give up after a lease.
            self.gave_up = OSError("the client disconnected")
            raise self.gave_up
        if final:
            self.complete.set()


def _caused_by(exc: BaseException, cause: BaseException) -> bool:
    """Whether ``exc`` is ``cause`` or was raised while handling it (or from it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if current is cause:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
