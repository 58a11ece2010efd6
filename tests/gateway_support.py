"""Real processes for the gateway tests: the upstream (``upstream_app``) and ``retrysafe gateway``.

``run_upstream(tmp)`` runs the upstream under uvicorn, ``run_gateway(upstream_url, ...)`` runs
the real command (``python -m retrysafe gateway ...``), each in a process group of its own that
is always stopped. Both yield a handle with the base URL and the process's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from servers import TESTS_DIR, free_port, poll_until

__all__ = [
    "DropRelay", "Process", "RawUpstream", "Upstream", "run_gateway", "run_upstream", "stop",
]  # fmt: skip


@dataclass
class Process:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@dataclass
class Upstream(Process):
    exec_log: Path
    state_dir: Path

    def executions(self, key: str | None = None, path: str | None = None) -> list[list[str]]:
        """The executions so far, each ``[method, path, key, nonce]``, optionally filtered."""
        try:
            lines = self.exec_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        rows = [line.split(" ") for line in lines if line]
        return [r for r in rows if (key is None or r[2] == key) and (path is None or r[1] == path)]

    def go(self, key: str) -> None:
        """Let ``/stream`` requests with this key send their last chunk."""
        (self.state_dir / f"go-{key}").touch()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _start(
    command: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
        )


def _wait_healthy(
    process: subprocess.Popen[bytes],
    url: str,
    log_path: Path,
    context: ssl.SSLContext | bool = True,
) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log}")
        try:
            return httpx.get(url, timeout=2, verify=context).status_code == 200
        except httpx.TransportError:
            return False

    poll_until(answers, timeout=60, interval=0.05, what=url)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Stop a server (``sig``, a wait, then SIGKILL to its group); return its exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait(timeout=15)


@contextlib.contextmanager
def run_upstream(
    directory: Path,
    *,
    workers: int = 1,
    tls: tuple[Path, Path, Path] | None = None,
    client_certs: bool = False,
) -> Iterator[Upstream]:
    """The test upstream under ``uvicorn --workers N``, its executions logged in ``directory``;
    with ``tls`` (certificate, key, the authority's certificate) it serves https, and with
    ``client_certs`` it also demands a client certificate from that authority."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _env()
    exec_log = directory / "executions.log"
    env["UP_EXEC_LOG"] = str(exec_log)
    env["UP_STATE_DIR"] = str(directory)
    log_path = directory / "upstream.log"
    command = [
        sys.executable, "-m", "uvicorn", "upstream_app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "1",
    ]  # fmt: skip
    context: ssl.SSLContext | bool = True
    if tls is not None:
        command += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
        context = ssl.create_default_context(cafile=str(tls[2]))
        if client_certs:  # the server's certificate (issued for both uses) is the client's too
            command += ["--ssl-ca-certs", str(tls[2]), "--ssl-cert-reqs", str(ssl.CERT_REQUIRED)]
            context.load_cert_chain(tls[0], tls[1])
    process = _start(command, env, log_path, directory)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url + "/health", log_path, context)
        yield Upstream(process, url, log_path, exec_log, directory)
    finally:
        stop(process)


def gateway_command(upstream: str, port: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "retrysafe", "gateway", "--upstream", upstream,
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip


@contextlib.contextmanager
def run_gateway(
    upstream: str,
    directory: Path,
    *args: str,
    config: str | None = None,
    name: str = "gateway",
    health: str = "/_retrysafe/health",
) -> Iterator[Process]:
    """``retrysafe gateway --upstream <upstream> *args`` (with ``config`` as its TOML file)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    extra = list(args)
    if config is not None:
        path = directory / f"{name}.toml"
        path.write_text(config)
        extra += ["--config", str(path)]
    log_path = directory / f"{name}.log"
    process = _start(gateway_command(upstream, port, *extra), _env(), log_path, directory)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url + health, log_path)
        yield Process(process, url, log_path)
    finally:
        stop(process)


class DropRelay:
    """A TCP relay in front of the gateway whose network loses answers.

    Requests pass; the answer to the first ``drops`` requests carrying each ``Idempotency-Key``
    is thrown away and the client's connection reset as its first byte comes back, so the client
    sees a connection error *after* the server executed the request: the case retries with a key
    exist for. Requests without a key pass untouched.
    """

    _KEY = re.compile(rb"(?im)^idempotency-key:[ \t]*([^\r\n]*?)[ \t]*\r?$")

    def __init__(self, port: int, *, drops: int = 1) -> None:
        self.target = port
        self.drops = drops
        self.dropped: dict[bytes, int] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop
        ).result(30)
        self.port: int = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        state: dict[str, bytes | None] = {"key": None}

        async def requests() -> None:
            try:
                while data := await reader.read(65536):
                    if match := self._KEY.search(data):
                        state["key"] = match.group(1)
                    up_writer.write(data)
                    await up_writer.drain()
            except OSError:
                pass
            finally:
                up_writer.transport.abort()

        async def answers() -> None:
            try:
                while data := await up_reader.read(65536):
                    key = state["key"]
                    if key is not None and self.dropped.get(key, 0) < self.drops:
                        self.dropped[key] = self.dropped.get(key, 0) + 1
                        break  # the answer is lost on the way back
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.transport.abort()
                up_writer.transport.abort()

        await asyncio.gather(requests(), answers())

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


Step = bytes | str
"""One step of a :class:`RawUpstream` script: bytes are written as they are; ``"early"``
(first only) answers before the request body is read; ``"wait"`` waits for ``proceed()``;
``"close"`` closes the connection; ``"hang"`` never goes on."""


@dataclass
class RawUpstream:
    """A scripted HTTP/1.1 upstream on loopback that answers with exactly the bytes a test gives.

    It reads each request (head, then a Content-Length or chunked body, as a real server
    would, even after answering early), notes ``(connection number, request line)`` in
    ``requests``, and plays ``answers[first path segment]`` (default: a 200 ``ok``). Runs
    in a thread of the test process, like :class:`DropRelay`.
    """

    answers: dict[str, list[Step]] = field(default_factory=dict)
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    played: threading.Event = field(default_factory=threading.Event)
    """Set when a script has played its last step."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __post_init__(self) -> None:
        self._connections = 0
        self.loop = asyncio.new_event_loop()
        self._go = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop
        ).result(30)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def proceed(self) -> None:
        """Let a script waiting at ``"wait"`` go on."""
        self.loop.call_soon_threadsafe(self._go.set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                self.requests.append((number, line))
                parts = line.split(b" ")
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                    return  # out of step: not a request line
                name = parts[1].decode("latin-1").strip("/").split("/")[0]
                script = self.answers.get(name, [self.OK])
                early = script[:1] == ["early"]
                if not early:
                    await self._read_body(head, reader)
                if not await self._play(script, writer):
                    return
                if early:
                    await self._read_body(head, reader)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.transport.abort()

    async def _play(self, script: list[Step], writer: asyncio.StreamWriter) -> bool:
        """Play a script; False when it closed the connection."""
        try:
            for step in script:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif step == "wait":
                    await self._go.wait()
                    self._go.clear()
                elif step == "close":
                    writer.close()
                    return False
                elif step == "hang":
                    await asyncio.sleep(3600)
            return True
        finally:
            self.played.set()

    @staticmethod
    async def _read_body(head: bytes, reader: asyncio.StreamReader) -> None:
        length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
        elif re.search(rb"(?im)^transfer-encoding:.*chunked", head):
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
