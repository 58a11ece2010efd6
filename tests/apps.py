"""An app for tests that run it under a uvicorn subprocess: ``uvicorn apps:create_app --factory``.

Every worker process calls :func:`create_app`, which reads its configuration from the
environment:

``RS_STORE``      the ledger URL (``sqlite:////tmp/.../ledger.db``), shared by the workers
``RS_EXEC_LOG``   a file that gets one line per handler execution (opened ``O_APPEND``, one
                  ``write`` per line, so lines from many processes never mix)
``RS_STATE_DIR``  a directory for ``workers`` (one line per worker started) and pid files
``RS_LEASE``      the claim lease in seconds (default 15)
``RS_DELAY``      how long ``POST /work`` takes, in seconds (default 0.2)

Routes: ``GET /health`` (no ledger); ``POST /work`` (log the execution, sleep ``RS_DELAY``,
answer 201 with a JSON body unique to this execution); ``POST /slow`` (log the execution; the
first execution of each key writes its worker's pid to ``<state>/slow-<key>.pid`` and hangs
until killed, later ones answer at once); ``POST /slow-effect`` (the same, after committing an
effect row together with ``current_claim().mark`` in one transaction of the ledger's own
database: SQLite or PostgreSQL); ``POST /stream-forever`` (log the execution, answer 200 with a
first chunk through Starlette's ``StreamingResponse``, then never finish). Every response
carries ``x-worker-pid``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.responses import StreamingResponse

from retrysafe import IdempotencyMiddleware, current_claim

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def append_line(path: str, line: str) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def commit_effect(store: str, key: str) -> None:
    """Insert an effect row and mark the claim, in one transaction of the ledger's database."""
    claim = current_claim()
    assert claim is not None
    if store.startswith("sqlite:///"):
        conn = sqlite3.connect(store.removeprefix("sqlite:///"), timeout=30)
        try:
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT)")
                conn.execute("INSERT INTO effects VALUES (?)", (key,))
                claim.mark(conn)
        finally:
            conn.close()
        return
    import asyncpg

    connection = await asyncpg.connect(store.split("?", 1)[0])
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(7301)")  # one CREATE at a time
            await connection.execute("CREATE TABLE IF NOT EXISTS rstest_effects (key text)")
            await connection.execute("INSERT INTO rstest_effects VALUES ($1)", key)
            await claim.amark(connection)
    finally:
        await connection.close()


def create_app() -> ASGIApp:
    """Build this worker's app from the environment (see the module docstring)."""
    store = os.environ["RS_STORE"]
    exec_log = os.environ["RS_EXEC_LOG"]
    state_dir = Path(os.environ["RS_STATE_DIR"])
    lease = float(os.environ.get("RS_LEASE", "15"))
    delay = float(os.environ.get("RS_DELAY", "0.2"))
    pid = os.getpid()
    pid_header = (b"x-worker-pid", str(pid).encode())

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is None:
            return
        key = dict(scope["headers"]).get(b"idempotency-key", b"-").decode("latin-1")
        path = scope["path"]
        nonce = uuid.uuid4().hex
        append_line(exec_log, f"{path} {key} {pid} {nonce}")
        if path == "/stream-forever":  # Starlette's: anyio cancels it again at every await

            async def forever() -> AsyncIterator[bytes]:
                yield b"first-"
                await asyncio.sleep(3600)  # until the server cancels it

            await StreamingResponse(forever())(scope, receive, send)
            return
        if path == "/slow-effect":
            await commit_effect(store, key)
        if path in ("/slow", "/slow-effect"):
            try:
                fd = os.open(state_dir / f"slow-{key}.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(pid).encode())
                os.close(fd)
                await asyncio.sleep(3600)  # until the test kills this worker
        elif path == "/work":
            await asyncio.sleep(delay)
        else:
            await respond(send, 404, b"not found", b"text/plain")
            return
        document = {"path": path, "key": key, "pid": pid, "nonce": nonce, "size": len(body)}
        await respond(send, 201, json.dumps(document).encode(), b"application/json")

    layer = IdempotencyMiddleware(handler, store=store, lease=lease)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await layer.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await read_body(receive)
            await respond(send, 200, str(pid).encode(), b"text/plain")
            return

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), pid_header]}
            await send(message)

        await layer(scope, receive, tagged_send)

    append_line(str(state_dir / "workers"), str(pid))
    return app
