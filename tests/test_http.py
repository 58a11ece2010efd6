"""The ASGI middleware over real HTTP: uvicorn on loopback, httpx and raw sockets as clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from servers import Receive, Recorder, Scope, Send, poll_until, serve_in_thread, serve_subprocess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from retrysafe import IdempotencyMiddleware, SQLiteStore

CHUNKS = [b"chunk-1:" + b"a" * 100, b"chunk-2:" + b"b" * 3000, b"chunk-3:" + b"c" * 50, b"end"]
WHOLE = b"".join(CHUNKS)
GATE_TIMEOUT = 20.0
"""How long the app waits for the test's go-ahead before sending the rest anyway."""


@dataclass
class App:
    """The inner app. Every execution is counted and gets a unique id in ``x-execution``.

    ``POST /stream`` sends ``CHUNKS[0]``, then waits until the test sets ``gate``, then sends
    the other chunks. With ``listen``, it also listens on ``receive`` meanwhile (as Starlette
    does) and notes in ``heard`` what it heard once its response is sent.
    ``POST /echo`` answers 201 with the body it received, ``POST /big`` five 1000-byte chunks,
    ``POST /gated`` waits for ``gate`` and answers 201, ``POST /short`` answers 201 with a
    Content-Length ten bytes more than the body it sends, ``POST /long`` one of 3 bytes and a
    6-byte chunk before its last, ``POST /two-lengths`` two Content-Lengths that disagree.
    """

    gate: threading.Event = field(default_factory=threading.Event)
    listen: bool = False
    executions: int = 0
    gate_opened: list[bool] = field(default_factory=list)
    """Per wait: whether the test's go-ahead came (False: the app gave up waiting)."""
    request_headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    heard: list[str] = field(default_factory=list)

    async def wait_gate(self) -> None:
        opened = await asyncio.to_thread(self.gate.wait, GATE_TIMEOUT)
        self.gate_opened.append(opened)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.executions += 1
        self.request_headers.append(list(scope["headers"]))
        execution = uuid.uuid4().hex.encode()
        path = scope["path"]
        headers = [(b"x-execution", execution), (b"content-type", b"application/octet-stream")]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": CHUNKS[0], "more_body": True})
            listener = asyncio.ensure_future(receive()) if self.listen else None
            await self.wait_gate()
            for chunk in CHUNKS[1:]:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if listener is not None:
                message = await asyncio.wait_for(listener, GATE_TIMEOUT)
                self.heard.append(message["type"])
            return
        if path == "/big":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(5):
                part = bytes([65 + i]) * 1000
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/gated":
            await self.wait_gate()
        if path == "/short":  # an app bug: a Content-Length its body does not reach
            headers.append((b"content-length", str(len(body) + 10).encode()))
            await send({"type": "http.response.start", "status": 201, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if path == "/long":  # an app bug: a body past its Content-Length, before its end
            headers.append((b"content-length", b"3"))
            await send({"type": "http.response.start", "status": 201, "headers": headers})
            await send({"type": "http.response.body", "body": b"abcdef", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/two-lengths":  # an app bug: two Content-Lengths that disagree
            headers += [(b"content-length", b"1"), (b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 201, "headers": headers})
            await send({"type": "http.response.body", "body": b"x"})
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Served:
    app: App
    recorder: Recorder
    url: str
    client: httpx.Client

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        assert parts.port is not None
        return parts.hostname, parts.port


Serve = Callable[..., AbstractContextManager[Served]]


@pytest.fixture
def serve(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Serve]:
    """Start uvicorn on the app behind the middleware (SQLite ledger) with the given options."""
    caplog.set_level(logging.WARNING)
    stores: list[SQLiteStore] = []

    @contextmanager
    def start(app: App, **options: Any) -> Iterator[Served]:
        store = SQLiteStore(str(tmp_path / f"ledger-{len(stores)}.db"))
        stores.append(store)
        recorder = Recorder(IdempotencyMiddleware(app, store=store, **options))
        with serve_in_thread(recorder) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield Served(app, recorder, url, client)

    yield start
    for store in stores:
        asyncio.run(store.aclose())
    # The server never reported an error of its own (uvicorn logs a failing app as ERROR).
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem of the given type."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["type"].endswith(slug)
    assert document["status"] == status
    assert document["title"]
    assert document["detail"]
    return document


def assert_healthy(served: Served) -> None:
    """Nothing reached uvicorn as an exception, and the layer never answered 500."""
    assert not served.recorder.exceptions
    assert 500 not in served.recorder.statuses


def test_streaming_response_streams_and_replays_whole(serve: Serve) -> None:
    """A streamed response reaches the client chunk by chunk; the retry replays all its bytes."""
    with serve(App()) as served:
        app = served.app
        headers = {"Idempotency-Key": "stream-1"}
        with served.client.stream("POST", "/stream", headers=headers, content=b"{}") as response:
            assert response.status_code == 200
            stream = response.iter_raw()
            received = b""
            while len(received) < len(CHUNKS[0]):
                received += next(stream)
            # The first chunk arrived while the app is still waiting: it was not buffered.
            app.gate.set()
            received += b"".join(stream)
            assert "idempotent-replayed" not in response.headers
        assert app.gate_opened == [True]
        assert received == WHOLE

        retry = served.client.post("/stream", headers=headers, content=b"{}")
        assert retry.status_code == 200
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.headers["x-execution"] == response.headers["x-execution"]
        assert retry.content == WHOLE
        assert app.executions == 1
        assert_healthy(served)


def test_streaming_without_key_is_not_truncated(serve: Serve) -> None:
    """A streamed response to a request without a key streams too and arrives whole."""
    with serve(App()) as served:
        app = served.app
        with served.client.stream("POST", "/stream", content=b"x") as response:
            stream = response.iter_raw()
            received = b""
            while len(received) < len(CHUNKS[0]):
                received += next(stream)
            app.gate.set()
            received += b"".join(stream)
        assert app.gate_opened == [True]
        assert received == WHOLE
        again = served.client.post("/stream", content=b"x")
        assert again.content == WHOLE
        assert "idempotent-replayed" not in again.headers
        assert app.executions == 2  # nothing was stored: without a key, every request runs
        assert_healthy(served)


def test_response_over_max_size_is_delivered_whole_then_unavailable(serve: Serve) -> None:
    """A response past max_response_body reaches the client whole; its retries get 410."""
    with serve(App(), max_response_body=1000) as served:
        headers = {"Idempotency-Key": "big-1"}
        first = served.client.post("/big", headers=headers, content=b"1")
        assert first.status_code == 200
        assert first.content == b"".join(bytes([65 + i]) * 1000 for i in range(5))
        for _ in range(2):
            retry = served.client.post("/big", headers=headers, content=b"1")
            assert_problem(retry, 410, "replay-unavailable")
        assert served.app.executions == 1
        assert_healthy(served)


def test_client_gone_while_sending_body_claims_nothing(serve: Serve) -> None:
    """A client that disconnects mid-body: no execution, no claim; the full request then runs."""
    with serve(App()) as served:
        host, port = served.address
        head = (
            b"POST /echo HTTP/1.1\r\nHost: test\r\nIdempotency-Key: cut-1\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(head + b"0123456789")
        poll_until(lambda: served.recorder.finished == 1, what="the cut request to end")
        assert served.recorder.statuses == [None]  # nobody to answer
        assert served.app.executions == 0

        body = b"0123456789" * 100
        full = served.client.post("/echo", headers={"Idempotency-Key": "cut-1"}, content=body)
        assert full.status_code == 201
        assert "idempotent-replayed" not in full.headers
        assert full.content == body
        assert served.app.executions == 1
        assert_healthy(served)


def test_client_gone_mid_response_still_completes_record(serve: Serve) -> None:
    """A client that disconnects mid-response: the record still completes and retries replay it."""
    with serve(App(listen=True)) as served:
        host, port = served.address
        request = (
            b"POST /stream HTTP/1.1\r\nHost: test\r\nIdempotency-Key: gone-1\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(request)
            read_until(sock, CHUNKS[0])
        # The server reports the disconnect; the app sends the rest of its response anyway.
        poll_until(served.recorder.disconnected.is_set, what="the server to see the client leave")
        served.app.gate.set()
        poll_until(lambda: served.recorder.finished == 1, what="the abandoned request to end")
        assert served.app.gate_opened == [True]
        assert served.app.heard == ["http.disconnect"]
        assert served.recorder.statuses == [200]

        retry = served.client.post("/stream", headers={"Idempotency-Key": "gone-1"}, content=b"{}")
        assert retry.status_code == 200
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.content == WHOLE
        assert served.app.executions == 1
        assert_healthy(served)


def read_until(sock: socket.socket, marker: bytes) -> None:
    """Read from ``sock`` until ``marker`` has arrived (the first chunk of a stream)."""
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        assert data, "the server closed the connection before the first chunk"
        received += data


def gated_stream_app(runs: list[int], gate: threading.Event) -> Starlette:
    """A Starlette app whose ``POST /stream`` counts a run in ``runs``, streams ``CHUNKS[0]``,
    waits for ``gate``, then streams the other chunks."""

    async def endpoint(request: Request) -> StreamingResponse:
        await request.body()
        runs.append(1)

        async def chunks() -> AsyncIterator[bytes]:
            yield CHUNKS[0]
            await asyncio.to_thread(gate.wait, GATE_TIMEOUT)
            for chunk in CHUNKS[1:]:
                yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/stream", endpoint, methods=["POST"])])


def post_and_leave(url: str, key: str) -> None:
    """POST /stream with ``key`` on a raw connection, read up to the first chunk, hang up."""
    port = urlsplit(url).port
    assert port is not None
    request = (
        b"POST /stream HTTP/1.1\r\nHost: test\r\nIdempotency-Key: %b\r\n"
        b"Content-Length: 2\r\n\r\n{}" % key.encode()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        read_until(sock, CHUNKS[0])


def test_client_gone_mid_stream_of_starlette_app_still_completes_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Starlette StreamingResponse whose client leaves mid-stream is recorded, never re-run."""
    caplog.set_level(logging.WARNING)
    runs: list[int] = []
    gate = threading.Event()
    store = SQLiteStore(str(tmp_path / "ledger.db"))
    recorder = Recorder(IdempotencyMiddleware(gated_stream_app(runs, gate), store=store))
    with serve_in_thread(recorder) as url, httpx.Client(base_url=url, timeout=60) as client:
        post_and_leave(url, "gone-2")
        # Starlette listens for the disconnect while it streams; let the server report it.
        poll_until(recorder.disconnected.is_set, what="the server to see the client leave")
        gate.set()
        poll_until(lambda: recorder.finished == 1, what="the abandoned request to end")

        retry = client.post("/stream", headers={"Idempotency-Key": "gone-2"}, content=b"{}")
        assert retry.status_code == 200
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.content == WHOLE
        assert runs == [1]
        assert not recorder.exceptions
    asyncio.run(store.aclose())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_stream_outliving_its_lease_after_the_client_left_is_not_run_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Starlette stream whose client left and which runs past one lease is stopped (the
    disconnect is passed on) and kept as not replayable: the retry gets 410, never a rerun."""
    caplog.set_level(logging.WARNING)
    runs: list[int] = []
    gate = threading.Event()  # set only once the stream has stopped: it outlives the 1 s lease
    store = SQLiteStore(str(tmp_path / "ledger.db"))
    recorder = Recorder(IdempotencyMiddleware(gated_stream_app(runs, gate), store=store, lease=1))
    try:
        with serve_in_thread(recorder) as url, httpx.Client(base_url=url, timeout=60) as client:
            post_and_leave(url, "gone-3")
            # After one lease the middleware lets Starlette hear the disconnect: it stops.
            poll_until(lambda: recorder.finished == 1, what="the abandoned stream to stop")
            gate.set()
            retry = client.post("/stream", headers={"Idempotency-Key": "gone-3"}, content=b"{}")
    finally:
        gate.set()
        asyncio.run(store.aclose())
    assert_problem(retry, 410, "replay-unavailable")
    assert runs == [1]


def test_a_stream_cancelled_by_the_server_shutdown_is_not_run_again(tmp_path: Path) -> None:
    """A stream still running when uvicorn's shutdown timeout cancels it (the uvicorn command,
    SIGTERM, lifespan on) had sent a final status: the handler ran, so the key is kept as not
    replayable (410), never run again."""
    env = {
        "RS_STORE": f"sqlite:///{tmp_path / 'ledger.db'}",
        "RS_EXEC_LOG": str(tmp_path / "executions.log"),
        "RS_STATE_DIR": str(tmp_path),
    }
    request = (
        b"POST /stream-forever HTTP/1.1\r\nHost: test\r\nIdempotency-Key: cancelled\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    log = tmp_path / "server.log"
    with serve_subprocess("apps:create_app", workers=1, env=env, log_path=log) as server:
        port = urlsplit(server.base_url).port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            read_until(sock, b"first-")
            server.process.send_signal(signal.SIGTERM)  # cancelled after 2 s
            server.process.wait(timeout=30)
    with serve_subprocess("apps:create_app", workers=1, env=env, log_path=log) as server:
        retry = httpx.post(
            server.base_url + "/stream-forever",
            headers={"Idempotency-Key": "cancelled"}, content=b"{}", timeout=10,
        )  # fmt: skip
    assert_problem(retry, 410, "replay-unavailable")
    assert len((tmp_path / "executions.log").read_text().splitlines()) == 1


def test_an_app_that_returns_after_its_whole_declared_body_is_replayed(tmp_path: Path) -> None:
    """All the bytes of its Content-Length sent, then a return without more_body=False: the
    client had the whole answer, so the retry replays it and the app runs once."""
    runs: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        runs.append(1)
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})

    store = SQLiteStore(str(tmp_path / "ledger.db"))
    try:
        with serve_in_thread(IdempotencyMiddleware(app, store=store)) as url:
            # One connection each: uvicorn closes the first, the app having broken the protocol.
            headers = {"Idempotency-Key": "nofinal"}
            first = httpx.post(url + "/x", headers=headers, timeout=60)
            retry = httpx.post(url + "/x", headers=headers, timeout=60)
    finally:
        asyncio.run(store.aclose())
    assert (first.status_code, first.content) == (201, b"hello")
    assert (retry.status_code, retry.content) == (201, b"hello")
    assert retry.headers["idempotent-replayed"] == "true"
    assert runs == [1]


def test_chunked_request_body_is_fingerprinted_and_replayed(serve: Serve) -> None:
    """A chunked request body (no Content-Length) is read whole, fingerprinted and replayed."""
    with serve(App()) as served:
        client = served.client
        headers = {"Idempotency-Key": "chunked-1", "Content-Type": "application/json"}
        parts = [b'{"b": 2, ', b'"a": 1, ', b'"items": [1, 2, 3]}']
        first = client.post("/echo", headers=headers, content=iter(parts))
        assert first.status_code == 201
        assert first.content == b"".join(parts)
        sent = dict(served.app.request_headers[0])
        assert b"content-length" not in sent
        assert sent[b"transfer-encoding"] == b"chunked"

        again = client.post("/echo", headers=headers, content=iter(parts))
        assert again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert again.headers["x-execution"] == first.headers["x-execution"]
        # The same JSON document, sent in one piece with other spacing and order: same request.
        same = client.post("/echo", headers=headers, content=b'{"items":[1,2,3],"a":1,"b":2}')
        assert same.status_code == 201
        assert same.content == first.content
        # Another document under the same key, chunked again: refused, never replayed.
        other = client.post("/echo", headers=headers, content=iter([b'{"a": 1, ', b'"b": 3}']))
        assert_problem(other, 422, "key-reused")
        assert served.app.executions == 1
        assert_healthy(served)


@pytest.mark.parametrize("chunked", [True, False])
def test_request_body_over_limit_is_413_and_claims_nothing(serve: Serve, chunked: bool) -> None:
    """A request body over max_request_body (chunked or not) gets 413 and runs nothing."""
    with serve(App(), max_request_body=1000) as served:
        headers = {"Idempotency-Key": "fat-1"}
        body = b"z" * 5000
        content = iter([body[:2500], body[2500:]]) if chunked else body
        response = served.client.post("/echo", headers=headers, content=content)
        assert_problem(response, 413, "body-too-large")
        assert served.app.executions == 0
        small = served.client.post("/echo", headers=headers, content=b"z" * 1000)
        assert small.status_code == 201
        assert "idempotent-replayed" not in small.headers
        assert served.app.executions == 1
        assert_healthy(served)


@pytest.mark.parametrize("size", [8 * 1024, 64 * 1024])
def test_huge_key_header_is_refused_not_500(serve: Serve, size: int) -> None:
    """An oversized Idempotency-Key header gets 400 malformed-key (or uvicorn's own 4xx)."""
    with serve(App()) as served:
        try:
            response = served.client.post(
                "/echo", headers={"Idempotency-Key": "k" * size}, content=b"{}"
            )
        except httpx.RemoteProtocolError:
            # The server refused the head outright and closed; it must not have run anything.
            assert size > 8 * 1024
        else:
            if size <= 8 * 1024:
                assert_problem(response, 400, "malformed-key")
            else:
                assert response.status_code in {400, 431}, response.status_code
        assert served.app.executions == 0
        # The server still serves, and the key was not claimed.
        after = served.client.post("/echo", headers={"Idempotency-Key": "k"}, content=b"ok")
        assert after.status_code == 201
        assert_healthy(served)


def test_heartbeat_keeps_claim_past_lease(serve: Serve) -> None:
    """With a 2 s lease, a handler running ~5 s keeps its claim: duplicates get 409 meanwhile."""
    with serve(App(), lease=2) as served:
        headers = {"Idempotency-Key": "slow-1"}
        outcome: list[httpx.Response] = []

        def original() -> None:
            with httpx.Client(base_url=served.url, timeout=60) as client:
                outcome.append(client.post("/gated", headers=headers, content=b"pay"))

        thread = threading.Thread(target=original, daemon=True)
        thread.start()
        poll_until(lambda: served.app.executions == 1, what="the original to start")
        for pause in (2.5, 2.5, 0):  # at 0 s, after 2.5 s and after 5 s: two leases gone by
            duplicate = served.client.post("/gated", headers=headers, content=b"pay")
            assert_problem(duplicate, 409, "in-progress")
            assert duplicate.headers["retry-after"].isdigit()
            time.sleep(pause)
        served.app.gate.set()
        thread.join(timeout=60)
        assert outcome
        assert outcome[0].status_code == 201
        assert served.app.gate_opened == [True]
        replay = served.client.post("/gated", headers=headers, content=b"pay")
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["x-execution"] == outcome[0].headers["x-execution"]
        assert served.app.executions == 1
        assert_healthy(served)


@pytest.mark.parametrize("path", ["/short", "/long", "/two-lengths"])
def test_a_body_that_misses_its_content_length_runs_once_and_is_not_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A body shorter or longer than its own Content-Length (or two disagreeing lengths):
    the handler ran once, its retries get 410 replay-unavailable, and a warning is logged."""
    app = App()
    store = SQLiteStore(str(tmp_path / "ledger.db"))
    middleware = IdempotencyMiddleware(app, store=store)
    headers = {"Idempotency-Key": "broken-1"}
    try:
        with serve_in_thread(middleware) as url, httpx.Client(base_url=url, timeout=60) as client:
            # The server will not frame such a response: the client never gets it whole.
            with contextlib.suppress(httpx.HTTPError):
                client.post(path, headers=headers, content=b"x")
            retries = [client.post(path, headers=headers, content=b"x") for _ in range(2)]
    finally:
        asyncio.run(store.aclose())
    assert app.executions == 1  # the charge ran once, although its answer was broken
    for retry in retries:
        assert retry.status_code == 410
        assert retry.json()["type"].endswith("replay-unavailable")
    assert "broken-response" in caplog.text
