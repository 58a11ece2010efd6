"""Effects committed with the claim (``current_claim().mark``): the handler's effect and the
ledger's "committed" mark in one transaction of the ledger's own database (SQLite, PostgreSQL).

Store-level tests run the app's side on a connection of its own (``sqlite3``, asyncpg), as an
app would; the HTTP tests run the middleware under real uvicorn on an SQLite file that holds
both the ledger and the app's table.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import drop_postgres_table, fresh_url
from servers import Receive, Scope, Send, serve_in_thread

from retrysafe import (
    Claim,
    ClaimLost,
    ConfigError,
    IdempotencyMiddleware,
    SQLiteStore,
    current_claim,
    open_store,
)
from retrysafe.records import State
from retrysafe.stores import Store

pytestmark = pytest.mark.anyio

FINGERPRINT = b"f" * 32


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger in a database an app could also use: an SQLite file, a PostgreSQL db."""
    url = fresh_url(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        drop_postgres_table(url)


class AppDatabase:
    """The app's own connection to the ledger's database, with an ``effects`` table."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.table = "effects_" + url.rsplit("_", 1)[-1] if "table=" in url else "effects"

    @asynccontextmanager
    async def transaction(self, claim: Claim, key: str) -> AsyncIterator[None]:
        """Insert an effect row and mark ``claim`` in one transaction; the block runs inside
        it (an exception there rolls both back)."""
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                with conn:
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT)")
                    conn.execute(f"INSERT INTO {self.table} VALUES (?)", (key,))
                    claim.mark(conn)
                    yield
            finally:
                conn.close()
            return
        import asyncpg

        connection = await asyncpg.connect(self.url.split("?", 1)[0])
        try:
            async with connection.transaction():
                await connection.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key text)")
                await connection.execute(f"INSERT INTO {self.table} VALUES ($1)", key)
                await claim.amark(connection)
                yield
        finally:
            await connection.close()

    async def effects(self) -> int:
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT)")
                return int(conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])
            finally:
                conn.close()
        import asyncpg

        connection = await asyncpg.connect(self.url.split("?", 1)[0])
        try:
            await connection.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key text)")
            return int(await connection.fetchval(f"SELECT count(*) FROM {self.table}"))
        finally:
            await connection.execute(f"DROP TABLE IF EXISTS {self.table}")
            await connection.close()


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = open_store(url)
    try:
        yield store
    finally:
        await store.aclose()


async def test_a_marked_claim_is_never_released_but_renews_and_completes(ledger_url: str) -> None:
    """After a committed mark, release leaves the record alone; renew and complete still
    work for the holder."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r1", 1, FINGERPRINT, 10, 60) is None
        async with app.transaction(Claim(store, b"r1", 1), "k1"):
            pass
        assert await store.release(b"r1", 1) is False
        record = await store.get(b"r1")
        assert record is not None
        assert record.state is State.COMMITTED
        assert await store.renew(b"r1", 1, 10) is True
        assert await store.complete(b"r1", 1, State.DONE, b"response", 60) is True
        record = await store.get(b"r1")
        assert record is not None
        assert record.state is State.DONE
    assert await app.effects() == 1


async def test_a_marked_claim_whose_holder_died_is_not_replayable(ledger_url: str) -> None:
    """Once the lease of a committed mark runs out, a claim is refused as not replayable and
    never takes the key over."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r2", 1, FINGERPRINT, 0.2, 60) is None
        async with app.transaction(Claim(store, b"r2", 1), "k2"):
            pass
        record = await store.claim(b"r2", 2, FINGERPRINT, 10, 60)
        assert record is not None
        assert record.state is State.COMMITTED  # lease still running
        await asyncio.sleep(0.5)
        record = await store.claim(b"r2", 3, FINGERPRINT, 10, 60)
        assert record is not None
        assert record.state is State.NOT_REPLAYABLE
        assert record.token == 1
        kept = await store.get(b"r2")
        assert kept is not None
        assert kept.token == 1  # nothing was taken over
    assert await app.effects() == 1


async def test_a_claim_taken_over_cannot_mark_and_its_effect_rolls_back(ledger_url: str) -> None:
    """A holder whose lease ran out and was taken over gets ClaimLost from mark, inside its
    transaction: its effect is rolled back, the new holder's stands."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r3", 1, FINGERPRINT, 0.2, 60) is None
        await asyncio.sleep(0.5)
        assert await store.claim(b"r3", 2, FINGERPRINT, 10, 60) is None  # taken over
        with pytest.raises(ClaimLost):
            async with app.transaction(Claim(store, b"r3", 1), "late"):
                pass
        async with app.transaction(Claim(store, b"r3", 2), "winner"):
            pass
        record = await store.get(b"r3")
        assert record is not None
        assert (record.state, record.token) == (State.COMMITTED, 2)
    assert await app.effects() == 1


async def test_a_mark_rolled_back_leaves_the_key_releasable(ledger_url: str) -> None:
    """A mark whose transaction rolled back marks nothing: the key is released as usual."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r4", 1, FINGERPRINT, 10, 60) is None
        with pytest.raises(RuntimeError):
            async with app.transaction(Claim(store, b"r4", 1), "k4"):
                raise RuntimeError("the handler's own failure")
        record = await store.get(b"r4")
        assert record is not None
        assert record.state is State.IN_FLIGHT
        assert await store.release(b"r4", 1) is True
    assert await app.effects() == 0


async def test_a_marked_record_outlives_its_lease_by_the_ttl(ledger_url: str) -> None:
    """Even with a ttl shorter than the lease, a marked record is kept ttl past its lease,
    renewals included: its holder's death never lets a claim take the key over."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r6", 1, FINGERPRINT, 0.4, 0.1) is None
        async with app.transaction(Claim(store, b"r6", 1, ttl=30), "k6"):
            pass
        assert await store.renew(b"r6", 1, 0.4) is True
        record = await store.get(b"r6")
        assert record is not None
        assert record.expires_at - record.lease_until >= 29
        await asyncio.sleep(0.8)  # the holder "died": no more renewals, the lease ran out
        found = await store.claim(b"r6", 2, FINGERPRINT, 10, 0.1)
        assert found is not None
        assert (found.state, found.token) == (State.NOT_REPLAYABLE, 1)
    assert await app.effects() == 1


async def test_a_holder_whose_lease_lapsed_cannot_mark(ledger_url: str) -> None:
    """A lease that ran out, even with nobody taking the key over yet, cannot be marked:
    ClaimLost rolls the effect back, and the key stays free to be taken over."""
    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r7", 1, FINGERPRINT, 0.2, 60) is None
        await asyncio.sleep(0.4)
        with pytest.raises(ClaimLost):
            async with app.transaction(Claim(store, b"r7", 1), "late"):
                pass
        assert await store.claim(b"r7", 2, FINGERPRINT, 10, 60) is None
    assert await app.effects() == 0


async def test_a_mark_outside_a_transaction_is_refused(ledger_url: str) -> None:
    """A connection in autocommit (or an asyncpg one outside transaction()) would commit the
    mark alone: refused with ConfigError, nothing marked."""
    async with opened(ledger_url) as store:
        assert await store.claim(b"r8", 1, FINGERPRINT, 10, 60) is None
        claim = Claim(store, b"r8", 1)
        if ledger_url.startswith("sqlite:///"):
            conn = sqlite3.connect(ledger_url.removeprefix("sqlite:///"), isolation_level=None)
            try:
                with pytest.raises(ConfigError, match="inside the transaction"):
                    claim.mark(conn)
            finally:
                conn.close()
        else:
            import asyncpg

            connection = await asyncpg.connect(ledger_url.split("?", 1)[0])
            try:
                with pytest.raises(ConfigError, match="inside the transaction"):
                    await claim.amark(connection)
            finally:
                await connection.close()
        record = await store.get(b"r8")
        assert record is not None
        assert record.state is State.IN_FLIGHT
        assert await store.release(b"r8", 1) is True


async def test_operators_see_a_dead_holders_mark_as_not_replayable(ledger_url: str) -> None:
    """The admin listing shows a marked record whose holder died as not replayable (what
    retries get), never as a stuck in-flight key to clear."""
    from retrysafe import admin

    app = AppDatabase(ledger_url)
    async with opened(ledger_url) as store:
        assert await store.claim(b"r9", 1, FINGERPRINT, 0.2, 60) is None
        async with app.transaction(Claim(store, b"r9", 1), "k9"):
            pass
        await asyncio.sleep(0.4)
        listing = await admin.list_records(store, state=State.NOT_REPLAYABLE)
        assert [rid for rid, _ in listing.records] == [b"r9"]
        assert (await admin.list_records(store, state=State.COMMITTED)).records == []
    await app.effects()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_ledger_outside_the_apps_database_refuses_to_mark(
    kind: str, tmp_path: Path
) -> None:
    """memory:// and Redis cannot share the app's transaction: mark says so (ConfigError)."""
    url = fresh_url(kind, tmp_path)
    async with opened(url) as store:
        claim = Claim(store, b"r5", 1)
        with pytest.raises(ConfigError, match="app's own database"):
            claim.mark(sqlite3.connect(":memory:"))
        with pytest.raises(ConfigError, match="app's own database"):
            await claim.amark(object())


# -- over HTTP ------------------------------------------------------------------------------------


def effect_app(database: Path, runs: list[str]) -> Any:
    """``POST /charge?then=ok|raise|rollback``: commits a charge with the claim's mark, then
    answers 201, raises, or raises inside the transaction (rolling the charge back)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        then = scope["query_string"].decode().removeprefix("then=")
        runs.append(then)
        claim = current_claim()
        assert claim is not None
        conn = sqlite3.connect(database)
        try:
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS charges (n INTEGER)")
                conn.execute("INSERT INTO charges VALUES (1)")
                claim.mark(conn)
                if then == "rollback":
                    raise RuntimeError("failed before the commit")
        finally:
            conn.close()
        if then == "raise":
            raise RuntimeError("failed after the commit")
        body = b'{"charged": true}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def charges(database: Path) -> int:
    conn = sqlite3.connect(database)
    try:
        return int(conn.execute("SELECT count(*) FROM charges").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("then", "retry_status", "runs_after", "charged"),
    [("ok", 201, 1, 1), ("raise", 410, 1, 1), ("rollback", 500, 2, 0)],
)
def test_an_effect_committed_with_its_mark_is_never_run_twice(
    tmp_path: Path, then: str, retry_status: int, runs_after: int, charged: int
) -> None:
    """A handler that committed its charge with the mark is replayed (201) or, if it failed
    afterwards, refused (410); one whose transaction rolled back is released and runs again."""
    database = tmp_path / "app.db"
    runs: list[str] = []
    store = SQLiteStore(str(database))
    app = IdempotencyMiddleware(effect_app(database, runs), store=store)
    try:
        with serve_in_thread(app) as url:
            headers = {"Idempotency-Key": f"charge-{then}"}
            first = httpx.post(f"{url}/charge?then={then}", headers=headers, timeout=30)
            retry = httpx.post(f"{url}/charge?then={then}", headers=headers, timeout=30)
    finally:
        asyncio.run(store.aclose())
    assert first.status_code == (201 if then == "ok" else 500)
    assert retry.status_code == retry_status, retry.text
    if then == "ok":
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.content == first.content
    if then == "raise":
        assert retry.json()["type"].endswith("replay-unavailable")
    assert len(runs) == runs_after
    assert charges(database) == charged


def test_no_claim_once_the_outcome_is_recorded(tmp_path: Path) -> None:
    """After the response's last byte (a background task) current_claim() is None, and a
    Claim kept from before refuses to mark: the outcome is already recorded."""
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        claim = current_claim()
        assert claim is not None
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        seen.append(current_claim())  # what a Starlette BackgroundTask would see
        conn = sqlite3.connect(tmp_path / "ledger.db")
        try:
            with conn, pytest.raises(ClaimLost, match="already recorded"):
                claim.mark(conn)
        finally:
            conn.close()
        seen.append("refused")

    store = SQLiteStore(str(tmp_path / "ledger.db"))
    try:
        with serve_in_thread(IdempotencyMiddleware(app, store=store)) as url:
            response = httpx.post(url + "/x", headers={"Idempotency-Key": "k"}, timeout=30)
    finally:
        asyncio.run(store.aclose())
    assert response.status_code == 201
    assert seen == [None, "refused"]


def test_no_claim_without_a_key(tmp_path: Path) -> None:
    """current_claim() is None for a request that carries no key (nothing to mark)."""
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        seen.append(current_claim())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    store = SQLiteStore(str(tmp_path / "ledger.db"))
    try:
        with serve_in_thread(IdempotencyMiddleware(app, store=store)) as url:
            assert httpx.post(url + "/x", timeout=30).status_code == 204
            assert httpx.post(url + "/x", headers={"Idempotency-Key": "k"}).status_code == 204
    finally:
        asyncio.run(store.aclose())
    assert seen[0] is None
    assert isinstance(seen[1], Claim)


class CancelledAfterWrite(Store):
    """A ledger (delegating to ``inner``) on which the next ``complete`` lands and then its
    caller is cancelled, as a server's shutdown can do between a commit and its answer."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.dbapi_paramstyle = inner.dbapi_paramstyle
        self.cancel_next = False

    def mark_statement(self, paramstyle: str) -> str:
        return self.inner.mark_statement(paramstyle)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.claim(*args, **kwargs)

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        return await self.inner.renew(rid, token, lease)

    async def complete(self, *args: Any) -> bool:
        held = await self.inner.complete(*args)
        if self.cancel_next:
            self.cancel_next = False
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the cancellation lands here, after the write
        return held

    async def release(self, rid: bytes, token: int) -> bool:
        return await self.inner.release(rid, token)

    async def get(self, rid: bytes) -> Any:
        return await self.inner.get(rid)

    async def delete(self, rid: bytes) -> bool:
        return await self.inner.delete(rid)

    async def purge_expired(self, limit: int = 1000) -> int:
        return await self.inner.purge_expired(limit)

    async def scan(self, cursor: str | None = None, limit: int = 100) -> Any:
        return await self.inner.scan(cursor, limit)

    async def stats(self) -> Any:
        return await self.inner.stats()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_abort_cancelled_after_keeping_a_marked_effect_keeps_it(tmp_path: Path) -> None:
    """A handler that committed its effect with the mark, then failed: if the cancellation
    of a shutdown lands just after the record was kept as not replayable, the write made
    again never releases it, and the retry gets 410 instead of a second run."""
    from retrysafe import Decision, Engine, Event, Execution, Problem, ProblemType, RequestView

    path = tmp_path / "ledger.db"
    store = CancelledAfterWrite(SQLiteStore(str(path)))
    events: list[Decision] = []
    engine = Engine(store, hooks=[events.append])
    request = RequestView("POST", "/charge", b"", [], b"{}")
    execution = await engine.begin(request, "k", engine.policy)
    assert isinstance(execution, Execution)
    assert execution.claim is not None
    conn = sqlite3.connect(path)
    with conn:
        execution.claim.mark(conn)
    conn.close()
    store.cancel_next = True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(execution.abort("the handler raised an exception"))
    await engine.aclose()  # waits for the write made again
    engine = Engine(SQLiteStore(str(path)))
    retry = await engine.begin(request, "k", engine.policy)
    await engine.aclose()
    assert isinstance(retry, Problem)
    assert retry.type is ProblemType.REPLAY_UNAVAILABLE
    assert [d.event for d in events][-1] is Event.NOT_REPLAYABLE  # what really happened
