"""The httpx face: :class:`RetryTransport` / :class:`AsyncRetryTransport` wrap any httpx transport
with the retry loop of :mod:`retrysafe.client.policy`; :class:`Client` / :class:`AsyncClient`
are ``httpx.Client`` / ``httpx.AsyncClient`` with those transports and named operations.

Exceptions are classified for the policy like this::

    httpx.TransportError
    ├── ConnectError, ConnectTimeout, PoolTimeout      not sent: always retried
    ├── ReadError, WriteError, CloseError,
    │   ReadTimeout, WriteTimeout, RemoteProtocolError maybe sent: retried if keyed or idempotent
    └── LocalProtocolError, UnsupportedProtocol,
        ProxyError, and a ConnectError caused by an
        ssl.SSLError (a certificate that does not
        verify, a failed handshake)                    fatal: never retried

A ConnectError caused by a handshake cut short (``ssl.SSLEOFError``: the peer closed the
connection, as a draining load balancer does) is not sent, and retried.
"""

from __future__ import annotations

import os
import ssl
import typing
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TypedDict, Unpack

import httpx

from ..errors import ConfigError
from .journal import KeyJournal
from .policy import (
    PROBLEM_BODY_LIMIT,
    Answered,
    Attempt,
    Call,
    Failed,
    Outcome,
    Reach,
    RetryInfo,
    RetryPolicy,
    Wait,
    advance,
)

if typing.TYPE_CHECKING:
    from httpx._client import UseClientDefault
    from httpx._types import (
        AuthTypes,
        CookieTypes,
        HeaderTypes,
        QueryParamTypes,
        RequestContent,
        RequestData,
        RequestExtensions,
        RequestFiles,
        TimeoutTypes,
    )

__all__ = [
    "MINTED_KEY",
    "READ_BODY",
    "AsyncClient",
    "AsyncRetryTransport",
    "Client",
    "RetryTransport",
]

READ_BODY = "retrysafe.read_body"
"""Request extension: read the response body inside the retry loop, so that a connection lost
mid-body is retried too. :class:`Client` sets it for every call that is not ``stream()``ed."""

MINTED_KEY = "retrysafe.minted_key"
"""Request extension: the key the transport minted for this request's call. A request that
arrives again carrying that key in its header (the same ``httpx.Request`` sent once more, or
the request httpx builds to follow a redirect, which copies headers and extensions) is a new
call: the stale key is dropped and a new one minted. A key the caller set is never touched.
Unless the call it was minted for ended in an exception (see :data:`_UNANSWERED`)."""

_UNANSWERED = "retrysafe.unanswered_key"
"""Request extension: the minted key of a call that ended in an exception, not a response.
Its outcome is unknown (the server may have run it), so sending the request again
(``client.send(exc.request)``) continues that operation with the same key: a new key would
let the server run it a second time."""

_CUT_TIMEOUTS = "retrysafe.cut_timeouts"
"""Request extension: (the call's timeouts, the ones its last attempt got, cut to the deadline)."""

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAYBE_SENT = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.CloseError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


def _failed(exc: httpx.TransportError) -> Failed:
    if isinstance(exc, httpx.ConnectError) and _tls_failure(exc):
        reach = Reach.FATAL  # the same certificate fails the same way on every attempt
    elif isinstance(exc, _NOT_SENT):
        reach = Reach.NOT_SENT
    elif isinstance(exc, _MAYBE_SENT):
        reach = Reach.MAYBE_SENT
    else:
        reach = Reach.FATAL
    return Failed(reach, type(exc).__name__)


_TLS_CUT_SHORT = (ssl.SSLEOFError, ssl.SSLZeroReturnError)
"""The peer closed the connection during the handshake: transient, unlike a failed check."""


def _tls_failure(exc: BaseException) -> bool:
    """Whether an ``ssl.SSLError`` other than a handshake cut short is among the causes of
    ``exc``: httpx raises its ``ConnectError`` from httpcore's, which httpcore's pool re-raises
    ``from None`` (so the link is the context, not the cause), with the ``ssl`` module's error
    (or anyio's ``EndOfStream`` raised from it) as its argument and context."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        cause = pending.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return not isinstance(cause, _TLS_CUT_SHORT)
        linked = (cause.__cause__, cause.__context__, *cause.args)
        pending.extend(link for link in linked if isinstance(link, BaseException))
    return False


def _call(policy: RetryPolicy, request: httpx.Request) -> Call:
    """Give the request its key (unless it has one or its method takes none) and describe it.

    A key minted for an earlier call of this request (see :data:`MINTED_KEY`) is not kept:
    each call mints its own, unless that call ended unanswered (:data:`_UNANSWERED`)."""
    extensions = dict(request.extensions)
    minted = extensions.pop(MINTED_KEY, None)
    unanswered = extensions.pop(_UNANSWERED, None)
    key = request.headers.get(policy.header)
    if key is not None and key == unanswered:
        extensions[MINTED_KEY] = key
    elif key is not None and key == minted:
        del request.headers[policy.header]
        key = None
    if key is None and policy.wants_key(request.method):
        key = policy.key_factory()
        request.headers[policy.header] = key
        extensions[MINTED_KEY] = key
    request.extensions = extensions
    # Bodies given as bytes, str, JSON or a form are a ByteStream and can be sent again;
    # iterators, generators and multipart uploads are one-shot.
    return Call(request.method, key, replayable=isinstance(request.stream, httpx.ByteStream))


def _unanswered(request: httpx.Request) -> None:
    """Mark the request's minted key as its call's still (the call ends in an exception)."""
    minted = request.extensions.get(MINTED_KEY)
    if minted is not None:
        request.extensions = {**request.extensions, _UNANSWERED: minted}


def _answered(response: httpx.Response, body: bytes | None) -> Answered:
    headers = response.headers
    replayed = headers.get("idempotent-replayed", "").strip().lower() in ("true", "?1")
    return Answered(
        response.status_code,
        headers.get("retry-after"),
        headers.get("content-type"),
        replayed,
        body,
    )


def _timeouts(request: httpx.Request) -> Any:
    """The call's own timeouts: the request's, unless they are the ones an earlier call of this
    request cut to its deadline (the request sent again, or httpx's redirect request, which
    shares the extensions): then those the earlier call started from."""
    timeouts = request.extensions.get("timeout")
    cut = request.extensions.get(_CUT_TIMEOUTS)
    if isinstance(cut, tuple) and timeouts is cut[1]:
        return cut[0]
    return timeouts


def _budgeted(request: httpx.Request, timeouts: Any, budget: float | None) -> None:
    """Cut the call's timeouts to the time left before the deadline, on the request."""
    if not isinstance(timeouts, Mapping):
        return
    if budget is None:
        request.extensions = {**request.extensions, "timeout": timeouts}
        return
    budget = max(budget, 0.001)
    capped = {name: budget if t is None else min(t, budget) for name, t in timeouts.items()}
    request.extensions = {
        **request.extensions,
        "timeout": capped,
        _CUT_TIMEOUTS: (timeouts, capped),
    }


def _rebuilt(
    response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    """The response again, with ``stream`` as its (still encoded) body; not read yet, so that
    the client reads and closes it as any other (and sets ``elapsed``)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=dict(response.extensions),
    )


def _decoded(response: httpx.Response, raw: bytes) -> bytes | None:
    """``raw`` without the response's content encoding (no more than one byte past
    ``PROBLEM_BODY_LIMIT``), None if it cannot be decoded. A throwaway response decodes it,
    so that the one handed on is left unread."""
    throwaway = httpx.Response(
        response.status_code, headers=response.headers, stream=httpx.ByteStream(raw)
    )
    body = bytearray()
    try:
        for chunk in throwaway.iter_bytes():
            body += chunk
            if len(body) > PROBLEM_BODY_LIMIT:
                break
    except httpx.DecodingError:
        return None
    finally:
        throwaway.close()
    return bytes(body[: PROBLEM_BODY_LIMIT + 1])


def _already_read(response: httpx.Response) -> bytes | None:
    """The body of a response the inner transport has read already (``httpx.MockTransport``,
    a transport that reads bodies), None if it was not read (or was streamed and dropped)."""
    if not response.is_stream_consumed:
        return None
    try:
        return response.content
    except httpx.ResponseNotRead:
        return b""


class _Resumed(httpx.SyncByteStream):
    """A body whose first chunks were read already: those, then the rest as it comes."""

    def __init__(self, head: list[bytes], rest: Iterator[bytes], response: httpx.Response):
        self.head, self.rest, self.response = head, rest, response

    def __iter__(self) -> Iterator[bytes]:
        yield from self.head
        yield from self.rest

    def close(self) -> None:
        close = getattr(self.rest, "close", None)
        if close is not None:
            close()
        self.response.close()


class _AsyncResumed(httpx.AsyncByteStream):
    """:class:`_Resumed` for async responses."""

    def __init__(
        self, head: list[bytes], rest: AsyncIterator[bytes], response: httpx.Response
    ) -> None:
        self.head, self.rest, self.response = head, rest, response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.head:
            yield chunk
        async for chunk in self.rest:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()
        await self.response.aclose()


class _Deadline:
    """When the attempt's time runs out, on the policy's clock (None: never). A body that
    keeps trickling in never trips the read timeout (each read gets a byte in time), so the
    reading loop asks this after every chunk."""

    def __init__(self, policy: RetryPolicy, budget: float | None, request: httpx.Request) -> None:
        self.clock = policy.clock
        self.at = None if budget is None else self.clock.monotonic() + budget
        self.request = request

    def check(self) -> None:
        """Raise ``httpx.ReadTimeout`` once the deadline has passed."""
        if self.at is not None and self.clock.monotonic() > self.at:
            raise httpx.ReadTimeout(
                "retrysafe: the deadline passed while the response body was read",
                request=self.request,
            )


def _read(
    response: httpx.Response, *, whole: bool, check: bool, deadline: _Deadline
) -> tuple[httpx.Response, bytes | None]:
    """Read the body as the loop needs it: all of it (``whole``), or, for the in-progress
    ``check`` alone, no more than one byte past ``PROBLEM_BODY_LIMIT`` (a longer body is
    handed on streaming: the bytes read, then the rest), within the ``deadline``. Returns
    the response to hand on and the decoded body for the check (None when not checking)."""
    already = _already_read(response)
    if already is not None:  # nothing left to read: the response is handed on as it is
        return response, already[: PROBLEM_BODY_LIMIT + 1] if check else None
    head: list[bytes] = []
    size = 0
    raw = response.iter_raw()
    try:
        for chunk in raw:
            head.append(chunk)
            size += len(chunk)
            if not whole and size > PROBLEM_BODY_LIMIT:
                return _rebuilt(response, _Resumed(head, raw, response)), None
            deadline.check()
    except BaseException:
        response.close()
        raise
    response.close()
    body = b"".join(head)
    rebuilt = _rebuilt(response, httpx.ByteStream(body))
    return rebuilt, _decoded(response, body) if check else None


async def _aread(
    response: httpx.Response, *, whole: bool, check: bool, deadline: _Deadline
) -> tuple[httpx.Response, bytes | None]:
    """:func:`_read` for async responses."""
    already = _already_read(response)
    if already is not None:
        return response, already[: PROBLEM_BODY_LIMIT + 1] if check else None
    head: list[bytes] = []
    size = 0
    raw = response.aiter_raw()
    try:
        async for chunk in raw:
            head.append(chunk)
            size += len(chunk)
            if not whole and size > PROBLEM_BODY_LIMIT:
                return _rebuilt(response, _AsyncResumed(head, raw, response)), None
            deadline.check()
    except BaseException:
        await response.aclose()
        raise
    await response.aclose()
    body = b"".join(head)
    rebuilt = _rebuilt(response, httpx.ByteStream(body))
    return rebuilt, _decoded(response, body) if check else None


def _finish(
    info: RetryInfo, response: httpx.Response | None, error: httpx.TransportError | None
) -> httpx.Response:
    if response is not None:
        response.extensions["retrysafe"] = info
        return response
    assert error is not None
    error.retrysafe = info  # type: ignore[attr-defined]  # for retry_info(error)
    error.add_note(
        f"retrysafe: gave up after {info.attempts} attempt(s) ({info.stopped}): "
        f"{', '.join(info.outcomes)}; Idempotency-Key {info.key or '(none)'}"
    )
    raise error


class RetryTransport(httpx.BaseTransport):
    """Retries requests through ``transport`` (default: ``httpx.HTTPTransport()``) as ``policy``
    says: POST and PATCH get a key that every retry of the call reuses.

    ``read_body=True`` reads every response's body inside the loop (so a body lost mid-way is
    retried); by default only calls marked with the :data:`READ_BODY` extension are, as
    :class:`Client` marks every call except ``stream()``.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        read_body: bool = False,
    ) -> None:
        self.transport = httpx.HTTPTransport() if transport is None else transport
        self.policy = RetryPolicy() if policy is None else policy
        self.read_body = read_body

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        policy = self.policy
        plan = policy.plan(_call(policy, request))
        read_body = self.read_body or bool(request.extensions.get(READ_BODY))
        timeouts = _timeouts(request)
        response: httpx.Response | None = None
        error: httpx.TransportError | None = None
        try:
            step = advance(plan, None)
            while not isinstance(step, RetryInfo):
                if isinstance(step, Wait):
                    if response is not None:
                        response.close()
                    policy.clock.sleep(step.seconds)
                    step = advance(plan, None)
                    continue
                assert isinstance(step, Attempt)
                _budgeted(request, timeouts, step.budget)
                deadline = _Deadline(policy, step.budget, request)
                response = error = None
                outcome: Outcome
                try:
                    response = self.transport.handle_request(request)
                    body = None
                    content_type = response.headers.get("content-type")
                    check = policy.needs_body(response.status_code, content_type)
                    if read_body or check:
                        response, body = _read(
                            response, whole=read_body, check=check, deadline=deadline
                        )
                    outcome = _answered(response, body)
                except httpx.TransportError as exc:
                    response, error = None, exc
                    outcome = _failed(exc)
                step = advance(plan, outcome)
            return _finish(step, response, error)
        except BaseException:
            if response is not None:
                response.close()
            _unanswered(request)
            raise

    def close(self) -> None:
        self.transport.close()


class AsyncRetryTransport(httpx.AsyncBaseTransport):
    """:class:`RetryTransport` for ``httpx.AsyncClient`` (asyncio or trio)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        read_body: bool = False,
    ) -> None:
        self.transport = httpx.AsyncHTTPTransport() if transport is None else transport
        self.policy = RetryPolicy() if policy is None else policy
        self.read_body = read_body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self.policy
        plan = policy.plan(_call(policy, request))
        read_body = self.read_body or bool(request.extensions.get(READ_BODY))
        timeouts = _timeouts(request)
        response: httpx.Response | None = None
        error: httpx.TransportError | None = None
        try:
            step = advance(plan, None)
            while not isinstance(step, RetryInfo):
                if isinstance(step, Wait):
                    if response is not None:
                        await response.aclose()
                    await policy.clock.asleep(step.seconds)
                    step = advance(plan, None)
                    continue
                assert isinstance(step, Attempt)
                _budgeted(request, timeouts, step.budget)
                deadline = _Deadline(policy, step.budget, request)
                response = error = None
                outcome: Outcome
                try:
                    response = await self.transport.handle_async_request(request)
                    body = None
                    content_type = response.headers.get("content-type")
                    check = policy.needs_body(response.status_code, content_type)
                    if read_body or check:
                        response, body = await _aread(
                            response, whole=read_body, check=check, deadline=deadline
                        )
                    outcome = _answered(response, body)
                except httpx.TransportError as exc:
                    response, error = None, exc
                    outcome = _failed(exc)
                step = advance(plan, outcome)
            return _finish(step, response, error)
        except BaseException:
            if response is not None:
                await response.aclose()
            _unanswered(request)
            raise

    async def aclose(self) -> None:
        await self.transport.aclose()


# --- the clients ----------------------------------------------------------------------------


class RequestOptions(TypedDict, total=False):
    """The keyword arguments of ``httpx.Client.request`` after the URL."""

    content: RequestContent | None
    data: RequestData | None
    files: RequestFiles | None
    json: Any
    params: QueryParamTypes | None
    headers: HeaderTypes | None
    cookies: CookieTypes | None
    auth: AuthTypes | UseClientDefault | None
    follow_redirects: bool | UseClientDefault
    timeout: TimeoutTypes | UseClientDefault
    extensions: RequestExtensions | None


def _journal(journal: KeyJournal | str | os.PathLike[str] | None) -> KeyJournal | None:
    return journal if journal is None or isinstance(journal, KeyJournal) else KeyJournal(journal)


def _with_key(
    policy: RetryPolicy, options: RequestOptions, operation: str, key: str
) -> RequestOptions:
    """``options`` with ``operation``'s key in the headers."""
    headers = httpx.Headers(options.get("headers"))
    if policy.header in headers:
        raise ConfigError(f"pass either operation= or an {policy.header} header, not both")
    headers[policy.header] = key
    return {**options, "headers": headers}


def _no_journal(operation: str) -> ConfigError:
    return ConfigError(f"operation={operation!r} needs a key journal: Client(journal=PATH)")


class Client(httpx.Client):
    """``httpx.Client`` that retries safely: the same constructor (plus ``retry=`` and
    ``journal=``) and methods (plus ``operation=`` on ``request``, ``post`` and ``patch``).

    Every transport of the client (the default one, ``transport=`` and ``mounts=``) is wrapped
    in a :class:`RetryTransport` with the ``retry`` policy. With a ``journal`` (a
    :class:`KeyJournal` or a path to its SQLite file), ``operation="order-42/charge"`` sends
    that operation's recorded key, so running it again (after a crash, say) is replayed.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        journal: KeyJournal | str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.retry = RetryPolicy() if retry is None else retry
        self.journal = _journal(journal)
        # httpx keeps its transports in these two attributes; wrapping them (rather than
        # rebuilding them) keeps every option that shaped them (verify, proxy, limits, ...).
        self._transport = self._wrap(self._transport)
        self._mounts = {
            pattern: None if transport is None else self._wrap(transport)
            for pattern, transport in self._mounts.items()
        }

    def _wrap(self, transport: httpx.BaseTransport) -> httpx.BaseTransport:
        """The transport inside a :class:`RetryTransport` (once: a given one is kept)."""
        if isinstance(transport, RetryTransport):
            return transport
        return RetryTransport(transport, policy=self.retry)

    def send(
        self, request: httpx.Request, *, stream: bool = False, **options: Any
    ) -> httpx.Response:
        if not stream:
            request.extensions = {**request.extensions, READ_BODY: True}
        return super().send(request, stream=stream, **options)

    def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.Client.request``; ``operation`` names the call for the key journal."""
        if operation is not None:
            if self.journal is None:
                raise _no_journal(operation)
            key = self.journal.key_for(operation)
            options = _with_key(self.retry, options, operation, key)
        return super().request(method, url, **options)

    def post(
        self,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.Client.post``; ``operation`` names the call for the key journal."""
        return self.request("POST", url, operation=operation, **options)

    def patch(
        self,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.Client.patch``; ``operation`` names the call for the key journal."""
        return self.request("PATCH", url, operation=operation, **options)


class AsyncClient(httpx.AsyncClient):
    """:class:`Client` for async code: ``httpx.AsyncClient`` with :class:`AsyncRetryTransport`.

    The journal is written in a worker thread, so its sync never blocks the event loop.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        journal: KeyJournal | str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.retry = RetryPolicy() if retry is None else retry
        self.journal = _journal(journal)
        self._transport = self._wrap(self._transport)
        self._mounts = {
            pattern: None if transport is None else self._wrap(transport)
            for pattern, transport in self._mounts.items()
        }

    def _wrap(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        """The transport inside an :class:`AsyncRetryTransport` (once: a given one is kept)."""
        if isinstance(transport, AsyncRetryTransport):
            return transport
        return AsyncRetryTransport(transport, policy=self.retry)

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **options: Any
    ) -> httpx.Response:
        if not stream:
            request.extensions = {**request.extensions, READ_BODY: True}
        return await super().send(request, stream=stream, **options)

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.AsyncClient.request``; ``operation`` names the call for the key journal."""
        if operation is not None:
            journal = self.journal
            if journal is None:
                raise _no_journal(operation)
            import anyio.to_thread

            key = await anyio.to_thread.run_sync(journal.key_for, operation)
            options = _with_key(self.retry, options, operation, key)
        return await super().request(method, url, **options)

    async def post(
        self,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.AsyncClient.post``; ``operation`` names the call for the key journal."""
        return await self.request("POST", url, operation=operation, **options)

    async def patch(
        self,
        url: httpx.URL | str,
        *,
        operation: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> httpx.Response:
        """``httpx.AsyncClient.patch``; ``operation`` names the call for the key journal."""
        return await self.request("PATCH", url, operation=operation, **options)
