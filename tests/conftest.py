"""Shared fixtures: the stores every contract test runs against, and the async backend.

The shared ledgers need real servers. Their addresses come from the environment, with the
machine's defaults:

* ``RETRYSAFE_TEST_REDIS``: ``redis://127.0.0.1:6379/0``;
* ``RETRYSAFE_TEST_REDIS_CLUSTER``: ``redis+cluster://127.0.0.1:7001`` (``scripts/redis-cluster
  start`` runs one on loopback; ``.ci/run`` does it);
* ``RETRYSAFE_TEST_POSTGRES``: ``postgresql://postgres@127.0.0.1:5432/test``.

A test whose server does not answer is skipped, with the reason, on a workstation; under
``CI=true`` it fails instead, so that CI never passes by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

STORE_KINDS = ["memory", "sqlite", "redis", "redis-cluster", "postgres"]
SHARED_KINDS = ["redis", "redis-cluster", "postgres"]
"""The ledgers many hosts can share."""

SERVERS = {
    "redis": os.environ.get("RETRYSAFE_TEST_REDIS", "redis://127.0.0.1:6379/0"),
    "redis-cluster": os.environ.get(
        "RETRYSAFE_TEST_REDIS_CLUSTER", "redis+cluster://127.0.0.1:7001"
    ),
    "postgres": os.environ.get(
        "RETRYSAFE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
    ),
}


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (uvicorn's loop)."""
    return "asyncio"


def _answers(url: str) -> str | None:
    """None if the server of ``url`` accepts a TCP connection, else why not."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5432 if parts.scheme.startswith("postgres") else 6379)
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc}"


_checked: dict[str, str | None] = {}


def require_server(kind: str) -> str:
    """The base URL of ``kind``'s test server; skip (or fail under CI) when it is down."""
    url = SERVERS[kind]
    if url not in _checked:
        _checked[url] = _answers(url)
    why = _checked[url]
    if why is not None:
        message = f"{kind} test server {url} is not answering ({why})"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{message}; CI must run every store", pytrace=False)
        pytest.skip(message)
    return url


def fresh_url(kind: str, tmp_path: Path) -> str:
    """A URL of an empty ledger of ``kind``, private to the calling test.

    Shared servers keep each test apart by a key prefix (Redis) or a table (PostgreSQL) of
    its own; the records of a Redis test expire by themselves, a PostgreSQL test's table is
    dropped by :func:`drop_postgres_table`.
    """
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    base = require_server(kind)
    unique = uuid.uuid4().hex[:12]
    if kind in {"redis", "redis-cluster"}:
        return f"{base}?prefix=rstest-{unique}"
    return f"{base}?table=rstest_{unique}"


def drop_postgres_table(url: str) -> None:
    """Drop the table a :func:`fresh_url` PostgreSQL ledger used (and its schema row)."""
    import asyncio

    import asyncpg

    parts = urlsplit(url)
    table = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("table")
    if not table:
        return

    async def drop() -> None:
        conn = await asyncpg.connect(parts._replace(query="").geturl().replace("+", ""))
        try:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger URL of each store kind."""
    url = fresh_url(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        drop_postgres_table(url)


@pytest.fixture(params=SHARED_KINDS)
def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger URL of each store kind that several hosts can share."""
    url = fresh_url(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        drop_postgres_table(url)
