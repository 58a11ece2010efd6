"""The SQLite ledger beyond the store contract: fork safety, purging off the event loop,
busy versus down, group commit, and configuration errors found at construction.

Fork tests really fork (``os.fork``): the child runs a fresh event loop, reports through its
exit status and leaves with ``os._exit``, so it never returns into pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import secrets
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import exit_code, fork_child

from retrysafe import ConfigError, CorruptRecord, StoreBusy, StoreUnavailable, open_store
from retrysafe.records import State
from retrysafe.stores import SQLiteStore
from retrysafe.stores.sqlite import (
    FILE_CHECK_INTERVAL,
    GROUP_PAUSE,
    GROUP_SAMPLE,
    LARGE_WRITE,
    PAGE_SIZE,
    PURGE_BATCH,
    _Checkpointer,
    _is_busy,
)

pytestmark = pytest.mark.anyio

FP = b"fingerprint-1"
LONG = 60.0
"""A lease or ttl that never runs out during a test."""

forks = pytest.mark.filterwarnings(
    # Python 3.12+ warns about fork() in a process with threads (pytest's, asyncio's).
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def rid() -> bytes:
    return os.urandom(32)


def token() -> int:
    return secrets.randbits(63)


class FakeClock:
    """A store clock that moves only when told, and remembers which threads read it."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.threads: set[int] = set()

    def __call__(self) -> float:
        self.threads.add(threading.get_ident())
        return self.now


def checkpointers() -> list[_Checkpointer]:
    return [t for t in threading.enumerate() if isinstance(t, _Checkpointer) and t.is_alive()]


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """File descriptors opened by a test, all closed after it."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- fork safety ------------------------------------------------------------------------------


@forks
def test_a_private_database_survives_a_fork_in_the_parent() -> None:
    """A ":memory:" ledger is its process's own: a fork leaves the parent's records in place
    (an in-flight claim still refuses a duplicate) and gives the child an empty one."""
    store = SQLiteStore(":memory:")
    r = secrets.token_bytes(32)

    async def claim(token: int) -> object:
        return await store.claim(r, token, b"fp", 60, 60)

    assert asyncio.run(claim(1)) is None

    async def child() -> None:
        assert await claim(2) is None  # the child's own, empty database
        await store.aclose()

    assert exit_code(fork_child(child)) == 0
    found = asyncio.run(claim(3))
    assert found is not None
    assert getattr(found, "token", None) == 1
    asyncio.run(store.aclose())


@forks
@pytest.mark.parametrize("order", ["child_claims_first", "parent_closes_first"])
def test_a_claim_made_in_a_forked_child_outlives_the_parents_close(
    ledger: str, order: str, pipes: list[int]
) -> None:
    """A child forked after the parent used the store commits a claim a fresh store sees."""
    store = SQLiteStore(ledger)
    parent_rid, child_rid, child_token = rid(), rid(), token()
    assert asyncio.run(store.claim(parent_rid, token(), FP, LONG, LONG)) is None
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pipes += [ready_r, ready_w, go_r, go_w]

    async def child() -> None:
        os.close(ready_r)
        os.close(go_w)
        if order == "parent_closes_first":
            # The child's connection is open before the parent closes (and checkpoints) its
            # own; the claim is made after. A connection sharing the parent's lock state
            # would write it into a WAL the parent has deleted.
            assert await store.get(parent_rid) is not None
            os.write(ready_w, b"!")
            assert os.read(go_r, 1) == b"!"
        assert await store.claim(child_rid, child_token, FP, LONG, LONG) is None

    pid = fork_child(child)
    os.close(ready_w)
    os.close(go_r)
    if order == "parent_closes_first":
        assert os.read(ready_r, 1) == b"!", "the child failed before its claim"
        asyncio.run(store.aclose())
        os.write(go_w, b"!")
        assert exit_code(pid) == 0
    else:
        assert exit_code(pid) == 0
        asyncio.run(store.aclose())

    async def check() -> None:
        async with SQLiteStore(ledger) as fresh:
            record = await fresh.claim(child_rid, token(), FP, LONG, LONG)
            assert record is not None, "the child's claim was lost: a second execution"
            assert record.token == child_token
            assert record.state is State.IN_FLIGHT

    asyncio.run(check())


@forks
def test_a_forked_child_uses_the_store_normally(ledger: str) -> None:
    """In a forked child every primitive works on the inherited store, and so does the parent."""
    store = SQLiteStore(ledger)
    done_rid, done_token, child_rid, child_token = rid(), token(), rid(), token()

    async def before() -> None:
        assert await store.claim(done_rid, done_token, FP, LONG, LONG) is None
        assert await store.complete(done_rid, done_token, State.DONE, b"parent", LONG)

    asyncio.run(before())

    async def child() -> None:
        record = await store.get(done_rid)
        assert record is not None
        assert record.response == b"parent"
        again = await store.claim(done_rid, token(), FP, LONG, LONG)
        assert again is not None
        assert again.token == done_token
        assert await store.claim(child_rid, child_token, FP, LONG, LONG) is None
        assert await store.renew(child_rid, child_token, LONG)
        assert await store.complete(child_rid, child_token, State.DONE, b"child", LONG)
        assert await store.purge_expired() == 0
        page, _ = await store.scan()
        assert {r for r, _ in page} == {done_rid, child_rid}
        assert (await store.stats()).done == 2
        await store.aclose()

    assert exit_code(fork_child(child)) == 0

    async def after() -> None:
        record = await store.get(child_rid)
        assert record is not None
        assert record.token == child_token
        assert record.response == b"child"
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        await store.aclose()

    asyncio.run(after())


CLAIM_IN_ANOTHER_PROCESS = """
import asyncio, sys
from retrysafe.stores import SQLiteStore
async def main():
    async with SQLiteStore(sys.argv[1]) as store:
        record = await store.claim(bytes.fromhex(sys.argv[2]), 2, b"fingerprint-1", 60, 60)
        print("taken" if record is None else "held")
asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_ledger_file_deleted_or_replaced_is_not_written_on(
    ledger: str, tmp_path: Path, how: str
) -> None:
    """After the ledger file is deleted (or replaced by another) under a running store, its
    claims land in the file other processes open: one key is never claimed in two ledgers."""
    async with SQLiteStore(ledger) as store:
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None  # the file looked at
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ledger + suffix)
        if how == "replaced":  # e.g. a restore: another ledger moved into its place
            async with SQLiteStore(str(tmp_path / "backup.db")) as other:
                await other.initialize()
            os.replace(tmp_path / "backup.db", ledger)
        await asyncio.sleep(FILE_CHECK_INTERVAL)  # it is looked at that often, not every time
        key = rid()
        assert await store.claim(key, 1, FP, LONG, LONG) is None
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLAIM_IN_ANOTHER_PROCESS, ledger, key.hex(),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await child.communicate()
        assert out.decode().strip() == "held"  # the running store's claim is seen there


async def test_aclose_commits_queued_writes_and_stays_closed(ledger: str) -> None:
    """Writes queued when the store is closed are committed, and do not reopen a connection
    (nor a checkpointer thread) on the closed store."""
    store = SQLiteStore(ledger)
    assert await store.claim(rid(), token(), FP, LONG, LONG) is None
    r = rid()
    queued = asyncio.ensure_future(store.claim(r, 1, FP, LONG, LONG))
    await asyncio.sleep(0)  # queued for the next turn's group commit
    await store.aclose()
    assert await queued is None
    assert store._conn is None
    assert store._checkpointer is None
    async with SQLiteStore(ledger) as again:
        record = await again.get(r)
        assert record is not None
        assert record.token == 1


@forks
def test_fork_closes_connections_and_joins_checkpointers(ledger: str, tmp_path: Path) -> None:
    """Before a fork every store's connection is closed and every checkpointer thread ended."""
    used = SQLiteStore(ledger)
    closed = SQLiteStore(str(tmp_path / "other.db"))

    async def use() -> None:
        assert await used.claim(rid(), token(), FP, LONG, LONG) is None
        assert await closed.claim(rid(), token(), FP, LONG, LONG) is None
        await closed.aclose()  # its checkpointer is told to stop, not waited for

    asyncio.run(use())
    assert used._checkpointer is not None
    assert used._checkpointer.is_alive()

    async def child() -> None:
        assert used._conn is None
        assert await used.get(rid()) is None

    assert exit_code(fork_child(child)) == 0
    assert used._conn is None
    assert used._checkpointer is None
    assert checkpointers() == []
    asyncio.run(used.aclose())


async def test_an_unclosed_store_that_is_collected_stops_its_checkpointer(ledger: str) -> None:
    """A store dropped without aclose() does not leave its checkpointer thread running forever."""
    store = SQLiteStore(ledger)
    assert await store.claim(rid(), token(), FP, LONG, LONG) is None
    checkpointer = store._checkpointer
    assert checkpointer is not None
    del store
    gc.collect()
    await asyncio.to_thread(checkpointer.join, 10)
    assert not checkpointer.is_alive()


async def test_a_long_reader_does_not_make_the_checkpointer_stall_writers(
    ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reader pins a long WAL (an app's long query on the shared file), the restarting
    checkpointer cannot reset it: it must not hold every writer back for a second at a time."""
    monkeypatch.setattr(_Checkpointer, "RESTART_FRAMES", 64)
    async with SQLiteStore(ledger) as store:
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        reader = sqlite3.connect(ledger, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM retrysafe_records").fetchone()
            for _ in range(4):  # well past RESTART_FRAMES frames the reader keeps in the WAL
                await asyncio.gather(*(store.claim(rid(), 1, FP, LONG, LONG) for _ in range(64)))
            slowest = 0.0
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.5
            while loop.time() < end:
                start = loop.time()
                assert await store.claim(rid(), token(), FP, LONG, LONG) is None
                slowest = max(slowest, loop.time() - start)
                await asyncio.sleep(0.01)
            assert slowest < 0.5
        finally:
            reader.close()


# -- purge --------------------------------------------------------------------------------------


async def test_purge_runs_in_a_worker_thread(ledger: str) -> None:
    """purge_expired() judges and deletes from a thread other than the event loop's."""
    clock = FakeClock()
    async with SQLiteStore(ledger, clock=clock) as store:
        for _ in range(3):
            assert await store.claim(rid(), token(), FP, 1.0, 1.0) is None
        clock.now += 10
        clock.threads.clear()
        assert await store.purge_expired() == 3
        assert clock.threads
        assert threading.get_ident() not in clock.threads


async def test_a_large_response_is_written_from_a_worker_thread(ledger: str) -> None:
    """A completion past LARGE_WRITE is written off the event loop, fenced, and replayable."""
    clock = FakeClock()
    big, small = os.urandom(LARGE_WRITE + 1), b"small response"
    async with SQLiteStore(ledger, clock=clock) as store:
        first, second, third = rid(), rid(), rid()
        for r in (first, second, third):
            assert await store.claim(r, 7, FP, LONG, LONG) is None
        clock.threads.clear()
        assert await store.complete(first, 7, State.DONE, big, LONG)
        assert threading.get_ident() not in clock.threads
        assert not await store.complete(second, 8, State.DONE, big, LONG)  # not its token
        clock.threads.clear()
        assert await store.complete(third, 7, State.DONE, small, LONG)
        assert clock.threads == {threading.get_ident()}  # small ones stay inline
        record = await store.claim(first, 9, FP, LONG, LONG)
        assert record is not None
        assert (record.state, record.response) == (State.DONE, big)
        record = await store.claim(second, 9, FP, LONG, LONG)
        assert record is not None
        assert (record.state, record.token) == (State.IN_FLIGHT, 7)


async def test_a_large_write_waits_out_another_writers_lock(ledger: str) -> None:
    """A large completion waits for another connection's write lock, then lands (no 503)."""
    async with SQLiteStore(ledger, busy_timeout=30) as store:
        held = rid()
        assert await store.claim(held, 7, FP, LONG, LONG) is None
        other = sqlite3.connect(ledger, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, as another worker would hold it
        try:
            completion = asyncio.ensure_future(
                store.complete(held, 7, State.DONE, os.urandom(LARGE_WRITE + 1), LONG)
            )
            for _ in range(50):  # the loop keeps turning meanwhile
                await asyncio.sleep(0.001)
            assert not completion.done()
            assert await store.get(rid()) is None  # reads go on beside it (WAL)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await completion


async def test_purge_deletes_in_batches_of_at_most_a_hundred(
    ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge of 250 rows runs several DELETEs, none of more than PURGE_BATCH rows."""
    statements: list[str] = []
    connect = SQLiteStore._connect

    def traced(self: SQLiteStore, busy_timeout: float = 0.0) -> sqlite3.Connection:
        conn = connect(self, busy_timeout)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SQLiteStore, "_connect", traced)
    clock = FakeClock()
    async with SQLiteStore(ledger, clock=clock) as store:
        live = rid()
        assert await store.claim(live, token(), FP, LONG * 1000, LONG * 1000) is None
        for _ in range(250):
            assert await store.claim(rid(), token(), FP, 1.0, 1.0) is None
        clock.now += 10
        statements.clear()
        assert await store.purge_expired(limit=230) == 230
        limits = [
            int(m.group(1))
            for s in statements
            if s.startswith("DELETE")
            for m in [re.search(r"LIMIT (\d+)", s)]
            if m is not None
        ]
        assert PURGE_BATCH == 100
        assert limits == [100, 100, 30]
        assert await store.purge_expired() == 20
        assert await store.purge_expired() == 0
        assert await store.get(live) is not None


async def test_purge_of_a_private_memory_database(tmp_path: Path) -> None:
    """A ":memory:" ledger (one connection's own database) purges what that connection holds."""
    clock = FakeClock()
    async with SQLiteStore(":memory:", clock=clock) as store:
        for _ in range(3):
            assert await store.claim(rid(), token(), FP, 1.0, 1.0) is None
        kept = rid()
        assert await store.claim(kept, token(), FP, LONG, LONG) is None
        clock.now += 10
        assert await store.purge_expired(limit=2) == 2
        assert await store.purge_expired() == 1
        assert await store.purge_expired(limit=0) == 0
        assert await store.get(kept) is not None


# -- busy versus down ---------------------------------------------------------------------------


async def test_a_write_locked_database_is_busy_not_down(ledger: str) -> None:
    """A write lock held past busy_timeout makes writes and purges StoreBusy; reads go on."""
    async with SQLiteStore(ledger, busy_timeout=0.2) as store:
        held = rid()
        assert await store.claim(held, token(), FP, LONG, LONG) is None
        blocker = sqlite3.connect(ledger, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreBusy):
                await store.claim(rid(), token(), FP, LONG, LONG)
            with pytest.raises(StoreBusy):
                await store.purge_expired()
            assert await store.get(held) is not None  # WAL: readers are not blocked
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        assert await store.purge_expired() == 0


@pytest.mark.parametrize("kind", ["missing_directory", "not_a_database"])
async def test_a_broken_database_is_unavailable_not_busy(tmp_path: Path, kind: str) -> None:
    """An unopenable or non-SQLite file is StoreUnavailable, never StoreBusy (fail_open may run)."""
    if kind == "missing_directory":
        path = tmp_path / "missing" / "ledger.db"
    else:
        path = tmp_path / "ledger.db"
        path.write_bytes(b"this is not a database, " * 200)
    async with SQLiteStore(str(path), busy_timeout=0.2) as store:
        with pytest.raises(StoreUnavailable) as claim_error:
            await store.claim(rid(), token(), FP, LONG, LONG)
        assert not isinstance(claim_error.value, StoreBusy)
        with pytest.raises(StoreUnavailable) as purge_error:
            await store.purge_expired()
        assert not isinstance(purge_error.value, StoreBusy)


def test_busy_is_told_by_the_error_code_before_the_message(ledger: str) -> None:
    """SQLITE_BUSY/LOCKED (extended codes included) are busy; the message counts only uncoded."""

    def coded(message: str, code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError(message)
        exc.sqlite_errorcode = code
        return exc

    assert _is_busy(coded("whatever", 5))  # SQLITE_BUSY
    assert _is_busy(coded("whatever", 6))  # SQLITE_LOCKED
    assert _is_busy(coded("whatever", 517))  # SQLITE_BUSY_SNAPSHOT
    assert _is_busy(coded("whatever", 262))  # SQLITE_LOCKED_SHAREDCACHE
    assert not _is_busy(coded("database is locked", 14))  # SQLITE_CANTOPEN, whatever it says
    assert not _is_busy(coded("busy", 10))  # SQLITE_IOERR
    assert _is_busy(sqlite3.OperationalError("database is locked"))  # no code: by message
    assert not _is_busy(sqlite3.OperationalError("disk I/O error"))

    first = sqlite3.connect(ledger, isolation_level=None)
    second = sqlite3.connect(ledger, isolation_level=None, timeout=0)
    try:
        first.execute("CREATE TABLE t (x)")
        first.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as real:
            second.execute("BEGIN IMMEDIATE")
        assert real.value.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
        assert _is_busy(real.value)
    finally:
        first.close()
        second.close()


async def test_a_claim_that_keeps_losing_races_is_busy(ledger: str) -> None:
    """A claim that never wins nor finds the winner (kept racing) ends as StoreBusy."""
    store = SQLiteStore(ledger, busy_timeout=0.1)
    async with store:
        r, holder = rid(), token()
        assert await store.claim(r, holder, FP, LONG, LONG) is None
        # Blind the claim's read: each round now sees no record yet cannot take it.
        store._sql_get += " AND 0"
        with pytest.raises(StoreBusy):
            await store.claim(r, token(), FP, LONG, LONG)


# -- group commit -----------------------------------------------------------------------------


async def test_concurrent_writes_share_one_transaction(ledger: str) -> None:
    """Claims and completions asked for in one turn of the loop are committed together, and
    each gets its own answer."""
    async with SQLiteStore(ledger) as store:
        store._connection()
        commits: list[str] = []
        store._connection().set_trace_callback(
            lambda sql: commits.append(sql) if sql.startswith("COMMIT") else None
        )
        rids = [rid() for _ in range(20)]
        tokens = [token() for _ in rids]
        claims = [store.claim(r, t, FP, LONG, LONG) for r, t in zip(rids, tokens, strict=True)]
        assert await asyncio.gather(*claims) == [None] * 20
        assert len(commits) == 1
        again = await asyncio.gather(*(store.claim(r, token(), FP, LONG, LONG) for r in rids))
        assert [record.token for record in again if record is not None] == tokens
        done = [
            store.complete(r, t, State.DONE, b"response %d" % i, LONG)
            for i, (r, t) in enumerate(zip(rids, tokens, strict=True))
        ]
        assert await asyncio.gather(*done) == [True] * 20
        for i, r in enumerate(rids):
            record = await store.get(r)
            assert record is not None
            assert record.response == b"response %d" % i


async def test_a_corrupt_row_fails_only_its_own_claim_in_a_group(ledger: str) -> None:
    """A damaged row raises CorruptRecord for its own claim; the claims committed with it stand."""
    async with SQLiteStore(ledger) as store:
        bad = rid()
        assert await store.claim(bad, 5, FP, LONG, LONG) is None
        store._connection().execute("UPDATE retrysafe_records SET state = 9 WHERE rid = ?", (bad,))
        good = [rid() for _ in range(3)]
        results = await asyncio.gather(
            store.claim(good[0], 1, FP, LONG, LONG),
            store.claim(bad, 6, FP, LONG, LONG),
            store.claim(good[1], 2, FP, LONG, LONG),
            store.claim(good[2], 3, FP, LONG, LONG),
            return_exceptions=True,
        )
        assert [results[0], results[2], results[3]] == [None, None, None]
        assert isinstance(results[1], CorruptRecord)
        assert results[1].token == 5
        for r in good:
            assert await store.get(r) is not None


@pytest.mark.parametrize(
    "damage",
    ["fingerprint = 9223372036854775807", "scope = 9223372036854775807", "fingerprint = 3",
     "token = 'abc'", "state = 1, response = 7"],
)  # fmt: skip
async def test_a_column_of_the_wrong_type_is_corrupt_and_only_its_own(
    ledger: str, damage: str
) -> None:
    """A row whose column has another type (an INTEGER fingerprint) is CorruptRecord for its own
    claim, never OverflowError or made-up bytes; the claims grouped with it commit."""
    async with SQLiteStore(ledger) as store:
        bad = rid()
        assert await store.claim(bad, 5, FP, LONG, LONG) is None
        store._connection().execute(f"UPDATE retrysafe_records SET {damage} WHERE rid = ?", (bad,))
        good = [rid() for _ in range(2)]
        results = await asyncio.gather(
            store.claim(good[0], 1, FP, LONG, LONG),
            store.claim(bad, 6, FP, LONG, LONG),
            store.claim(good[1], 2, FP, LONG, LONG),
            return_exceptions=True,
        )
        assert [results[0], results[2]] == [None, None]
        assert isinstance(results[1], CorruptRecord)
        with pytest.raises(CorruptRecord):
            await store.get(bad)
        for r in good:
            assert await store.get(r) is not None
        assert await store.release(bad, results[1].token)  # as the engine drops it
        assert await store.claim(bad, 7, FP, LONG, LONG) is None


async def test_an_operation_failing_in_python_fails_only_itself_in_a_group(ledger: str) -> None:
    """A write that raises before SQLite runs it (a token too large to bind) fails alone; the
    writes grouped with it commit and report their own results."""
    async with SQLiteStore(ledger) as store:
        good = [rid() for _ in range(3)]
        results = await asyncio.gather(
            store.claim(good[0], 1, FP, LONG, LONG),
            store.claim(rid(), 1 << 64, FP, LONG, LONG),
            store.claim(good[1], 2, FP, LONG, LONG),
            store.complete(good[2], 3, State.DONE, b"x", LONG),
            return_exceptions=True,
        )
        assert [results[0], results[2], results[3]] == [None, None, False]
        assert isinstance(results[1], OverflowError)
        for r in good[:2]:
            assert await store.get(r) is not None


async def test_a_write_too_large_for_the_disk_fails_alone_in_a_group(ledger: str) -> None:
    """A completion the full disk cannot take (SQLITE_FULL) fails alone: the claims grouped
    with it, which fit, are committed rather than refused with it."""
    async with SQLiteStore(ledger) as store:
        held = rid()
        assert await store.claim(held, 1, FP, LONG, LONG) is None
        conn = store._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 30}")  # room for claims, not 200 KB
        fresh = [rid() for _ in range(5)]
        results = await asyncio.gather(
            *(store.claim(r, 2, FP, LONG, LONG) for r in fresh),
            store.complete(held, 1, State.DONE, os.urandom(200_000), LONG),
            return_exceptions=True,
        )
        assert results[:5] == [None] * 5
        assert isinstance(results[5], StoreUnavailable)
        assert not isinstance(results[5], StoreBusy)
        for r in fresh:
            record = await store.get(r)
            assert record is not None
            assert record.token == 2
        record = await store.get(held)
        assert record is not None
        assert record.state is State.IN_FLIGHT


async def test_a_busy_group_is_retried_until_the_lock_is_free(ledger: str) -> None:
    """While another connection holds the write lock, a whole group waits; when it is released,
    every write of the group lands once."""
    async with SQLiteStore(ledger, busy_timeout=10) as store:
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        blocker = sqlite3.connect(ledger, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        rids = [rid() for _ in range(10)]
        claims = asyncio.gather(*(store.claim(r, 7, FP, LONG, LONG) for r in rids))
        await asyncio.sleep(0.2)
        assert not claims.done()
        blocker.execute("ROLLBACK")
        blocker.close()
        assert await claims == [None] * 10
        again = await asyncio.gather(*(store.claim(r, 8, FP, LONG, LONG) for r in rids))
        assert all(record is not None and record.token == 7 for record in again)


async def test_a_write_cancelled_before_its_commit_is_not_made(ledger: str) -> None:
    """A claim whose caller is cancelled while it waits for the group commit is never written."""
    async with SQLiteStore(ledger) as store:
        r = rid()
        task = asyncio.ensure_future(store.claim(r, 1, FP, LONG, LONG))
        await asyncio.sleep(0)  # the claim is queued for the next turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.get(r) is None
        assert await store.claim(r, 2, FP, LONG, LONG) is None


async def test_writes_one_at_a_time_stop_waiting_for_a_group(ledger: str) -> None:
    """A store whose writes come alone stops grouping them for a while, and still answers."""
    async with SQLiteStore(ledger) as store:
        for _ in range(GROUP_SAMPLE):
            assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        assert store._inline_writes == GROUP_PAUSE
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        assert await store.complete(r, t, State.DONE, b"x", LONG)
        assert store._inline_writes == GROUP_PAUSE - 2


# -- configuration ------------------------------------------------------------------------------


def test_an_old_sqlite_is_refused_at_construction(
    ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite older than 3.35 (no RETURNING) is a ConfigError naming the version found."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(ConfigError, match=r"3\.35.*3\.34\.1"):
        SQLiteStore(ledger)
    with pytest.raises(ConfigError, match=r"3\.34\.1"):
        open_store(f"sqlite:///{ledger}")


def page_size(path: str) -> int:
    check = sqlite3.connect(path)
    try:
        size: int = check.execute("PRAGMA page_size").fetchone()[0]
        return size
    finally:
        check.close()


async def test_a_new_ledger_uses_small_pages(ledger: str) -> None:
    """A ledger file the store creates has 1 KiB pages, and a response spanning many is intact."""
    store = open_store(f"sqlite:///{ledger}")
    async with store:
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        body = os.urandom(20_000)
        assert await store.complete(r, t, State.DONE, body, LONG)
        record = await store.get(r)
        assert record is not None
        assert record.response == body
    assert page_size(ledger) == PAGE_SIZE == 1024


async def test_an_existing_ledger_keeps_its_page_size(ledger: str) -> None:
    """A ledger made with other pages than retrysafe picks (8 KiB) is used as it is, not rebuilt."""
    old = sqlite3.connect(ledger)
    old.execute("PRAGMA page_size = 8192")
    old.execute("PRAGMA journal_mode = WAL")
    old.close()
    store = open_store(f"sqlite:///{ledger}")
    async with store:
        r, t = rid(), token()
        assert await store.claim(r, t, FP, LONG, LONG) is None
        assert await store.complete(r, t, State.DONE, b"resp", LONG)
        record = await store.get(r)
        assert record is not None
        assert record.response == b"resp"
    assert page_size(ledger) == 8192


@pytest.mark.parametrize("table", ["order", "select", "group", "table"])
async def test_a_reserved_word_is_a_valid_table_name(ledger: str, table: str) -> None:
    """?table=order (an SQL keyword) works for every primitive, in a table of that name."""
    store = open_store(f"sqlite:///{ledger}?table={table}")
    async with store:
        done, flying, short = rid(), rid(), rid()
        t, f = token(), token()
        assert await store.claim(done, t, FP, LONG, LONG) is None
        assert await store.complete(done, t, State.DONE, b"resp", LONG)
        assert await store.claim(flying, f, FP, LONG, LONG) is None
        assert await store.renew(flying, f, LONG)
        existing = await store.claim(flying, token(), FP, LONG, LONG)
        assert existing is not None
        assert existing.token == f
        assert await store.claim(short, token(), FP, 0.05, 0.05) is None
        await asyncio.sleep(0.2)
        assert await store.purge_expired() == 1
        page, _ = await store.scan()
        assert {r for r, _ in page} == {done, flying}
        stats = await store.stats()
        assert (stats.in_flight, stats.done) == (1, 1)
        assert await store.delete(flying)
        assert await store.release(done, t)
    check = sqlite3.connect(ledger)
    try:
        assert check.execute(f'SELECT count(*) FROM "{table}"').fetchone() == (0,)
        indexes = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
        assert f"{table}_expiry" in indexes
    finally:
        check.close()


@pytest.mark.parametrize("table", ["a b", 'x"y', "1abc", "", "t;drop"])
def test_a_table_name_must_be_an_identifier(ledger: str, table: str) -> None:
    """A table name that is not an identifier is refused at construction."""
    with pytest.raises(ConfigError, match="table"):
        SQLiteStore(ledger, table=table)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_busy_timeout_is_refused_at_construction(ledger: str, value: float) -> None:
    """busy_timeout must be a finite number of seconds >= 0 (nan would retry forever)."""
    with pytest.raises(ConfigError, match="busy_timeout"):
        SQLiteStore(ledger, busy_timeout=value)


@pytest.mark.parametrize("value", ["abc", "", "-1", "nan", "inf", "1e999"])
def test_open_store_refuses_a_bad_busy_timeout(ledger: str, value: str) -> None:
    """?busy_timeout= that is not a finite number of seconds >= 0 is a ConfigError."""
    with pytest.raises(ConfigError, match="busy_timeout"):
        open_store(f"sqlite:///{ledger}?busy_timeout={value}")


def test_open_store_names_unknown_and_repeated_options(ledger: str) -> None:
    """Unknown options are a ConfigError naming each; so is an option given twice."""
    with pytest.raises(ConfigError, match="colour, size"):
        open_store(f"sqlite:///{ledger}?busy_timeout=1&size=2&colour=red")
    with pytest.raises(ConfigError, match="table"):
        open_store(f"sqlite:///{ledger}?table=a&table=b")
    with pytest.raises(ConfigError, match="busy_timeout"):
        open_store("memory://?busy_timeout=1")


async def test_open_store_passes_its_options(ledger: str) -> None:
    """busy_timeout, synchronous and table from the URL reach the store and the file."""
    store = open_store(f"sqlite:///{ledger}?busy_timeout=0.5&synchronous=full&table=ledger")
    assert isinstance(store, SQLiteStore)
    assert store.busy_timeout == 0.5
    async with store:
        assert await store.claim(rid(), token(), FP, LONG, LONG) is None
        conn = store._connection()
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    check = sqlite3.connect(ledger)
    try:
        assert check.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
    finally:
        check.close()


def test_nothing_is_opened_at_construction(tmp_path: Path) -> None:
    """Constructing a store touches no file: errors of the file itself come on first use."""
    path = tmp_path / "ledger.db"
    store = SQLiteStore(str(path))
    open_store(f"sqlite:///{path}")
    assert not path.exists()
    assert store._conn is None
    assert store._checkpointer is None
