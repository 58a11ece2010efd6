"""The requests face: :class:`RetryAdapter` (a transport adapter to mount on any
``requests.Session``) and :class:`Session` (``requests.Session`` with it mounted and named
operations). The decisions are :mod:`retrysafe.client.policy`'s, as for httpx.

Exceptions are classified for the policy like this::

    requests.RequestException
    ├── ConnectTimeout, ConnectionError from a failed connect,
    │   ProxyError from a failed connect to the proxy          not sent: always retried
    ├── ReadTimeout, ChunkedEncodingError, other
    │   ConnectionError (reset, closed without a response),
    │   SSLError from a TLS session cut short (an EOF)         maybe sent: if keyed or idempotent
    └── SSLError, ProxyError, InvalidURL, ... (anything else)  fatal: never retried

urllib3 does not tell a handshake cut short from a TLS session cut short later (both are
``ssl.SSLEOFError``), hence "maybe sent"; a certificate that does not verify stays fatal.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict

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

__all__ = ["INFO_ATTRIBUTE", "RetryAdapter", "RetrySession", "Session"]

INFO_ATTRIBUTE = "retrysafe"
"""The attribute holding the call's :class:`RetryInfo` on its response, or on the exception it
ended with (``retry_info(response)``, ``retry_info(error)``)."""


_NOT_CONNECTED = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)


def _links(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: causes, contexts, arguments, and urllib3's
    ``reason`` (``MaxRetryError``) and ``original_error`` (``ProxyError``)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        link = pending.pop()
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        linked = (
            link.__cause__,
            link.__context__,
            getattr(link, "reason", None),
            getattr(link, "original_error", None),
            *link.args,
        )
        pending.extend(item for item in linked if isinstance(item, BaseException))


def _failed(exc: requests.RequestException) -> Failed:
    label = type(exc).__name__
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Failed(Reach.NOT_SENT, label)
    if isinstance(exc, requests.exceptions.ProxyError):
        # "Unable to connect to proxy": refused or timed out, nothing left this host
        connect = any(isinstance(link, _NOT_CONNECTED) for link in _links(exc))
        return Failed(Reach.NOT_SENT if connect else Reach.FATAL, label)
    if isinstance(exc, requests.exceptions.SSLError):
        # cut short (the peer closed the connection) is transient; any other TLS error not
        cut = any(
            isinstance(link, ssl.SSLEOFError | ssl.SSLZeroReturnError) for link in _links(exc)
        )
        return Failed(Reach.MAYBE_SENT if cut else Reach.FATAL, label)
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, urllib3.exceptions.MaxRetryError):
            reason = reason.reason
        if isinstance(
            reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
        ):
            return Failed(Reach.NOT_SENT, label)
        return Failed(Reach.MAYBE_SENT, label)
    if isinstance(exc, requests.exceptions.ReadTimeout | requests.exceptions.ChunkedEncodingError):
        return Failed(Reach.MAYBE_SENT, label)
    return Failed(Reach.FATAL, label)


def _call(policy: RetryPolicy, request: requests.PreparedRequest) -> Call:
    """Describe ``request``, which is the adapter's own copy: a key minted here is set on the
    copy only, so the caller's ``PreparedRequest`` never carries it. Sent again, or copied by
    the session to follow a redirect, it is a new call that mints its own key."""
    key = request.headers.get(policy.header)
    if key is None and policy.wants_key(request.method or ""):
        key = policy.key_factory()
        request.headers[policy.header] = key
    # bytes and str bodies can be sent again; files and generators are one-shot.
    replayable = request.body is None or isinstance(request.body, bytes | str)
    return Call(request.method or "GET", key, replayable)


def _budgeted(timeout: Any, budget: float | None) -> Any:
    """Cut ``timeout`` (seconds, a (connect, read) pair or None) to the time left."""
    if budget is None:
        return timeout
    budget = max(budget, 0.001)
    if timeout is None:
        return budget
    if isinstance(timeout, int | float):
        return min(timeout, budget)
    if isinstance(timeout, tuple) and len(timeout) == 2:
        return tuple(budget if t is None else min(t, budget) for t in timeout)
    return timeout  # a urllib3 Timeout: left as given


def _answered(response: requests.Response, body: bytes | None) -> Answered:
    headers = response.headers
    replayed = headers.get("idempotent-replayed", "").strip().lower() in ("true", "?1")
    return Answered(
        response.status_code,
        headers.get("retry-after"),
        headers.get("content-type"),
        replayed,
        body,
    )


class _Prefixed:
    """``response.raw`` of a streamed response whose first bytes (decoded) were read to check
    for the in-progress problem: those bytes, then the rest of the body, decoded; any other
    attribute is the urllib3 response's."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head = head
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def _take(self, amt: int | None) -> bytes:
        head = self._head if amt is None else self._head[:amt]
        self._head = self._head[len(head) :]
        return head

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        head = self._take(amt)
        if amt is None:
            rest: bytes = self._raw.read(decode_content=True)
            return head + rest
        if len(head) < amt:
            head += self._raw.read(amt - len(head), decode_content=True)
        return head

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        while self._head:
            yield self._take(amt)
        yield from self._raw.stream(amt, decode_content=True)


class _Deadline:
    """When the attempt's time runs out, on the policy's clock (None: never). A body that
    keeps trickling in never trips the read timeout (each read gets a byte in time), so the
    reading loop asks this after every chunk."""

    def __init__(self, policy: RetryPolicy, budget: float | None) -> None:
        self.clock = policy.clock
        self.at = None if budget is None else self.clock.monotonic() + budget

    def check(self, response: requests.Response) -> None:
        """Raise ``requests.ReadTimeout`` once the deadline has passed."""
        if self.at is not None and self.clock.monotonic() > self.at:
            raise requests.exceptions.ReadTimeout(
                "retrysafe: the deadline passed while the response body was read",
                request=response.request,
                response=response,
            )


class _Arriving:
    """``response.raw`` whose ``stream()`` hands on the bytes as they arrive (urllib3's
    ``read1``), where urllib3 would block until a whole chunk's worth came: so a body that
    trickles in is seen trickling, and the deadline checked between the pieces. Chunked
    bodies already come a chunk at a time. Any other attribute is the urllib3 response's."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        read1 = getattr(self._raw, "read1", None)  # urllib3 >= 2.3
        if read1 is None or getattr(self._raw, "chunked", False):
            yield from self._raw.stream(amt, decode_content=decode_content)
            return
        while data := read1(amt, decode_content=decode_content):
            yield data


@contextlib.contextmanager
def _arriving(response: requests.Response) -> Iterator[None]:
    """Within: ``response.iter_content`` hands on bytes as they arrive (see :class:`_Arriving`)."""
    raw = response.raw
    response.raw = _Arriving(raw)
    try:
        yield
    finally:
        if isinstance(response.raw, _Arriving):  # not replaced meanwhile (see _read_problem)
            response.raw = raw


def _read_content(response: requests.Response, deadline: _Deadline) -> bytes:
    """``response.content``, read within the ``deadline`` (``iter_content`` still turns
    urllib3's errors into requests' own)."""
    chunks: list[bytes] = []
    with _arriving(response):
        for chunk in response.iter_content(requests.models.CONTENT_CHUNK_SIZE):
            chunks.append(chunk)
            deadline.check(response)
    content = b"".join(chunks)
    response._content = content  # what ``response.content`` returns from now on
    response._content_consumed = True  # type: ignore[attr-defined]
    return content


def _read_problem(response: requests.Response, deadline: _Deadline) -> bytes:
    """The body of a streamed response, for the in-progress check: no more than
    ``PROBLEM_BODY_LIMIT`` + 1 bytes are read; a longer body stays streamed, whole."""
    head = bytearray()
    raw = response.raw
    with _arriving(response):
        for chunk in response.iter_content(8192):
            head += chunk
            if len(head) > PROBLEM_BODY_LIMIT:
                response.raw = _Prefixed(bytes(head), raw)
                return bytes(head)
            deadline.check(response)
    response._content = bytes(head)  # read to its end: what ``response.content`` returns
    response._content_consumed = True  # type: ignore[attr-defined]
    return bytes(head)


class RetryAdapter(requests.adapters.HTTPAdapter):
    """``HTTPAdapter`` that retries as ``policy`` says; mount it on any session::

        session.mount("https://", RetryAdapter(policy=RetryPolicy(attempts=3)))

    Bodies are read inside the retry loop (unless the call is ``stream=True``), so a
    response lost mid-body is retried too. urllib3's own retries stay off.
    """

    # What pickling keeps (requests' own scheme): the policy too, or a copy could not send.
    __attrs__: list[str] = [*requests.adapters.HTTPAdapter.__attrs__, "policy"]  # noqa: RUF012

    def __init__(self, *, policy: RetryPolicy | None = None, **options: Any) -> None:
        if options.get("max_retries", 0) != 0:
            raise ConfigError("RetryAdapter does the retrying: leave max_retries at 0")
        super().__init__(**options)
        self.policy = RetryPolicy() if policy is None else policy

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        policy = self.policy
        request = request.copy()  # the key is set on this copy only (see _call)
        plan = policy.plan(_call(policy, request))
        response: requests.Response | None = None
        error: requests.RequestException | None = None
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
                deadline = _Deadline(policy, step.budget)
                response = error = None
                outcome: Outcome
                try:
                    response = super().send(
                        request,
                        stream=True,
                        timeout=_budgeted(timeout, step.budget),
                        verify=verify,
                        cert=cert,
                        proxies=proxies,
                    )
                    body: bytes | None = None
                    content_type = response.headers.get("content-type")
                    check = policy.needs_body(response.status_code, content_type)
                    if not stream:  # kept: the session will not read it again
                        content = _read_content(response, deadline)
                        body = content[: PROBLEM_BODY_LIMIT + 1] if check and content else None
                    elif check:
                        body = _read_problem(response, deadline)
                    outcome = _answered(response, body)
                except requests.RequestException as exc:
                    if response is not None:
                        response.close()
                    response, error = None, exc
                    outcome = _failed(exc)
                step = advance(plan, outcome)
        except BaseException:
            if response is not None:
                response.close()
            raise
        if response is not None:
            setattr(response, INFO_ATTRIBUTE, step)
            return response
        assert error is not None
        setattr(error, INFO_ATTRIBUTE, step)  # for retry_info(error)
        error.add_note(
            f"retrysafe: gave up after {step.attempts} attempt(s) ({step.stopped}): "
            f"{', '.join(step.outcomes)}; Idempotency-Key {step.key or '(none)'}"
        )
        raise error


class Session(requests.Session):
    """``requests.Session`` with a :class:`RetryAdapter` on ``http://`` and ``https://``, and
    ``operation=`` on ``request``, ``post`` and ``patch`` for the key ``journal`` (a
    :class:`KeyJournal` or the path of its file)."""

    # What pickling keeps (requests' own scheme): the policy and the journal too.
    __attrs__: list[str] = [*requests.Session.__attrs__, "retry", "journal"]  # noqa: RUF012

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        journal: KeyJournal | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.retry = RetryPolicy() if retry is None else retry
        self.journal = (
            journal if journal is None or isinstance(journal, KeyJournal) else (KeyJournal(journal))
        )
        adapter = RetryAdapter(policy=self.retry)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        params: Any = None,
        data: Any = None,
        headers: Any = None,
        *args: Any,
        operation: str | None = None,
        **options: Any,
    ) -> requests.Response:
        """``requests.Session.request``; ``operation`` names the call for the key journal."""
        if operation is not None:
            if self.journal is None:
                raise ConfigError(
                    f"operation={operation!r} needs a key journal: Session(journal=PATH)"
                )
            headers = CaseInsensitiveDict(headers or {})
            if self.retry.header in headers:
                raise ConfigError(
                    f"pass either operation= or an {self.retry.header} header, not both"
                )
            headers[self.retry.header] = self.journal.key_for(operation)
        return super().request(method, url, params, data, headers, *args, **options)

    def post(
        self,
        url: str | bytes,
        data: Any = None,
        json: Any = None,
        *,
        operation: str | None = None,
        **options: Any,
    ) -> requests.Response:
        """``requests.Session.post``; ``operation`` names the call for the key journal."""
        return self.request("POST", url, data=data, json=json, operation=operation, **options)

    def patch(
        self,
        url: str | bytes,
        data: Any = None,
        *,
        operation: str | None = None,
        **options: Any,
    ) -> requests.Response:
        """``requests.Session.patch``; ``operation`` names the call for the key journal."""
        return self.request("PATCH", url, data=data, operation=operation, **options)


RetrySession = Session
"""The name ``retrysafe`` exports :class:`Session` under."""
