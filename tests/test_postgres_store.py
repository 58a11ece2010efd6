"""The PostgreSQL ledger beyond the store contract: URL options, schema, pool, notifications,
failures and recovery, event loops and forks.

Every test runs against the real server of ``RETRYSAFE_TEST_POSTGRES`` (conftest.py), in a
table of its own that is dropped afterwards. Faults are real too: backends are killed with
``pg_terminate_backend``, and the HTTP test puts a TCP relay (a fault injector it can cut)
between the app and the real server. No test asserts how long anything took, except
generous upper bounds that only catch hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
import secrets
import signal
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from conftest import drop_postgres_table, fresh_url, require_server
from servers import Receive, Relay, Scope, Send, free_port, poll_until, serve_in_thread

from retrysafe import ConfigError, IdempotencyMiddleware, StoreUnavailable, open_store
from retrysafe.errors import CorruptRecord
from retrysafe.records import State
from retrysafe.stores import postgres
from retrysafe.stores.postgres import PostgresStore

asyncpg: Any = importlib.import_module("asyncpg")

pytestmark = pytest.mark.anyio

FP = b"fingerprint-1"
LONG = 60.0
"""A lease or ttl that never runs out during a test."""
SECRET = "hunter2-secret"


def rid() -> bytes:
    return os.urandom(32)


def token() -> int:
    return secrets.randbits(63)


def with_options(url: str, **options: object) -> str:
    """``url`` with more query options."""
    extra = "&".join(f"{name}={value}" for name, value in options.items())
    return f"{url}&{extra}" if extra else url


def table_of(url: str) -> str:
    return dict(p.split("=", 1) for p in urlsplit(url).query.split("&"))["table"]


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL ledger URL (its own table, dropped after the test)."""
    url = fresh_url("postgres", tmp_path)
    yield url
    drop_postgres_table(url)


@contextlib.asynccontextmanager
async def admin() -> AsyncIterator[Any]:
    """A plain asyncpg connection to the test database, for looking behind the store."""
    conn = await asyncpg.connect(require_server("postgres"))
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresStore]:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    try:
        yield store
    finally:
        await store.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = 20) -> None:
    """Wait until ``check()`` holds; fail after ``limit`` seconds (only catches hangs)."""
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110 - the server's state: nothing to await
            await asyncio.sleep(0.02)


async def backends(application_name: str) -> list[tuple[int, str]]:
    """(pid, last query) of the server's backends with this application_name."""
    async with admin() as conn:
        rows = await conn.fetch(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )
    return [(row["pid"], row["query"]) for row in rows]


async def terminate(pids: list[int]) -> None:
    async with admin() as conn:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)


# -- URL and options --------------------------------------------------------------------------


def test_url_options_are_read() -> None:
    """Every option of the URL reaches the store; connection parameters pass through."""
    store = open_store(
        f"postgres://app:{SECRET}@db.example:6543/ledger?table=Ledger_2&min_size=0&max_size=3"
        "&timeout=1.5&create=false&statement_cache_size=0&sslmode=disable"
        "&application_name=billing"
    )
    assert isinstance(store, PostgresStore)
    assert (store.table, store.min_size, store.max_size) == ("Ledger_2", 0, 3)
    assert (store.timeout, store.create) == (1.5, False)
    assert store._connect_options["statement_cache_size"] == 0
    assert "server_settings" not in store._connect_options  # application_name is the URL's
    assert "sslmode=disable" in store._dsn
    assert "table" not in store._dsn
    assert SECRET not in store.where
    defaults = open_store("postgresql://127.0.0.1/db")
    assert isinstance(defaults, PostgresStore)
    assert (defaults.table, defaults.min_size, defaults.max_size) == ("retrysafe_records", 1, 10)
    assert (defaults.timeout, defaults.create) == (5.0, True)


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("tabel=x", "unknown option"),
        ("table=x&table=y", "more than once"),
        ("table=bad-name", "table"),
        ("table=" + "x" * 49, "table"),
        ("table=a%22b", "table"),
        ("max_size=0", "max_size"),
        ("max_size=many", "max_size"),
        ("min_size=5&max_size=2", "min_size"),
        ("timeout=0", "timeout"),
        ("timeout=soon", "timeout"),
        ("timeout=nan", "timeout"),
        ("create=maybe", "create"),
        ("statement_cache_size=-1", "statement_cache_size"),
        ("sslmode=sometimes", "sslmode"),
        (f"password={SECRET}&tabel=x", "unknown option"),
    ],
)
def test_bad_options_are_config_errors_that_hide_the_password(query: str, complaint: str) -> None:
    """A bad or unknown option is a ConfigError at construction, naming it, never the password."""
    with pytest.raises(ConfigError) as caught:
        open_store(f"postgresql://app:{SECRET}@127.0.0.1:5432/db?{query}")
    assert complaint in str(caught.value)
    assert SECRET not in str(caught.value)


async def test_an_unreachable_server_is_unavailable_and_the_password_stays_hidden() -> None:
    """Connection refused is StoreUnavailable (a 503), and its message hides the password."""
    url = f"postgresql://app:{SECRET}@127.0.0.1:{free_port()}/db?timeout=2"
    async with opened(url) as store:
        for _ in range(3):  # the first attempt, then the fail-fast window
            with pytest.raises(StoreUnavailable) as caught:
                await store.claim(rid(), token(), FP, LONG, LONG)
            assert SECRET not in str(caught.value)
            assert "127.0.0.1" in str(caught.value)


# -- schema -----------------------------------------------------------------------------------


async def test_the_schema_is_created_on_first_use(pg_url: str) -> None:
    """The first operation creates the table, its expiry index and its version comment."""
    table = table_of(pg_url)
    async with opened(pg_url) as store:
        assert await store.get(rid()) is None
    async with admin() as conn:
        comment = await conn.fetchval(
            "SELECT obj_description(to_regclass($1), 'pg_class')", f'"{table}"'
        )
        indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = $1", table)
    assert comment == f"retrysafe ledger schema {postgres.SCHEMA_VERSION}"
    assert {row["indexname"] for row in indexes} == {f"{table}_pkey", f"{table}_expiry"}


async def test_a_raw_at_sign_in_the_password_reaches_the_server(pg_url: str) -> None:
    """postgresql://user:p@ss@host: the last '@' ends the password, as the docs say (asyncpg
    alone split at the first and looked up a host named 'ss@host')."""
    parts = urlsplit(pg_url)
    user, _, host = parts.netloc.rpartition("@")
    url = parts._replace(netloc=f"{user.partition(':')[0] or 'postgres'}:p@ss@{host}").geturl()
    async with opened(url) as store:  # trust auth: any password is accepted
        assert await store.get(rid()) is None


async def test_create_false_without_the_table_names_store_init(pg_url: str) -> None:
    """With create=false and no table: StoreUnavailable naming `retrysafe store init`, no DDL."""
    table = table_of(pg_url)
    url = with_options(pg_url.replace("postgres@", f"postgres:{SECRET}@"), create="false")
    async with opened(url) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim(rid(), token(), FP, LONG, LONG)
        assert "retrysafe store init" in str(caught.value)
        assert f"table={table}" in str(caught.value)
        assert SECRET not in str(caught.value)
        async with admin() as conn:
            assert await conn.fetchval("SELECT to_regclass($1)", f'"{table}"') is None
        await store.initialize()  # what `retrysafe store init` runs: it creates regardless
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None


async def test_initialize_is_idempotent(pg_url: str) -> None:
    """initialize() twice, and from three handles at once, leaves one working schema."""
    async with opened(pg_url) as store:
        await store.initialize()
        await store.initialize()
        r = rid()
        assert await store.claim(r, token(), FP, LONG, LONG) is None
    handles = [open_store(pg_url) for _ in range(3)]
    try:
        await asyncio.gather(*(handle.initialize() for handle in handles))
        assert await handles[0].get(r) is not None  # the record survived
    finally:
        for handle in handles:
            await handle.aclose()


async def test_initialize_on_a_live_ledger_waits_for_no_open_transaction(pg_url: str) -> None:
    """`store init` on a ledger whose row an app's open transaction marked neither blocks
    (its CREATE INDEX queued behind that transaction) nor holds back the claims behind it."""
    url = with_options(pg_url, timeout=1)
    async with opened(url) as store, opened(url) as init, admin() as app:
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        async with app.transaction():
            status = await app.execute(store.mark_statement("numeric_dollar"), r, t, LONG)
            assert status == "UPDATE 1"
            initializing = asyncio.ensure_future(init.initialize())
            assert await store.claim(rid(), token(), FP, LONG, LONG) is None
            await initializing
        assert (await store.get(r)) is not None


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    """A table stamped with a newer schema version is StoreUnavailable, for use and for init."""
    table = table_of(pg_url)
    async with opened(pg_url) as store:
        await store.initialize()
    async with admin() as conn:
        await conn.execute(f"COMMENT ON TABLE \"{table}\" IS 'retrysafe ledger schema 99'")
    async with opened(pg_url) as store:
        with pytest.raises(StoreUnavailable, match="schema 99"):
            await store.claim(rid(), token(), FP, LONG, LONG)
        with pytest.raises(StoreUnavailable, match="schema 99"):
            await store.initialize()


async def test_a_foreign_table_of_that_name_is_refused(pg_url: str) -> None:
    """A table of the same name that retrysafe did not create is never used or altered."""
    table = table_of(pg_url)
    async with admin() as conn:
        await conn.execute(f'CREATE TABLE "{table}" (id int)')
    async with opened(pg_url) as store:
        with pytest.raises(StoreUnavailable, match="not a retrysafe ledger"):
            await store.get(rid())


# -- claims under concurrency -----------------------------------------------------------------


async def test_a_hundred_tasks_on_a_pool_of_two_all_finish_with_one_winner_per_key(
    pg_url: str,
) -> None:
    """100 concurrent claims (20 keys x 5) through max_size=2: no starvation, one winner each."""
    name = f"rs{uuid.uuid4().hex[:12]}"
    url = with_options(pg_url, max_size=2, application_name=name)
    keys = [rid() for _ in range(20)]
    async with opened(url) as store:

        async def contender(r: bytes) -> int | None:
            t = token()
            if await store.claim(r, t, FP, LONG, LONG) is not None:
                return None
            assert await store.complete(r, t, State.DONE, b"done", LONG)
            return t

        tasks = [contender(r) for r in keys for _ in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert len(await backends(name)) <= 2
        for i, r in enumerate(keys):
            winners = [t for t in results[i * 5 : i * 5 + 5] if t is not None]
            assert len(winners) == 1
            record = await store.get(r)
            assert record is not None
            assert (record.token, record.state) == (winners[0], State.DONE)


async def test_a_takeover_that_waited_for_a_row_lock_gets_a_whole_lease(pg_url: str) -> None:
    """A claim that waits for the old holder's row lock (its marking transaction outlived the
    lease, then rolled back) gets its lease from when it writes, not from before the wait."""
    lease = 1.0
    table = table_of(pg_url)

    async def waiting_for_the_row() -> bool:
        async with admin() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND position($1 in query) > 0",
                    f'"{table}"',
                )
            )

    async with opened(pg_url) as store, admin() as app:
        r = rid()
        assert await store.claim(r, 1, FP, lease, LONG) is None
        effect = app.transaction()
        await effect.start()
        status = await app.execute(store.mark_statement("numeric_dollar"), r, 1, LONG)
        assert status == "UPDATE 1"
        await asyncio.sleep(lease + 0.1)  # the holder's lease runs out under its own lock
        taking = asyncio.ensure_future(store.claim(r, 2, FP, lease, LONG))
        await eventually(waiting_for_the_row, "the claim to wait for the row's lock")
        await asyncio.sleep(0.5)
        before = await app.fetchval("SELECT date_part('epoch', clock_timestamp())")
        await effect.rollback()  # the effect failed: the key may be taken over
        assert await taking is None
        record = await store.get(r)
        assert record is not None
        assert record.token == 2
        assert record.lease_until >= before + lease  # the wait did not eat into the lease


async def test_the_claim_race_always_answers_one_winner_and_the_record(pg_url: str) -> None:
    """Claims racing on fresh keys from 8 handles: one None, every other the winner's record."""
    handles = [open_store(with_options(pg_url, max_size=2)) for _ in range(8)]
    try:
        await asyncio.gather(*(handle.get(rid()) for handle in handles))  # connect them all
        for _ in range(15):
            r = rid()
            tokens = [token() for _ in range(4 * len(handles))]
            results = await asyncio.gather(
                *(handles[i % 8].claim(r, t, FP, LONG, LONG) for i, t in enumerate(tokens))
            )  # an exception here fails the test: none is allowed
            winners = [t for t, found in zip(tokens, results, strict=True) if found is None]
            assert len(winners) == 1
            for found in results:
                assert found is None or (found.token, found.state) == (winners[0], State.IN_FLIGHT)
    finally:
        for handle in handles:
            await handle.aclose()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_the_claim_race_answers_the_record_under_a_stricter_default_isolation(
    pg_url: str, isolation: str
) -> None:
    """With default_transaction_isolation above READ COMMITTED, racing claims still get one
    winner and the winner's record (a lost race is looked at again, never a StoreBusy)."""
    setting = quote(f"-c default_transaction_isolation={isolation.replace(' ', chr(92) + ' ')}")
    url = with_options(pg_url, max_size=16, options=setting)
    async with opened(url) as store:
        for _ in range(15):
            r = rid()
            tokens = [token() for _ in range(16)]
            results = await asyncio.gather(*(store.claim(r, t, FP, LONG, LONG) for t in tokens))
            winners = [t for t, found in zip(tokens, results, strict=True) if found is None]
            assert len(winners) == 1
            for found in results:
                assert found is None or (found.token, found.state) == (winners[0], State.IN_FLIGHT)


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_renewals_waiters_and_completions_collide_harmlessly_under_a_stricter_isolation(
    pg_url: str, isolation: str
) -> None:
    """Under default_transaction_isolation above READ COMMITTED, a completion racing the
    heartbeat's renewal or a waiter's mark on the same row is run again, never lost."""
    setting = quote(f"-c default_transaction_isolation={isolation.replace(' ', chr(92) + ' ')}")
    url = with_options(pg_url, max_size=16, options=setting)
    async with opened(url) as store:
        for i in range(60):
            r, t = rid(), token()
            assert await store.claim(r, t, FP, LONG, LONG) is None
            rival = store.renew(r, t, LONG) if i % 2 else store.wait(r, 0.5)
            _, completed = await asyncio.gather(
                rival, store.complete(r, t, State.DONE, b"resp", LONG)
            )
            assert completed is True
            record = await store.get(r)
            assert record is not None
            assert record.state is State.DONE


async def test_a_replay_writes_nothing(pg_url: str) -> None:
    """Claims that find a final record neither update nor lock its row (no dead tuples)."""
    table = table_of(pg_url)
    async with opened(pg_url) as store:
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        assert await store.complete(r, t, State.DONE, b"resp", LONG)
        async with admin() as conn:
            query = f'SELECT xmin::text, xmax::text, ctid::text FROM "{table}" WHERE rid = $1'
            before = await conn.fetchrow(query, r)
            for _ in range(20):
                found = await store.claim(r, token(), FP, LONG, LONG)
                assert found is not None
                assert found.response == b"resp"
            after = await conn.fetchrow(query, r)
        assert tuple(after) == tuple(before)
        assert after["xmax"] == "0"


# -- corrupt rows -----------------------------------------------------------------------------


async def test_a_corrupt_row_is_absent_for_the_engine(pg_url: str) -> None:
    """A row with an impossible state (written behind the store) is dropped and re-executed."""
    table = table_of(pg_url)
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        calls.append(1)
        body = json.dumps({"n": len(calls)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    middleware = IdempotencyMiddleware(app, store=pg_url)
    transport = httpx.ASGITransport(app=middleware)
    headers = {"Idempotency-Key": "corrupt-1"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = await client.post("/pay", headers=headers, content=b"{}")
            assert (first.status_code, first.json()) == (200, {"n": 1})
            async with admin() as conn:
                assert await conn.execute(f'UPDATE "{table}" SET state = 7') == "UPDATE 1"
            (stored,) = await conn_rids(table)
            with pytest.raises(CorruptRecord):
                await middleware.engine.store.get(stored)
            second = await client.post("/pay", headers=headers, content=b"{}")
            assert (second.status_code, second.json()) == (200, {"n": 2})
            third = await client.post("/pay", headers=headers, content=b"{}")
            assert third.headers.get("idempotent-replayed") == "true"
            assert third.json() == {"n": 2}
    finally:
        await middleware.aclose()
    assert len(calls) == 2


async def conn_rids(table: str) -> list[bytes]:
    async with admin() as conn:
        return [row["rid"] for row in await conn.fetch(f'SELECT rid FROM "{table}"')]


# -- waiting ----------------------------------------------------------------------------------


async def watched(table: str, r: bytes) -> bool:
    async with admin() as conn:
        return bool(await conn.fetchval(f'SELECT watched FROM "{table}" WHERE rid = $1', r))


@pytest.mark.parametrize("outcome", ["complete", "release"])
async def test_wait_returns_when_another_handle_completes_or_releases(
    pg_url: str, outcome: str
) -> None:
    """A waiter is woken by the notification of a completion or release made elsewhere."""
    table = table_of(pg_url)
    async with opened(pg_url) as holder, opened(pg_url) as waiter:
        r, t = rid(), token()
        assert await holder.claim(r, t, FP, LONG, LONG) is None
        waiting = asyncio.ensure_future(asyncio.wait_for(waiter.wait(r, 30), timeout=10))
        await eventually(lambda: watched(table, r), "the waiter to mark the record")
        assert not waiting.done()
        if outcome == "complete":
            assert await holder.complete(r, t, State.DONE, b"resp", LONG)
        else:
            assert await holder.release(r, t)
        await waiting  # well before its own 30 s: a TimeoutError here fails the test


async def test_wait_ends_with_the_lease_of_a_dead_holder(pg_url: str) -> None:
    """With nobody left to notify, a waiter still returns when the holder's lease runs out."""
    async with opened(pg_url) as store:
        r = rid()
        assert await store.claim(r, token(), FP, 0.3, LONG) is None
        await asyncio.wait_for(store.wait(r, 30), timeout=10)
        assert await store.claim(r, token(), FP, LONG, LONG) is None  # the lease is over


async def test_a_completed_record_is_not_waited_for(pg_url: str) -> None:
    """wait() on a record that is no longer in flight returns at once."""
    async with opened(pg_url) as store:
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        assert await store.complete(r, t, State.DONE, b"resp", LONG)
        await asyncio.wait_for(store.wait(r, 30), timeout=10)
        await asyncio.wait_for(store.wait(rid(), 30), timeout=10)


async def test_the_listener_reconnects_after_its_backend_is_terminated(pg_url: str) -> None:
    """pg_terminate_backend on the listening connection: the next wait listens again."""
    table = table_of(pg_url)
    name = f"rs{uuid.uuid4().hex[:12]}"
    url = with_options(pg_url, application_name=name)

    async def listening() -> list[int]:
        return [pid for pid, query in await backends(name) if query.startswith("LISTEN")]

    async with opened(url) as holder, opened(url) as waiter:
        for round_ in range(3):
            r, t = rid(), token()
            assert await holder.claim(r, t, FP, LONG, LONG) is None
            waiting = asyncio.ensure_future(asyncio.wait_for(waiter.wait(r, 30), timeout=10))
            await eventually(functools.partial(watched, table, r), "the waiter to mark it")
            pids = await listening()
            assert len(pids) == 1
            assert await holder.complete(r, t, State.DONE, b"resp", LONG)
            await waiting
            if round_ < 2:
                await terminate(pids)
                await eventually(functools.partial(_gone, listening, pids), "the backend to end")


async def _gone(listing: Callable[[], Awaitable[list[int]]], pids: list[int]) -> bool:
    return not set(pids) & set(await listing())


async def test_wait_polls_when_it_cannot_listen(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the listening connection cannot be opened, wait() falls back to a short poll."""
    async with opened(pg_url) as store:
        r = rid()
        assert await store.claim(r, token(), FP, LONG, LONG) is None  # the pool is connected

        async def refused() -> Any:
            raise ConnectionRefusedError("new connections refused")

        monkeypatch.setattr(store, "connect", refused)
        for _ in range(3):
            await asyncio.wait_for(store.wait(r, 30), timeout=10)
        record = await store.get(r)  # nothing happened to it: the waits were polls
        assert record is not None
        assert record.state is State.IN_FLIGHT


async def test_waiters_are_woken_when_the_listener_is_lost(pg_url: str) -> None:
    """Notifications may be missed while the listener is down: its waiters return at once."""
    name = f"rs{uuid.uuid4().hex[:12]}"
    url = with_options(pg_url, application_name=name)
    table = table_of(pg_url)
    async with opened(url) as store:
        r = rid()
        assert await store.claim(r, token(), FP, LONG, LONG) is None
        waiting = asyncio.ensure_future(asyncio.wait_for(store.wait(r, 30), timeout=10))
        await eventually(lambda: watched(table, r), "the waiter to mark the record")
        await terminate([pid for pid, query in await backends(name) if query.startswith("LISTEN")])
        await waiting


class FlowRelay:
    """A TCP relay on the test's own loop whose flows can each go silent: their bytes are
    dropped both ways and nothing is closed (a NAT or firewall that forgot one idle flow)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flows: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FlowRelay:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for flow in self.flows:
            for writer in flow["writers"]:
                writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection(*self.target)
        flow = {"silent": False, "closed": False, "writers": (writer, upstream)}
        self.flows.append(flow)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not flow["silent"]:
                        sink.write(data)
                        await sink.drain()
            sink.transport.abort()
            flow["closed"] = True

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, upstream), pump(upstream_reader, writer))


async def _closed(flow: dict[str, Any]) -> bool:
    return bool(flow["closed"])


async def test_a_listener_whose_flow_went_silent_delays_no_waiter_and_is_replaced(
    pg_url: str,
) -> None:
    """A listening connection that silently stops passing bytes: waiters still see completions
    (by looking again), and the dead listener is found out and replaced."""
    parts = urlsplit(pg_url)
    async with FlowRelay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
        url = with_options(pg_url.replace(f":{parts.port}/", f":{relay.port}/"), timeout=1)
        table = table_of(pg_url)
        async with opened(url) as waiter, opened(pg_url) as holder:
            for round_ in range(3):
                r, t = rid(), token()
                assert await holder.claim(r, t, FP, LONG, LONG) is None
                waiting = asyncio.ensure_future(asyncio.wait_for(waiter.wait(r, 30), timeout=10))
                await eventually(functools.partial(watched, table, r), "the waiter to mark it")
                assert await holder.complete(r, t, State.DONE, b"resp", LONG)
                await waiting  # well before the lease (60 s) or the wait (30 s) ends
                if round_ == 0:
                    listener = relay.flows[0]  # a waiter listens before it marks the record
                    listener["silent"] = True
                    assert await waiter.get(r) is not None  # the pool's flow still passes
                if round_ == 1:
                    await eventually(functools.partial(_closed, listener), "it to be dropped")


# -- failures and recovery --------------------------------------------------------------------


async def test_the_pool_recovers_after_its_connections_are_terminated(pg_url: str) -> None:
    """Every pooled backend killed: an operation or two fail (503), then the same store works."""
    name = f"rs{uuid.uuid4().hex[:12]}"
    url = with_options(pg_url, application_name=name, max_size=4)
    async with opened(url) as store:
        await asyncio.gather(*(store.claim(rid(), token(), FP, LONG, LONG) for _ in range(8)))
        assert len(await backends(name)) >= 2
        for _ in range(2):
            await terminate([pid for pid, _ in await backends(name)])
            failures = 0
            for _ in range(10):
                try:
                    assert await store.claim(rid(), token(), FP, LONG, LONG) is None
                    break
                except StoreUnavailable:
                    failures += 1
            assert failures <= 2
            results = await asyncio.gather(*(store.get(rid()) for _ in range(20)))
            assert results == [None] * 20


def test_the_store_works_across_event_loops_without_closing(pg_url: str) -> None:
    """Two asyncio.run calls in turn, no aclose in between: the second opens a pool of its own."""
    store = open_store(pg_url)
    r, t = rid(), token()

    async def first() -> None:
        assert await store.claim(r, t, FP, LONG, LONG) is None

    async def second() -> None:
        record = await store.get(r)
        assert record is not None
        assert record.token == t
        assert await store.complete(r, t, State.DONE, b"resp", LONG)

    async def third() -> None:
        record = await store.claim(r, token(), FP, LONG, LONG)
        assert record is not None
        assert record.response == b"resp"
        await store.aclose()

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(third())


forks = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@forks
def test_a_forked_child_opens_its_own_connections(pg_url: str) -> None:
    """A forked child works on connections of its own; the parent's stay untouched and usable."""
    store = open_store(pg_url)
    parent_rid, child_rid, child_token = rid(), rid(), token()

    async def parent_before() -> None:
        assert await store.claim(parent_rid, token(), FP, LONG, LONG) is None

    async def child() -> None:
        assert await store.get(parent_rid) is not None
        assert await store.claim(child_rid, child_token, FP, LONG, LONG) is None
        assert await store.complete(child_rid, child_token, State.DONE, b"child", LONG)
        await store.aclose()

    async def parent_after() -> None:
        record = await store.get(child_rid)
        assert record is not None
        assert record.response == b"child"
        await store.aclose()

    # The parent's pool lives on a loop that stays open (and idle) across the fork.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parent_before())
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns into pytest
            code = 1
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(30)
                asyncio.run(child())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        loop.run_until_complete(parent_after())
    finally:
        loop.close()


async def test_purge_deletes_only_expired_records_in_bounded_batches(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """purge_expired(limit) deletes expired rows only, at most limit, PURGE_BATCH at a time."""
    monkeypatch.setattr(postgres, "PURGE_BATCH", 3)
    statements: list[int] = []
    async with opened(pg_url) as store:
        live = [rid() for _ in range(4)]
        for r in live:
            assert await store.claim(r, token(), FP, LONG, LONG) is None
        for _ in range(10):
            assert await store.claim(rid(), token(), FP, 0.2, 0.2) is None
        await asyncio.sleep(0.35)
        real_run = store._run

        async def counting_run(op: Callable[[Any], Awaitable[Any]]) -> Any:
            result = await real_run(op)
            if isinstance(result, str) and result.startswith("DELETE"):
                statements.append(int(result.split()[1]))
            return result

        monkeypatch.setattr(store, "_run", counting_run)
        assert await store.purge_expired(limit=7) == 7
        assert statements == [3, 3, 1]
        assert await store.purge_expired() == 3
        assert await store.purge_expired() == 0
        assert None not in [await store.get(r) for r in live]
        assert (await store.stats()).in_flight == 4


# -- the HTTP face while the ledger goes away and comes back -----------------------------------


@pytest.mark.parametrize("fault", ["down", "stall"])
def test_http_requests_get_503_while_the_ledger_is_unreachable_then_succeed(
    pg_url: str, fault: str
) -> None:
    """Ledger cut off: 503 problem+json with Retry-After, handler never run; back: 201 again."""
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    url = with_options(pg_url.replace(f":{parts.port}/", f":{relay.port}/"), timeout=1)
    executed: list[str] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # its shutdown lets the middleware close the ledger
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body", False):
            pass
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        executed.append(key)
        body = json.dumps({"key": key}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    answers: list[tuple[str, int, str, str | None]] = []
    """(key, status, content type, Retry-After) per request, in order."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def client_loop(base: str) -> None:
        try:
            with httpx.Client(base_url=base, timeout=30) as client:
                while not stop.is_set():
                    key = uuid.uuid4().hex
                    response = client.post("/orders", headers={"Idempotency-Key": key}, json={})
                    answers.append(
                        (
                            key,
                            response.status_code,
                            response.headers.get("content-type", ""),
                            response.headers.get("retry-after"),
                        )
                    )
        except BaseException as exc:
            failures.append(exc)

    def count(status: int, since: int) -> int:
        return sum(1 for answer in answers[since:] if answer[1] == status)

    try:
        with serve_in_thread(IdempotencyMiddleware(handler, store=url), lifespan="on") as base:
            clients = [threading.Thread(target=client_loop, args=(base,)) for _ in range(2)]
            for client in clients:
                client.start()
            try:
                poll_until(lambda: count(201, 0) >= 10, timeout=60, what="requests to succeed")
                relay.cut(fault)
                cut_at = len(answers)
                poll_until(lambda: count(503, cut_at) >= 6, timeout=60, what="503 answers")
                relay.restore()
                restored_at = len(answers)
                poll_until(lambda: count(201, restored_at) >= 10, timeout=60, what="recovery")
            finally:
                stop.set()
                for client in clients:
                    client.join(60)
    finally:
        relay.close()
    assert failures == []
    assert {status for _, status, _, _ in answers} <= {201, 503}
    for _, status, content_type, retry_after in answers:
        if status == 503:
            assert content_type == "application/problem+json"
            assert retry_after is not None
    # Every 201 is one execution and every execution answered 201: no 503 ran the handler.
    assert sorted(executed) == sorted(key for key, status, _, _ in answers if status == 201)
    assert [status for _, status, _, _ in answers[-5:]] == [201] * 5


async def test_a_completion_cancelled_mid_write_is_made_again(pg_url: str) -> None:
    """A server shutdown cancelling a request while its outcome is being written (the ledger
    slow, here locked) loses nothing: the write is made again, the retry replays, the
    handler ran once."""
    table = table_of(pg_url)
    runs: list[int] = []
    go = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        runs.append(1)
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await go.wait()
        await send({"type": "http.response.body", "body": b"ok"})

    async def post(middleware: IdempotencyMiddleware) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"{}"}
            await asyncio.sleep(3600)  # the client stays
            raise AssertionError

        async def send(message: Any) -> None:
            sent.append(message)

        headers = [(b"idempotency-key", b"cancelled-write")]
        scope = {"type": "http", "method": "POST", "path": "/charge", "query_string": b"",
                 "root_path": "", "headers": headers}  # fmt: skip
        await middleware(scope, receive, send)
        return sent

    first = IdempotencyMiddleware(app, store=pg_url, lease=1)
    task = asyncio.ensure_future(post(first))
    await asyncio.sleep(0.3)  # claimed, 201 sent
    async with admin() as locker, locker.transaction():
        await locker.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        go.set()  # the last body: the completion now waits for the lock
        await asyncio.sleep(0.3)
        task.cancel()  # the server's shutdown timeout
        with pytest.raises(asyncio.CancelledError):
            await task
    await first.aclose()  # the lifespan shutdown: waits for the write made again
    await asyncio.sleep(1.2)  # the lease has run out too
    go.set()
    second = IdempotencyMiddleware(app, store=pg_url, lease=1)
    replay = await post(second)
    await second.aclose()
    assert replay[0]["status"] == 201
    assert (b"idempotent-replayed", b"true") in replay[0]["headers"]
    assert runs == [1]
