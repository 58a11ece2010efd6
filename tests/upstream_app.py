"""An upstream for the gateway tests, run as its own uvicorn process: ``upstream_app:create_app``.

It knows nothing of idempotency: it is the API in Go/Java/Node that the gateway protects. Every
request it handles (except ``/health``) is one *execution*, appended as a line to the file
``UP_EXEC_LOG`` names: ``<method> <path> <idempotency-key or -> <nonce>`` (one ``write`` on an
``O_APPEND`` descriptor, so several worker processes never mix lines). ``UP_STATE_DIR`` is where
``/stream`` looks for its go-ahead files.

Any path answers JSON ``{"n", "nonce", "method", "path", "query", "headers", "body"}``: what it
received, and a nonce unique to this execution. Request headers steer the answer:

``x-status``     the status (default 200)
``x-delay``      seconds to sleep before answering
``x-respond``    JSON list of ``[name, value]`` response headers to add, in order
``x-size``       answer this many bytes (``b"abcdefgh"`` repeated), in 64 KiB chunks
``x-hang``       never answer (the gateway's read timeout must fire)

Special paths: ``GET /health`` (200, not an execution); ``/stream/...`` sends ``first-`` at once,
then waits for the file ``<UP_STATE_DIR>/go-<key>`` before sending ``-last`` (the test decides
when the stream ends); ``POST /v1/charges`` is a fake Stripe: a form body in, a charge out.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK = 64 << 10


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


async def read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_app() -> ASGIApp:
    exec_log = os.environ["UP_EXEC_LOG"]
    state_dir = Path(os.environ.get("UP_STATE_DIR", os.path.dirname(exec_log)))
    counter = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal counter
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:
            return
        path = scope["path"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        get = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}.get
        if path == "/health":
            await respond(send, 200, [(b"content-type", b"text/plain")], [b"upstream ok"])
            return
        counter += 1
        nonce = secrets.token_hex(8)
        key = get("idempotency-key", "-").replace(" ", "_") or "-"
        append_line(exec_log, f"{scope['method']} {path} {key} {nonce}")
        if get("x-hang"):
            await asyncio.sleep(3600)
        if get("x-delay"):
            await asyncio.sleep(float(get("x-delay", "0")))
        status = int(get("x-status", "200"))
        extra = [(n.encode(), v.encode()) for n, v in json.loads(get("x-respond", "[]"))]
        if path.startswith("/stream"):
            go = state_dir / f"go-{key}"
            start = {"type": "http.response.start", "status": status, "headers": extra}
            await send(start)
            await send({"type": "http.response.body", "body": b"first-", "more_body": True})
            for _ in range(1000):
                if go.exists():
                    break
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": nonce.encode() + b"-last"})
            return
        if path == "/v1/charges" and scope["method"] == "POST":
            form = dict(urllib.parse.parse_qsl(body.decode()))
            charge = {
                "id": "ch_" + nonce,
                "object": "charge",
                "amount": int(form.get("amount", "0")),
                "currency": form.get("currency", "usd"),
                "metadata": {"order": form.get("metadata[order]", "")},
            }
            document = json.dumps(charge).encode()
            head = [
                (b"content-type", b"application/json"),
                (b"request-id", b"req_" + nonce.encode()),
            ]
            await respond(send, 200, head, [document])
            return
        if get("x-size"):
            size = int(get("x-size", "0"))
            pattern = b"abcdefgh" * (CHUNK // 8)
            chunks = [pattern[: min(CHUNK, size - i)] for i in range(0, size, CHUNK)]
            head = [(b"content-type", b"application/octet-stream"), *extra]
            await respond(send, status, head, chunks, length=size)
            return
        document = json.dumps(
            {
                "n": counter,
                "nonce": nonce,
                "method": scope["method"],
                "path": path,
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                "body": body.decode("latin-1"),
                "client": list(scope["client"]) if scope.get("client") else None,
            }
        ).encode()
        if status in (204, 304):  # bodiless by definition
            await respond(send, status, extra, [])
            return
        await respond(send, status, [(b"content-type", b"application/json"), *extra], [document])

    return app


async def respond(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    length: int | None = None,
) -> None:
    size = sum(map(len, chunks)) if length is None else length
    head = [*headers, (b"content-length", str(size).encode())] if status != 204 else headers
    await send({"type": "http.response.start", "status": status, "headers": head})
    if not chunks:
        await send({"type": "http.response.body", "body": b""})
    for i, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
