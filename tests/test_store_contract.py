"""The store interface, tested against every ledger (contract rules 10, 11, 19).

Every test runs once per store kind of the ``store_url`` fixture (conftest.py). To hold a new
ledger (Redis, PostgreSQL) to the same contract, add its kind to ``STORE_KINDS`` there and
build its URL in ``store_url``; nothing here changes. Time passes for real (short leases and
ttls, then ``asyncio.sleep``); no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import drop_postgres_table, fresh_url

from retrysafe import ConfigError, Store, open_store
from retrysafe.records import State

pytestmark = pytest.mark.anyio

PER_HANDLE_KINDS = {"memory"}
"""Store kinds whose records live in one handle: a second handle is a different ledger."""

FP = b"fingerprint-1"
LONG = 60.0
"""A lease or ttl that never runs out during a test."""


@pytest.fixture
async def store(store_url: str, anyio_backend: str) -> AsyncIterator[Store]:
    """A fresh, empty ledger of each kind, closed after the test."""
    ledger = open_store(store_url)
    try:
        yield ledger
    finally:
        await ledger.aclose()


def another_handle(store: Store, store_url: str) -> Store:
    """A second connection to the same ledger (the same object where a ledger is per-handle)."""
    if urlsplit(store_url).scheme in PER_HANDLE_KINDS:
        return store
    return open_store(store_url)


def rid() -> bytes:
    return os.urandom(32)


def token() -> int:
    return secrets.randbits(63)


async def test_claim_of_absent_record_is_taken(store: Store) -> None:
    """A claim on an unknown id succeeds (None) and leaves an in-flight record of its token."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    record = await store.get(r)
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert record.token == t
    assert record.fingerprint == FP
    assert record.response is None


async def test_claim_returns_the_existing_record(store: Store) -> None:
    """A second claim writes nothing and returns the holder's record."""
    r, t1, t2 = rid(), token(), token()
    assert await store.claim(r, t1, FP, LONG, LONG) is None
    existing = await store.claim(r, t2, b"other fingerprint", LONG, LONG)
    assert existing is not None
    assert existing.token == t1
    assert existing.fingerprint == FP
    assert existing.state is State.IN_FLIGHT
    current = await store.get(r)
    assert current is not None
    assert current.token == t1


async def test_records_are_independent_per_id(store: Store) -> None:
    """Claims of different ids do not see each other."""
    r1, r2 = rid(), rid()
    assert await store.claim(r1, token(), FP, LONG, LONG) is None
    assert await store.claim(r2, token(), FP, LONG, LONG) is None
    assert await store.get(rid()) is None


async def test_fifty_concurrent_claims_have_exactly_one_winner(store: Store) -> None:
    """asyncio.gather of 50 claims of one id: exactly one None, the rest see the winner."""
    r = rid()
    tokens = [token() for _ in range(50)]
    results = await asyncio.gather(*(store.claim(r, t, FP, LONG, LONG) for t in tokens))
    winners = [t for t, result in zip(tokens, results, strict=True) if result is None]
    assert len(winners) == 1
    assert all(res.token == winners[0] for res in results if res is not None)
    record = await store.get(r)
    assert record is not None
    assert record.token == winners[0]


async def test_concurrent_claims_from_threads_and_handles_have_one_winner(
    store: Store, store_url: str
) -> None:
    """Claims racing from 12 threads, each with its own event loop and handle: one winner."""
    r = rid()
    tokens = [token() for _ in range(12)]
    results: dict[int, bool] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tokens))

    def contender(t: int) -> None:
        async def run() -> None:
            handle = another_handle(store, store_url)
            try:
                barrier.wait()
                results[t] = await handle.claim(r, t, FP, LONG, LONG) is None
            finally:
                if handle is not store:
                    await handle.aclose()

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join)
    assert errors == []
    winners = [t for t, won in results.items() if won]
    assert len(results) == len(tokens)
    assert len(winners) == 1
    record = await store.get(r)
    assert record is not None
    assert record.token == winners[0]


async def test_handles_share_one_ledger(store: Store, store_url: str) -> None:
    """A claim made through one handle is seen, and respected, through another."""
    r, t = rid(), token()
    other = another_handle(store, store_url)
    try:
        assert await store.claim(r, t, FP, LONG, LONG) is None
        seen = await other.claim(r, token(), FP, LONG, LONG)
        assert seen is not None
        assert seen.token == t
        assert await other.complete(r, t, State.DONE, b"resp", LONG)
        done = await store.get(r)
        assert done is not None
        assert done.response == b"resp"
    finally:
        if other is not store:
            await other.aclose()


async def test_complete_stores_the_response(store: Store) -> None:
    """complete() turns the claim into a DONE record whose response later claims return."""
    r, t = rid(), token()
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.complete(r, t, State.DONE, payload, LONG)
    record = await store.get(r)
    assert record is not None
    assert record.state is State.DONE
    assert record.token == t
    assert record.fingerprint == FP
    assert record.response == payload
    again = await store.claim(r, token(), FP, LONG, LONG)
    assert again is not None
    assert again.state is State.DONE
    assert again.response == payload


async def test_complete_not_replayable_keeps_no_response(store: Store) -> None:
    """A NOT_REPLAYABLE completion is a final record without a response."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.complete(r, t, State.NOT_REPLAYABLE, None, LONG)
    record = await store.claim(r, token(), FP, LONG, LONG)
    assert record is not None
    assert record.state is State.NOT_REPLAYABLE
    assert record.response is None


async def test_a_final_record_cannot_be_completed_or_renewed_again(store: Store) -> None:
    """Once DONE, the claim is over: complete() and renew() by its token return False."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.complete(r, t, State.DONE, b"first", LONG)
    assert not await store.complete(r, t, State.DONE, b"second", LONG)
    assert not await store.renew(r, t, LONG)
    record = await store.get(r)
    assert record is not None
    assert record.response == b"first"


async def test_a_final_record_is_not_taken_over_when_its_lease_is_past(store: Store) -> None:
    """A DONE record stays until its ttl: the lease only matters while in flight."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, 0.2, LONG) is None
    assert await store.complete(r, t, State.DONE, b"resp", LONG)
    await asyncio.sleep(0.3)
    record = await store.claim(r, token(), FP, 0.2, LONG)
    assert record is not None
    assert record.state is State.DONE


async def test_reclaim_after_lease_expiry(store: Store) -> None:
    """An in-flight claim whose lease ran out (holder presumed dead) is taken by a new claim."""
    r, t1, t2 = rid(), token(), token()
    assert await store.claim(r, t1, FP, 0.2, LONG) is None
    await asyncio.sleep(0.35)
    assert await store.claim(r, t2, FP, LONG, LONG) is None
    record = await store.get(r)
    assert record is not None
    assert record.token == t2
    assert record.state is State.IN_FLIGHT


async def test_renew_extends_the_lease(store: Store) -> None:
    """A renewed claim is still held after its first lease would have run out."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, 0.4, LONG) is None
    await asyncio.sleep(0.2)
    assert await store.renew(r, t, LONG)
    await asyncio.sleep(0.4)  # past the first lease, well within the renewed one
    record = await store.claim(r, token(), FP, LONG, LONG)
    assert record is not None
    assert record.token == t


async def test_renew_of_unknown_or_foreign_claim_fails(store: Store) -> None:
    """renew() returns False for an absent id and for a token that does not hold the claim."""
    r, t = rid(), token()
    assert not await store.renew(r, t, LONG)
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert not await store.renew(r, token(), LONG)


async def test_fencing_stale_holder_cannot_complete_renew_or_release(store: Store) -> None:
    """A holder whose lease ran out and was taken over gets False everywhere, changes nothing."""
    r, stale, fresh = rid(), token(), token()
    assert await store.claim(r, stale, FP, 0.2, LONG) is None
    await asyncio.sleep(0.35)
    assert await store.claim(r, fresh, FP, LONG, LONG) is None
    assert not await store.renew(r, stale, LONG)
    assert not await store.complete(r, stale, State.DONE, b"stale", LONG)
    assert not await store.release(r, stale)
    record = await store.get(r)
    assert record is not None
    assert record.token == fresh
    assert record.state is State.IN_FLIGHT
    assert record.response is None
    # the new holder is unaffected: it completes, and the stale one still cannot remove that
    assert await store.complete(r, fresh, State.DONE, b"fresh", LONG)
    assert not await store.release(r, stale)
    final = await store.get(r)
    assert final is not None
    assert final.response == b"fresh"


async def test_release_frees_the_key(store: Store) -> None:
    """release() by the holder deletes the record: the next claim is taken."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.release(r, t)
    assert await store.get(r) is None
    assert await store.claim(r, token(), FP, LONG, LONG) is None


async def test_release_by_another_token_changes_nothing(store: Store) -> None:
    """release() with a token that did not write the record returns False and keeps it."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert not await store.release(r, token())
    assert not await store.release(rid(), t)
    record = await store.get(r)
    assert record is not None
    assert record.token == t


async def test_release_of_a_final_record_by_its_writer(store: Store) -> None:
    """release() removes the writer's record in any state (a corrupt DONE record, say)."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.complete(r, t, State.DONE, b"resp", LONG)
    assert await store.release(r, t)
    assert await store.get(r) is None


async def test_expired_final_record_is_absent_on_read(store: Store) -> None:
    """After its ttl a DONE record is gone for get() and claim(), purge or not."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert await store.complete(r, t, State.DONE, b"resp", 0.2)
    await asyncio.sleep(0.35)
    assert await store.get(r) is None
    t2 = token()
    assert await store.claim(r, t2, b"new fingerprint", LONG, LONG) is None
    record = await store.get(r)
    assert record is not None
    assert record.token == t2
    assert record.fingerprint == b"new fingerprint"
    assert record.response is None


async def test_in_flight_record_outlives_a_short_ttl_while_its_lease_runs(store: Store) -> None:
    """A claim never expires under a live holder, even with a ttl shorter than the handler."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, 0.6, 0.2) is None
    await asyncio.sleep(0.35)
    assert await store.renew(r, t, 0.6)
    await asyncio.sleep(0.35)  # past the ttl and the first lease, inside the renewed one
    record = await store.get(r)
    assert record is not None
    assert record.token == t
    assert await store.claim(r, token(), FP, LONG, LONG) is not None
    assert await store.complete(r, t, State.DONE, b"kept", LONG)


async def test_in_flight_record_expires_with_its_lease(store: Store) -> None:
    """Once the lease of an in-flight record with a short ttl runs out, the record is gone."""
    r = rid()
    assert await store.claim(r, token(), FP, 0.2, 0.2) is None
    await asyncio.sleep(0.35)
    assert await store.get(r) is None
    assert await store.claim(r, token(), FP, LONG, LONG) is None


async def test_purge_expired_deletes_only_expired_records(store: Store) -> None:
    """purge_expired() removes expired records, done or in flight, and nothing live."""
    done_old, flying_old, done_live, flying_live = rid(), rid(), rid(), rid()
    t = token()
    assert await store.claim(done_old, t, FP, LONG, LONG) is None
    assert await store.complete(done_old, t, State.DONE, b"old", 0.2)
    assert await store.claim(flying_old, token(), FP, 0.2, 0.2) is None
    t = token()
    assert await store.claim(done_live, t, FP, LONG, LONG) is None
    assert await store.complete(done_live, t, State.DONE, b"live", LONG)
    assert await store.claim(flying_live, token(), FP, LONG, LONG) is None
    await asyncio.sleep(0.35)
    assert await store.purge_expired() == 2
    assert await store.purge_expired() == 0
    # delete() sees rows whatever their expiry: the purged ones are really gone
    assert not await store.delete(done_old)
    assert not await store.delete(flying_old)
    live = await store.get(done_live)
    assert live is not None
    assert live.response == b"live"
    assert await store.get(flying_live) is not None


async def test_purge_expired_honours_its_limit(store: Store) -> None:
    """purge_expired(limit) deletes at most ``limit`` records per call."""
    for _ in range(3):
        assert await store.claim(rid(), token(), FP, 0.2, 0.2) is None
    await asyncio.sleep(0.35)
    assert await store.purge_expired(limit=2) == 2
    assert await store.purge_expired(limit=2) == 1
    assert await store.purge_expired(limit=2) == 0


async def test_delete_removes_any_record(store: Store) -> None:
    """delete() removes a record whatever its state and token; False when absent."""
    flying, done = rid(), rid()
    assert await store.claim(flying, token(), FP, LONG, LONG) is None
    t = token()
    assert await store.claim(done, t, FP, LONG, LONG) is None
    assert await store.complete(done, t, State.DONE, b"resp", LONG)
    assert await store.delete(flying)
    assert await store.delete(done)
    assert await store.get(flying) is None
    assert await store.get(done) is None
    assert not await store.delete(flying)
    assert await store.claim(done, token(), FP, LONG, LONG) is None


@pytest.mark.parametrize("forever", [1e17, math.inf])
async def test_a_huge_or_infinite_lease_and_ttl_keep_the_record(
    store: Store, forever: float
) -> None:
    """A lease or ttl of 1e17 s or infinity ("forever") holds the claim, renewal and outcome."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, forever, forever) is None
    held = await store.claim(r, token(), FP, forever, forever)
    assert held is not None
    assert held.token == t
    assert await store.renew(r, t, forever)
    assert await store.complete(r, t, State.DONE, b"kept", forever)
    record = await store.get(r)
    assert record is not None
    assert record.response == b"kept"
    replay = await store.claim(r, token(), FP, forever, forever)
    assert replay is not None
    assert replay.token == t


async def test_wait_returns(store: Store) -> None:
    """wait() returns on its own within its timeout (bounded waiting relies on it)."""
    r = rid()
    assert await store.claim(r, token(), FP, LONG, LONG) is None
    await asyncio.wait_for(store.wait(r, 0.2), timeout=10)


async def test_closed_store_can_be_closed_again(store: Store) -> None:
    """aclose() may be called more than once without error."""
    r = rid()
    assert await store.claim(r, token(), FP, LONG, LONG) is None
    await store.aclose()
    await store.aclose()


def _wal_size(path: str) -> int:
    return os.stat(path + "-wal").st_size


async def test_sqlite_wal_stays_bounded_under_steady_writes(tmp_path: os.PathLike[str]) -> None:
    """The background checkpointer keeps the SQLite WAL from growing without bound."""
    path = os.path.join(tmp_path, "ledger.db")
    store = open_store(f"sqlite:///{path}")
    try:
        for _ in range(12_000):  # about 240 MB of WAL frames if nothing checkpointed
            r, t = rid(), token()
            assert await store.claim(r, t, FP, LONG, LONG) is None
            assert await store.complete(r, t, State.DONE, b"x" * 200, LONG)
        for _ in range(200):  # bounded: the checkpointer runs every 50 ms
            if _wal_size(path) <= 64 << 20:
                break
            await asyncio.sleep(0.05)
        assert _wal_size(path) <= 64 << 20
    finally:
        await store.aclose()


async def test_claim_keeps_the_scope_tag_and_claim_time(store: Store) -> None:
    """A record carries the scope tag it was claimed with and when it was claimed."""
    r = rid()
    assert await store.claim(r, token(), FP, LONG, LONG, scope=b"tag-0001") is None
    record = await store.get(r)
    assert record is not None
    assert record.scope == b"tag-0001"
    assert record.created_at > 0


async def test_scan_pages_through_every_live_record_once(store: Store) -> None:
    """scan() returns each live record exactly once across pages, and no expired one."""
    live = {rid() for _ in range(7)}
    for r in live:
        assert await store.claim(r, token(), FP, LONG, LONG) is None
    assert await store.claim(rid(), token(), FP, 0.1, 0.1) is None  # expires below
    await asyncio.sleep(0.25)
    seen: list[bytes] = []
    cursor: str | None = None
    for _ in range(10):
        page, cursor = await store.scan(cursor, limit=3)
        assert len(page) <= 3
        seen += [r for r, _ in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(live)


async def test_stats_count_records_by_state(store: Store) -> None:
    """stats() counts in-flight, done and not-replayable records."""
    flying, done, big = rid(), rid(), rid()
    assert await store.claim(flying, token(), FP, LONG, LONG) is None
    t = token()
    assert await store.claim(done, t, FP, LONG, LONG) is None
    assert await store.complete(done, t, State.DONE, b"r", LONG)
    t = token()
    assert await store.claim(big, t, FP, LONG, LONG) is None
    assert await store.complete(big, t, State.NOT_REPLAYABLE, None, LONG)
    stats = await store.stats()
    assert (stats.in_flight, stats.done, stats.not_replayable) == (1, 1, 1)


async def test_purge_expired_goes_past_a_batch_up_to_its_limit(store: Store) -> None:
    """One purge_expired(limit) call deletes ``limit`` records even when that spans batches."""
    live = rid()
    assert await store.claim(live, token(), FP, LONG, LONG) is None
    for _ in range(250):
        assert await store.claim(rid(), token(), FP, 0.2, 0.2) is None
    await asyncio.sleep(0.35)
    assert await store.purge_expired(limit=230) == 230
    assert await store.purge_expired() == 20
    assert await store.purge_expired() == 0
    assert await store.get(live) is not None


@pytest.mark.parametrize("kind", ["redis-cluster", "postgres"])
async def test_a_url_with_several_hosts_opens_through_open_store(kind: str, tmp_path: Path) -> None:
    """redis+cluster://h1:p1,h2:p2 and postgresql://h1:p1,h2:p2/db (the forms the docs give)
    open through open_store, as the middleware, the gateway and the CLI use it, and work."""
    url = fresh_url(kind, tmp_path)
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    other = "127.0.0.1:7002" if kind == "redis-cluster" else host
    several = parts._replace(netloc=f"{parts.netloc},{other}").geturl()
    assert f"{host},{other}" in several
    store = open_store(several)
    try:
        assert await store.claim(b"r" * 32, 1, b"f", 10, 60) is None
        assert await store.complete(b"r" * 32, 1, State.DONE, b"x", 60)
    finally:
        await store.aclose()
        if kind == "postgres":
            await asyncio.to_thread(drop_postgres_table, url)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/app@blue.db",
        "postgresql://127.0.0.1/test?user=admin%40myserver",
        "postgresql://admin@myserver:pw@127.0.0.1/test",
        "redis://:pa@ss@127.0.0.1:6379/0?prefix=a%40b",
    ],
    ids=["sqlite-path", "pg-user-option-encoded", "pg-user-with-at", "redis-password-with-at"],
)
def test_an_at_sign_where_urls_allow_it_is_accepted(url: str, tmp_path: Path) -> None:
    """An '@' in a file name, in the host part's user or password, or percent-encoded in an
    option's value is no sign of a password cut short: such URLs open."""
    store = open_store(url.format(tmp=tmp_path))
    assert store is not None


@pytest.mark.parametrize(
    "url",
    ["postgresql://127.0.0.1/test?user=admin@myserver", "redis://127.0.0.1:6379/0?prefix=a@b"],
)
def test_a_raw_at_sign_after_the_host_part_is_refused_with_the_fix(url: str) -> None:
    """A raw '@' in an option value cannot be told from a password cut short by a raw '?':
    refused, saying how to write it, and the URL is not echoed."""
    with pytest.raises(ConfigError, match="%40") as refused:
        open_store(url)
    assert "myserver" not in str(refused.value)
    assert "a@b" not in str(refused.value)
