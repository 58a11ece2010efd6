"""Servers for the ``retrysafe check`` tests: an API whose answers are unique per execution,
a small idempotency layer that is not retrysafe, and that layer broken one defect at a time.

:class:`PaymentsApp` answers ``POST`` (any path) with 201 and a JSON body carrying a fresh id,
streamed in two chunks without a Content-Length, plus a ``Set-Cookie`` and two ``Link``
headers. ``X-Fail: 503`` makes it answer 503, ``X-Fail: raise`` makes it raise (the server
answers 500). ``GET`` gets 405.

:class:`ToyLayer` implements the contract the simple way (a dict, one event loop): the checker
must pass it too, so that the checker is shown to work on an implementation other than
retrysafe's. ``ToyLayer(app, defect=...)`` adds one of the defects seen in today's libraries
(``DEFECTS``, after ``prior-art.md``). :class:`Counting` notes what reached the server.

:class:`StrictApp` is an API without any idempotency layer that validates its requests: a
body member it does not know, or a path other than its own, gets its own 422 (a validation
error, whatever the key).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from servers import ASGIApp, Message, Receive, Scope, Send

from retrysafe.keys import MalformedKey, find_key

__all__ = ["DEFECTS", "Counting", "PaymentsApp", "StrictApp", "ToyLayer"]

DEFECTS = (
    "cross-caller-replay",
    "mismatch-replayed",
    "5xx-cached",
    "stuck-key",
    "double-execution",
    "truncated-replay",
    "cookie-replayed",
    "headers-dropped",
    "lax-key",
)


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class PaymentsApp:
    """An API whose every execution answers a body of its own (see the module docstring)."""

    delay: float = 0.05
    executions: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["method"] != "POST":
            await respond(send, 405, b"method not allowed", [(b"content-type", b"text/plain")])
            return
        self.executions += 1
        await asyncio.sleep(self.delay)
        fail = header(scope, b"x-fail")
        if fail == b"raise":
            raise RuntimeError("the payment provider is down")
        if fail == b"503":
            document = json.dumps({"error": "provider unavailable", "id": uuid.uuid4().hex})
            await respond(send, 503, document.encode(), [(b"content-type", b"application/json")])
            return
        charge = uuid.uuid4().hex
        answer = json.dumps({"id": charge, "path": scope["path"], "size": len(body)}).encode()
        half = len(answer) // 2
        headers = [
            (b"content-type", b"application/json"),
            (b"location", f"/charges/{charge}".encode()),
            (b"set-cookie", f"session={charge}".encode()),
            (b"link", b"</v1/customers>; rel=customers"),
            (b"link", b"</v1/refunds>; rel=refunds"),
        ]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer[:half], "more_body": True})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": answer[half:]})


@dataclass
class StrictApp:
    """:class:`PaymentsApp` behind request validation of its own: 422 for an unknown body member
    or another path, key or no key (see the module docstring)."""

    path: str = "/v1/charges"
    members: frozenset[str] = frozenset({"amount", "currency", "customer"})
    app: PaymentsApp = field(default_factory=PaymentsApp)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if scope["path"] != self.path:
            wrong = f"no such operation: {scope['path']}"
        elif not isinstance(document, dict) or set(document) - self.members:
            wrong = "unknown members: " + ", ".join(sorted(set(document or {}) - self.members))
        else:
            wrong = ""
        if wrong:
            problem = {"type": "urn:example:validation", "title": "invalid", "status": 422,
                       "detail": wrong}  # fmt: skip
            headers = [(b"content-type", b"application/problem+json")]
            await respond(send, 422, json.dumps(problem).encode(), headers)
            return

        async def replayed() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replayed, send)


@dataclass
class Counting:
    """Counts the HTTP requests that reach ``app``, and the most in flight at once."""

    app: ASGIApp
    requests: int = 0
    in_flight: int = 0
    peak: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


@dataclass
class _Record:
    fingerprint: bytes
    done: bool = False
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    expires: float = float("inf")


_NOT_STORED = {b"date", b"server", b"content-length", b"transfer-encoding", b"set-cookie"}


def _canonical(body: bytes) -> bytes:
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return body


class ToyLayer:
    """A small ``Idempotency-Key`` layer over a dict, optionally with one ``defect``.

    ``reused`` names the problem type of its 422 (``urn:toy:<reused>``): another name than
    the contract's ``key-reused`` is how a layer following only the IETF draft may answer.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        defect: str | None = None,
        ttl: float = 3600,
        reused: str = "key-reused",
    ) -> None:
        assert defect is None or defect in DEFECTS, defect
        self.app = app
        self.defect = defect
        self.ttl = ttl
        self.reused = reused
        self.records: dict[tuple[bytes, str], _Record] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"POST", "PATCH"}:
            await self.app(scope, receive, send)
            return
        try:
            key = find_key(scope["headers"], b"idempotency-key")
        except MalformedKey as exc:
            raw = header(scope, b"idempotency-key")
            if not (self.defect == "lax-key" and raw and (raw[:1] == b'"' or b"\t" in raw)):
                await self.problem(send, 400, "malformed-key", str(exc))
                return
            key = raw.decode()  # a broken quote or a tab: taken as a literal key
        if key is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        caller = b"" if self.defect == "cross-caller-replay" else header(scope, b"authorization")
        rid = (caller or b"", key)
        fingerprint = (
            b""
            if self.defect == "mismatch-replayed"
            else b"%s %s?%s %s"
            % (scope["method"].encode(), scope["path"].encode(), scope["query_string"],
               _canonical(body))
        )  # fmt: skip
        record = self.records.get(rid)
        if self.defect == "double-execution":
            await asyncio.sleep(0.2)  # a store round trip between the look and the claim
        if record is not None and record.expires < time.monotonic():
            record = None
        if record is None:
            record = self.records[rid] = _Record(fingerprint)
            await self.execute(scope, body, send, rid, record)
        elif record.fingerprint != fingerprint:
            await self.problem(send, 422, self.reused, "this key was used for another request")
        elif not record.done:
            await self.problem(send, 409, "in-progress", "a request with this key is running")
        else:
            headers = [*record.headers, (b"idempotent-replayed", b"true")]
            await respond(send, record.status, record.body, headers)

    async def execute(
        self, scope: Scope, body: bytes, send: Send, rid: tuple[bytes, str], record: _Record
    ) -> None:
        started: list[Message] = []
        chunks: list[bytes] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(message)
            elif message["type"] == "http.response.body" and not (
                self.defect == "truncated-replay" and chunks  # keeps the first chunk only
            ):
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            if self.defect != "stuck-key":
                del self.records[rid]
            raise
        status = started[0]["status"]
        if status >= 500 and self.defect != "5xx-cached":
            del self.records[rid]
            return
        record.status = status
        record.headers = [
            (name, value)
            for name, value in started[0]["headers"]
            if name.lower() not in _NOT_STORED
            or (
                name.lower() == b"set-cookie"
                and self.defect in {"cross-caller-replay", "cookie-replayed"}
            )
        ]
        if self.defect == "headers-dropped":  # keeps the headers a checker is sure to look at
            kept = {b"content-type", b"location", b"etag"}
            record.headers = [(n, v) for n, v in record.headers if n.lower() in kept]
        record.body = b"".join(chunks)
        record.expires = time.monotonic() + self.ttl
        record.done = True

    async def problem(self, send: Send, status: int, slug: str, detail: str) -> None:
        document = {"type": f"urn:toy:{slug}", "title": slug, "status": status, "detail": detail}
        headers = [(b"content-type", b"application/problem+json")]
        if status == 409:
            headers.append((b"retry-after", b"1"))
        await respond(send, status, json.dumps(document).encode(), headers)
