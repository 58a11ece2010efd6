"""The gateway's upstream connection pool: which connections it hands out again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from retrysafe.gateway.upstream import Connection, UpstreamPool

pytestmark = pytest.mark.anyio

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    """A keep-alive server on loopback that answers every request head with ANSWER."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def exchange(pool: UpstreamPool) -> Connection:
    """One GET over a pooled connection, read to its end and given back; the connection used."""
    conn = await pool.acquire()
    conn.start(b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n")
    await conn.response_head()
    body = conn.take_body()
    while not conn.complete:
        await conn.more_body()
        body += conn.take_body()
    assert (conn.status, body) == (200, b"ok")
    pool.release(conn)
    return conn


async def test_a_finished_connection_is_reused(upstream: int) -> None:
    """A keep-alive connection whose exchange ended cleanly carries the next request."""
    pool = UpstreamPool("127.0.0.1", upstream)
    try:
        first = await exchange(pool)
        second = await exchange(pool)
    finally:
        await pool.aclose()
    assert second is first


async def test_an_idle_connection_aborted_before_it_closed_is_not_handed_out(
    upstream: int,
) -> None:
    """Stray bytes on an idle connection abort it; until it has closed, it is never reused."""
    pool = UpstreamPool("127.0.0.1", upstream)
    try:
        first = await exchange(pool)
        first.data_received(b"HTTP/1.1 200 OK\r\n")  # what the transport delivers while idle
        assert not first.closed  # its connection_lost has not run yet
        second = await exchange(pool)
    finally:
        await pool.aclose()
    assert second is not first
