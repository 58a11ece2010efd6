"""Servers and a clock for the client tests: a counting app behind the retrysafe middleware, a
deliberately faulty HTTP proxy in front of it, and a fake clock that never really sleeps.

``FaultyProxy(upstream)`` listens on loopback and handles each request by the next fault of
its ``script`` (then ``"pass"``): ``pass`` forwards it; ``lose`` forwards it (the handler runs)
and drops the connection without answering; ``lose-body`` forwards it and drops the connection
half-way through the body; ``stall`` forwards it and then answers nothing (the client's
timeout fires); ``reset`` drops the connection before forwarding; an :class:`Answer` is sent
without forwarding (503 with ``Retry-After``, 422, a 409 problem, ...). It notes every request
it got, so tests can assert the keys the server side saw across attempts.

``serve_tls()`` runs a :class:`CountingApp` over HTTPS with a certificate from a throwaway test
authority; ``SlowTransport`` makes every attempt last a given time on a :class:`FakeClock`.
``serve_trickling()`` answers every request with a body sent a byte at a time (the client's
read timeout never fires); ``tls_front()`` drops the first connections mid TLS handshake (a
load balancer draining), then relays the rest to a TLS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
from servers import Receive, Recorder, Scope, Send, serve_in_thread

from retrysafe import IdempotencyMiddleware

IN_PROGRESS_BODY = json.dumps(
    {
        "type": "urn:retrysafe:problem:in-progress",
        "title": "Request with this Idempotency-Key in progress",
        "status": 409,
        "detail": "another request with this key is running",
    }
).encode()


@dataclass
class FakeClock:
    """A :class:`retrysafe.client.policy.Clock` whose sleeps return at once and move it on.

    ``on_sleep(n)`` runs after the n-th sleep (from 1): the test's hook to change the world
    between attempts.
    """

    now: float = 1000.0
    epoch: float = 1_700_000_000.0
    """Wall-clock time when ``now`` was 0."""
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Callable[[int], None] | None = None

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


@dataclass
class Execution:
    path: str
    key: str | None
    body: bytes
    number: int


@dataclass
class CountingApp:
    """The business app: every handler run is an execution, noted with the key it carried.

    ``POST /charge`` answers 201 ``{"charge": n}``; ``POST /gated`` notes its start, waits for
    ``gate``, then does the same; ``POST /invalid`` answers 422 (stored and replayed by the
    middleware); ``GET /item`` answers 200.
    """

    gate: threading.Event = field(default_factory=threading.Event)
    started: list[str | None] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)

    def keys(self) -> list[str | None]:
        return [execution.key for execution in self.executions]

    def reset(self) -> None:
        self.gate.clear()
        self.started.clear()
        self.executions.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        key = dict(scope["headers"]).get(b"idempotency-key")
        key_text = None if key is None else key.decode()
        path = scope["path"]
        if path == "/gated":
            self.started.append(key_text)
            await asyncio.to_thread(self.gate.wait, 20)
        number = len(self.executions) + 1
        self.executions.append(Execution(path, key_text, b"".join(chunks), number))
        status = 422 if path == "/invalid" else 200 if scope["method"] == "GET" else 201
        body = json.dumps({"charge": number}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Stack:
    """The server side: ``app`` behind ``IdempotencyMiddleware`` (memory ledger) under uvicorn."""

    app: CountingApp
    recorder: Recorder
    url: str


@contextlib.contextmanager
def serve_protected(**options: Any) -> Iterator[Stack]:
    """Run a :class:`CountingApp` behind the retrysafe middleware; ``options`` go to it."""
    app = CountingApp()
    recorder = Recorder(IdempotencyMiddleware(app, store="memory://", **options))
    with serve_in_thread(recorder) as url:
        try:
            yield Stack(app, recorder, url)
        finally:
            app.gate.set()


@dataclass(frozen=True)
class Answer:
    """A fault: answer this without forwarding."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


Fault = str | Answer


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    key: str | None
    fault: str


_REASONS = {200: "OK", 201: "Created", 409: "Conflict", 422: "Unprocessable Content"}
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class FaultyProxy:
    """An HTTP/1.1 proxy on loopback that injects the faults of its ``script`` (see above)."""

    def __init__(self, upstream: str, script: list[Fault] | None = None) -> None:
        self.upstream = upstream
        self.script: list[Fault] = list(script or [])
        self.seen: list[Seen] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: httpx.AsyncClient | None = None
        self.lock = asyncio.Lock()
        self.server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def keys(self) -> list[str | None]:
        return [seen.key for seen in self.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(line.split(":", 1)) for line in lines[1:] if line]
        pairs = [(name.strip(), value.strip()) for name, value in headers]
        lowered = {name.lower(): value for name, value in pairs}
        if lowered.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(lowered.get("content-length", "0")))
        # One request at a time up to the upstream's answer: a retry that arrives while an
        # earlier attempt is still being forwarded (a slow machine) waits for it, so every
        # fault is applied after the handler ran, as the tests' counts assume.
        async with self.lock:
            fault = self.script.pop(0) if self.script else "pass"
            label = fault if isinstance(fault, str) else f"answer {fault.status}"
            self.seen.append(Seen(method, target, lowered.get("idempotency-key"), label))
            if fault == "reset":
                return
            if isinstance(fault, Answer):
                await _respond(writer, fault.status, list(fault.headers), fault.body)
                return
            if self.client is None:
                self.client = httpx.AsyncClient(timeout=30)
            forwarded = [(n, v) for n, v in pairs if n.lower() not in _DROPPED | {"host"}]
            response = await self.client.request(
                method, self.upstream + target, headers=forwarded, content=body
            )
        answer = list(response.headers.multi_items())
        if fault == "lose":
            return
        if fault == "stall":
            await reader.read()  # until the client gives up and closes
            return
        if fault == "lose-body":
            await _respond(writer, response.status_code, answer, response.content, cut=True)
            return
        await _respond(writer, response.status_code, answer, response.content)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            if self.client is not None:
                await self.client.aclose()

        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return b"".join(chunks)
        chunks.append(chunk[:-2])


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    cut: bool = False,
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in _DROPPED]
    lines += [f"content-length: {len(body)}", "connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1"))
    writer.write(body[: len(body) // 2] if cut else body)
    await writer.drain()
    if not cut:
        writer.close()
        await writer.wait_closed()


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A loopback URL that refuses connections: its port is bound (so nothing else can take
    it, unlike a port that was merely free a moment ago) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def faulty_proxy(upstream: str, script: list[Fault] | None = None) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(upstream, script)
    try:
        yield proxy
    finally:
        proxy.close()


@dataclass
class TlsStack:
    """A :class:`CountingApp` served over HTTPS; ``ca`` is the PEM file of its authority."""

    app: CountingApp
    url: str
    ca: Path


@contextlib.contextmanager
def serve_tls(directory: Path) -> Iterator[TlsStack]:
    """Serve a :class:`CountingApp` over TLS on loopback, with a certificate for 127.0.0.1
    issued by a throwaway authority that no client trusts unless given ``ca``."""
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    cert, key, ca = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    app = CountingApp()
    with serve_in_thread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        yield TlsStack(app, url.replace("http://", "https://", 1), ca)


class SlowTransport(httpx.BaseTransport):
    """An HTTP transport whose every request takes ``seconds`` on ``clock`` (the fake clock is
    moved on while the request is out), noting the timeouts each attempt was given."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.inner = httpx.HTTPTransport()
        self.clock = clock
        self.seconds = seconds
        self.timeouts: list[dict[str, float | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.timeouts.append(dict(request.extensions["timeout"]))
        response = self.inner.handle_request(request)
        self.clock.now += self.seconds
        return response

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def serve_trickling(size: int, interval: float) -> Iterator[str]:
    """Serve, on loopback, a 200 whose ``size``-byte body comes one byte every ``interval``
    seconds: each read gets a byte well within any timeout, the whole body takes long."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        gone = asyncio.ensure_future(receive())  # http.disconnect: the client gave up
        headers = [(b"content-length", b"%d" % size)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(size):
            if gone.done():
                return
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(interval)
        gone.cancel()
        await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(app) as url:
        yield url


@dataclass
class TlsFront:
    """A TCP front on loopback: the first ``drops`` connections are closed once the client
    sent its TLS ClientHello (the handshake ends in an EOF), later ones are relayed."""

    url: str
    connections: int = 0


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def tls_front(upstream: str, drops: int) -> Iterator[TlsFront]:
    """Front the TLS server at ``upstream`` (``https://127.0.0.1:port``), see :class:`TlsFront`."""
    port = int(upstream.rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    front = TlsFront(f"https://127.0.0.1:{listener.getsockname()[1]}")
    stop = threading.Event()
    sockets: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            front.connections += 1
            sockets.append(client)
            if front.connections <= drops:
                client.recv(65536)  # the ClientHello
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", port))
            sockets.append(server)
            threading.Thread(target=_pump, args=(client, server), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for sock in sockets:
            sock.close()
