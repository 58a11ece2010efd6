"""Real servers for the HTTP tests: uvicorn in a background thread, or uvicorn with workers.

``serve_in_thread(app)`` runs an ASGI app under a real ``uvicorn.Server`` on 127.0.0.1 (a port
the kernel picked) and yields its base URL. ``serve_subprocess("apps:create_app", workers=3)``
runs ``uvicorn --factory --workers N`` in a child process of its own session and always stops it
(SIGTERM, then SIGKILL), whatever the test did. :class:`Recorder` wraps an app to see what the
server got from it: the statuses it sent and the exceptions it raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

__all__ = [
    "ASGIApp",
    "Recorder",
    "WorkerServer",
    "free_port",
    "poll_until",
    "serve_in_thread",
    "serve_subprocess",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll_until(
    condition: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> None:
    """Wait until ``condition()`` holds; fail the test if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting ({timeout:g} s) for {what or condition}")
        time.sleep(interval)


@dataclass
class Recorder:
    """An ASGI wrapper noting, per HTTP request, the status sent and any exception raised,
    and whether the server reported a client disconnect."""

    app: ASGIApp
    statuses: list[int | None] = field(default_factory=list)
    """One entry per finished request: the status sent, None if no response was started."""
    exceptions: list[BaseException] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    """Set once the server has told the app (through ``receive``) that a client went away."""

    @property
    def finished(self) -> int:
        return len(self.statuses)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
            return message

        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException as exc:
            self.exceptions.append(exc)
            raise
        finally:
            self.statuses.append(status[0] if status else None)


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yield ``http://127.0.0.1:<port>``.

    The listening socket is bound here (port 0) and handed to uvicorn, so there is no race for
    the port. ``options`` go to ``uvicorn.Config``. The server is stopped on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "lifespan": "off",
        "log_config": None,  # leave logging alone: records reach pytest's caplog
        "access_log": False,
        "timeout_graceful_shutdown": 3,
    }
    settings.update(options)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        poll_until(
            lambda: server.started or not thread.is_alive(), timeout=30, what="uvicorn to start"
        )
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=10)
        sock.close()


@dataclass
class WorkerServer:
    """A running ``uvicorn --workers N`` subprocess."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve_subprocess(
    app_factory: str,
    *,
    workers: int,
    env: Mapping[str, str],
    log_path: Path,
    ready: Callable[[], bool] | None = None,
    health_path: str = "/health",
    timeout: float = 60.0,
) -> Iterator[WorkerServer]:
    """Run ``uvicorn <app_factory> --factory --workers <workers>`` until the block ends.

    The child runs in a session of its own with ``tests/`` on its ``PYTHONPATH``, its output
    going to ``log_path``. It is ready when ``health_path`` answers 200 and ``ready()`` (if
    given) holds. On exit, always: SIGTERM, a wait, then SIGKILL to the child's process group.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", app_factory, "--factory",
        "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
        "--timeout-graceful-shutdown", "2", "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    child_env.update(env)
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(log_path.parent),
            start_new_session=True,
        )
    server = WorkerServer(process, base_url, log_path)
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}:\n{server.log()}")
            try:
                response = httpx.get(base_url + health_path, timeout=2)
            except httpx.TransportError:
                return False
            return response.status_code == 200 and (ready is None or ready())

        poll_until(answers, timeout=timeout, interval=0.1, what=f"uvicorn on port {port}")
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server, give it a few seconds, then SIGKILL its whole process group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    # The group is the session started for this server: it mops up workers left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)


class Relay:
    """A TCP relay in front of a real server (PostgreSQL, Redis): the test's switch to make it
    unreachable or slow. It injects faults; the server behind it is the real one.

    ``cut("down")`` resets every relayed connection and refuses new ones (accepted, then
    reset); ``cut("stall")`` keeps every connection open but passes nothing (a black hole:
    only timeouts notice); ``restore()`` relays again. ``delay`` seconds are added to every
    chunk passed either way (a slow network or a slow server).
    """

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.target = (host, port)
        self.delay = delay
        self.mode = "up"
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        self.writers.add(writer)
        if self.mode == "stall":
            return  # held open, never answered
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.add(upstream)
        await asyncio.gather(self._pump(reader, upstream), self._pump(upstream_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.mode == "up":
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self.writers.discard(writer)

    async def _set(self, mode: str) -> None:
        self.mode = mode
        if mode == "down":
            for writer in list(self.writers):
                writer.transport.abort()
            self.writers.clear()

    def cut(self, mode: str = "down") -> None:
        self._call(self._set(mode))

    def restore(self) -> None:
        self._call(self._set("up"))

    def close(self) -> None:
        self.cut("down")
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def fork_child(body: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Fork; the child runs ``body`` on a new event loop and exits 0 only if it succeeded."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
            signal.alarm(30)  # never outlive a stuck test
            asyncio.run(body())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    """Wait for child ``pid``; return its exit status."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
