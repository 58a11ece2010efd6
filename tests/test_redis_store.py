"""The Redis ledger beyond the store contract: URLs, scripts, key layout, expiry, corrupt
records, the cluster, waiting, faults, fork and TLS.

Real servers only: the machine's Redis and Redis Cluster (``conftest.SERVERS``) and, for the
fault tests, a private ``redis-server`` this module starts on a free loopback port, kills and
restarts. redis-py is used to look at (or damage) what the store wrote. No test asserts how long
anything took; ``asyncio.wait_for`` bounds only catch hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from conftest import fresh_url, require_server
from servers import Relay, fork_child, free_port, poll_until, serve_in_thread

from retrysafe import (
    ConfigError,
    CorruptRecord,
    IdempotencyMiddleware,
    StoreBusy,
    StoreError,
    StoreUnavailable,
    open_store,
)
from retrysafe.records import State
from retrysafe.stores._resp import ReplyError, key_slot
from retrysafe.stores.redis import EXPIRY_GRACE, UNREADABLE_TOKEN, RedisStore

pytestmark = pytest.mark.anyio

T = TypeVar("T")
FP = b"fingerprint-1"
LONG = 60.0
"""A lease or ttl that never runs out during a test."""
HANG = 10.0
"""Bound on anything that should come back at once: only catches hangs."""

forks = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning",
)


def rid() -> bytes:
    return os.urandom(32)


def token() -> int:
    return secrets.randbits(63)


async def bounded(awaitable: Awaitable[T]) -> T:
    """``awaitable``, failing the test if it hangs."""
    return await asyncio.wait_for(awaitable, HANG)


@pytest.fixture(params=["redis", "redis-cluster"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger URL on the shared Redis and on the shared Redis Cluster."""
    return fresh_url(request.param, tmp_path)


@pytest.fixture
async def store(url: str) -> AsyncIterator[RedisStore]:
    ledger = open_store(url)
    assert isinstance(ledger, RedisStore)
    try:
        yield ledger
    finally:
        await ledger.aclose()


def record_key(store: RedisStore, r: bytes) -> str:
    return f"{store.prefix}:{r.hex()}"


def run(node: redis.Redis | Any, *args: Any) -> Any:
    """``node.execute_command(*args)`` (untyped in redis-py)."""
    return node.execute_command(*args)


def slot_map(store: RedisStore) -> list[tuple[int, int, tuple[str, int]]]:
    """(first slot, last slot, master) of a cluster store, asked with redis-py."""
    host, port = store.nodes[0]
    with redis.Redis(host=host, port=port) as seed:
        return [
            (start, end, (master[0].decode() or host, int(master[1])))
            for start, end, master, *_ in seed.execute_command("CLUSTER SLOTS")
        ]


def master_addresses(store: RedisStore) -> list[tuple[str, int]]:
    if not store.cluster:
        return [store.nodes[0]]
    return sorted({master for _, _, master in slot_map(store)})


def node_for(store: RedisStore, key: str) -> redis.Redis:
    """A redis-py client of the node holding ``key`` (the one server, or the slot's master)."""
    if not store.cluster:
        host, port = store.nodes[0]
        return redis.Redis(host=host, port=port, db=store.db)
    slot = key_slot(key.encode())
    for start, end, (host, port) in slot_map(store):
        if start <= slot <= end:
            return redis.Redis(host=host, port=port)
    raise AssertionError(f"no master for slot {slot}")


def masters(store: RedisStore) -> list[redis.Redis]:
    if not store.cluster:
        return [node_for(store, "x")]
    return [redis.Redis(host=host, port=port) for host, port in master_addresses(store)]


def prefix_keys(store: RedisStore) -> list[bytes]:
    keys: list[bytes] = []
    for node in masters(store):
        with node:
            keys += node.scan_iter(match=f"{store.prefix}:*", count=1000)
    return keys


# -- URLs and options -------------------------------------------------------------------------


def test_url_sets_nodes_database_credentials_and_options() -> None:
    """A redis:// URL gives host, port, database, ACL user, prefix and timeout."""
    store = RedisStore.from_url("redis://app:s3cret@10.0.0.5:6380/3?prefix=orders&timeout=0.5")
    assert store.nodes == [("10.0.0.5", 6380)]
    assert (store.db, store.prefix, store.timeout, store.cluster) == (3, "orders", 0.5, False)
    assert (store._username, store._password) == ("app", "s3cret")
    assert "s3cret" not in repr(store)
    default = RedisStore.from_url("redis://localhost")
    assert default.nodes == [("localhost", 6379)]
    assert (default.db, default.prefix, default.timeout) == (0, "retrysafe", 2.0)


def test_cluster_url_lists_seed_nodes() -> None:
    """redis+cluster:// takes several seeds (IPv6 in brackets); a password alone is allowed."""
    store = RedisStore.from_url("redis+cluster://:pw@a:7001,b:7002,[::1]:7003/?prefix=p")
    assert store.cluster
    assert store.nodes == [("a", 7001), ("b", 7002), ("::1", 7003)]
    assert (store._username, store._password) == (None, "pw")


def test_rediss_url_verifies_certificates_unless_told_not_to() -> None:
    """rediss:// uses TLS with verification; ssl_cert_reqs=none turns verification off."""
    import ssl

    verified = RedisStore.from_url("rediss://h:6380")
    assert verified._ssl is not None
    assert verified._ssl.verify_mode == ssl.CERT_REQUIRED
    unverified = RedisStore.from_url("rediss+cluster://h:7001?ssl_cert_reqs=none")
    assert unverified._ssl is not None
    assert unverified._ssl.verify_mode == ssl.CERT_NONE
    assert RedisStore.from_url("redis://h")._ssl is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:s3cret@h/0?colour=blue",  # unknown option
        "redis://u:s3cret@h/0?prefix=a&prefix=b",  # repeated
        "redis://u:s3cret@h/0?timeout=soon",  # malformed number
        "redis://u:s3cret@h/0?timeout=0",
        "redis://u:s3cret@h/0?timeout=-1",
        "redis://u:s3cret@h/0?timeout=nan",
        "redis://u:s3cret@h/0?prefix=",  # empty prefix
        "redis://u:s3cret@h/0?prefix=a%20b",  # a space in the prefix
        "redis://u:s3cret@h/0?prefix",  # no '='
        "redis://u:s3cret@h/zero",  # database not a number
        "redis://u:s3cret@h:0/0",  # port out of range
        "redis://u:s3cret@h:99999/0",
        "redis://u:s3cret@h:port/0",
        "redis://u:s3cret@a:1,b:2/0",  # several hosts without +cluster
        "redis+cluster://u:s3cret@a:1/2",  # a cluster has only database 0
        "redis://u:s3cret@h/0?ssl_ca_certs=/ca.pem",  # TLS options without rediss
        "rediss://u:s3cret@h/0?ssl_cert_reqs=maybe",
        "rediss://u:s3cret@h/0?ssl_ca_certs=/nonexistent/ca.pem",
        "redis://u:s3cret@h/0#frag",
        "redis://u:s3cret@/0",  # no host
        "redis://s3cret@h/0",  # a user name without a password
    ],
)
def test_bad_urls_are_config_errors_that_never_show_the_password(url: str) -> None:
    """Unknown, repeated or malformed options and bad URLs raise ConfigError, password hidden."""
    for opener in (open_store, RedisStore.from_url):
        with pytest.raises(ConfigError) as caught:
            opener(url)
        assert "s3cret" not in str(caught.value)


def test_refused_replies_map_to_busy_or_unavailable() -> None:
    """BUSY and TRYAGAIN are StoreBusy; LOADING, CLUSTERDOWN, auth, ... are StoreUnavailable."""
    store = RedisStore.from_url("redis+cluster://127.0.0.1:7001")
    addr = ("127.0.0.1", 7001)
    busy = "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."
    assert type(store._refused(addr, ReplyError(busy))) is StoreBusy
    assert type(store._refused(addr, ReplyError("TRYAGAIN Multiple keys request"))) is StoreBusy
    for message in (
        "LOADING Redis is loading the dataset in memory",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down",
        "NOAUTH Authentication required.",
        "WRONGPASS invalid username-password pair or user is disabled.",
        "OOM command not allowed when used memory > 'maxmemory'.",
    ):
        assert type(store._refused(addr, ReplyError(message))) is StoreUnavailable, message
    assert type(store._refused(addr, ReplyError("ERR user_script:1: oops"))) is StoreError


# -- scripts, layout, expiry ------------------------------------------------------------------


async def test_scripts_are_reloaded_after_script_flush(store: RedisStore) -> None:
    """After SCRIPT FLUSH on every node, every primitive still works (NOSCRIPT -> EVAL)."""
    await store.initialize()
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    for node in masters(store):
        with node:
            node.script_flush()
    assert await store.renew(r, t, LONG)
    assert await store.complete(r, t, State.DONE, b"resp", LONG)
    for node in masters(store):
        with node:
            node.script_flush()
    record = await store.get(r)
    assert record is not None
    assert record.response == b"resp"
    for node in masters(store):
        with node:
            node.script_flush()
    assert await store.release(r, t)
    assert await store.claim(r, token(), FP, LONG, LONG) is None


async def test_one_hash_per_record_with_the_documented_fields(store: RedisStore) -> None:
    """A record is one hash, <prefix>:<rid hex>, holding every field of the record."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG, scope=b"tag-0001") is None
    assert await store.complete(r, t, State.DONE, b"resp", LONG)
    assert prefix_keys(store) == [record_key(store, r).encode()]
    with node_for(store, record_key(store, r)) as node:
        assert node.type(record_key(store, r)) == b"hash"
        fields = node.hgetall(record_key(store, r))
    assert set(fields) == {
        b"state", b"token", b"fingerprint", b"lease_until", b"expires_at", b"response",
        b"scope", b"created_at",
    }  # fmt: skip
    assert fields[b"token"] == str(t).encode()
    assert (fields[b"state"], fields[b"fingerprint"], fields[b"scope"]) == (b"1", FP, b"tag-0001")


async def test_records_carry_a_native_ttl_past_their_expiry(store: RedisStore) -> None:
    """claim, complete and renew set PEXPIREAT to expires_at plus the grace, by the server."""
    r, t = rid(), token()
    key = record_key(store, r)
    assert await store.claim(r, t, FP, 5.0, 100.0) is None
    with node_for(store, key) as node:
        claimed = node.pttl(key) / 1000
        assert 100 + EXPIRY_GRACE - 10 < claimed <= 100 + EXPIRY_GRACE + 0.01  # ms rounding
        assert await store.renew(r, t, 300.0)  # a lease past the expiry pushes both
        renewed = node.pttl(key) / 1000
        assert 300 + EXPIRY_GRACE - 10 < renewed <= 300 + EXPIRY_GRACE + 0.01  # ms rounding
        record = await store.get(r)
        assert record is not None
        assert record.expires_at == record.lease_until
        assert await store.complete(r, t, State.DONE, b"resp", 50.0)
        completed = node.pttl(key) / 1000
        assert 50 + EXPIRY_GRACE - 10 < completed <= 50 + EXPIRY_GRACE + 0.01  # ms rounding


async def test_an_expired_record_is_absent_before_redis_evicts_it(store: RedisStore) -> None:
    """Expiry is judged on read: past expires_at a record is gone for get, claim and scan."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, 0.1, 0.1) is None
    await asyncio.sleep(0.3)
    with node_for(store, record_key(store, r)) as node:
        assert node.exists(record_key(store, r))  # still held: the native TTL has a grace
    assert await store.get(r) is None
    assert (await store.stats()).expired == 1
    assert await store.scan() == ([], None)
    assert await store.claim(r, token(), FP, LONG, LONG) is None


# -- corrupt records --------------------------------------------------------------------------


async def test_corrupt_record_names_its_token_and_release_drops_it(store: RedisStore) -> None:
    """A record with an unreadable field raises CorruptRecord(token); release(token) frees it."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    with node_for(store, record_key(store, r)) as node:
        node.hset(record_key(store, r), "expires_at", "soon")
    with pytest.raises(CorruptRecord) as caught:
        await store.claim(r, token(), FP, LONG, LONG)
    assert caught.value.token == t
    with pytest.raises(CorruptRecord):
        await store.get(r)
    assert await store.release(r, caught.value.token)
    assert await store.claim(r, token(), FP, LONG, LONG) is None


@pytest.mark.parametrize(
    "damage",
    ["token-garbage", "token-missing", "not-a-hash", "state-unknown", "time-infinite"],
)
async def test_a_record_whose_token_is_unreadable_can_still_be_dropped(
    store: RedisStore, damage: str
) -> None:
    """With the token unreadable, CorruptRecord carries -1, and release(-1) deletes the record."""
    r = rid()
    key = record_key(store, r)
    t = token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    with node_for(store, key) as node:
        if damage == "token-garbage":
            node.hset(key, "token", "01x")
        elif damage == "token-missing":
            node.hdel(key, "token")
        elif damage == "not-a-hash":
            node.delete(key)
            node.set(key, "junk")
        elif damage == "state-unknown":
            node.hset(key, "state", "7")
        else:
            node.hset(key, "lease_until", "inf")
    with pytest.raises(CorruptRecord) as caught:
        await store.claim(r, token(), FP, LONG, LONG)
    expected = t if damage in {"state-unknown", "time-infinite"} else UNREADABLE_TOKEN
    assert caught.value.token == expected
    assert await store.release(r, caught.value.token)
    assert await store.get(r) is None


async def test_release_of_unreadable_token_never_removes_a_sound_record(store: RedisStore) -> None:
    """release(rid, -1) leaves a record with a readable token alone."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    assert not await store.release(r, UNREADABLE_TOKEN)
    record = await store.get(r)
    assert record is not None
    assert record.token == t


async def test_the_engine_treats_a_corrupt_record_as_absent(url: str) -> None:
    """Over HTTP, a record damaged in Redis is dropped and the request executes anew (not 500)."""
    executions: list[int] = []
    app = counting_app(executions)
    middleware = IdempotencyMiddleware(app, store=url)
    store = middleware.engine.store
    assert isinstance(store, RedisStore)
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Idempotency-Key": "corrupt-me"}
            first = await client.post("/orders", headers=headers, content=b"{}")
            assert first.status_code == 201
            [key] = prefix_keys(store)
            with node_for(store, key.decode()) as node:
                node.hset(key, "response", b"\x00garbage")
            second = await client.post("/orders", headers=headers, content=b"{}")
            assert second.status_code == 201
            assert "idempotent-replayed" not in second.headers
            third = await client.post("/orders", headers=headers, content=b"{}")
            assert third.headers["idempotent-replayed"] == "true"
            assert third.content == second.content
            for damage in ("not-a-hash", "token"):
                with node_for(store, key.decode()) as node:
                    if damage == "token":
                        node.hset(key, "token", "?")
                    else:
                        node.delete(key)
                        node.set(key, "junk")
                again = await client.post("/orders", headers=headers, content=b"{}")
                assert again.status_code == 201
                assert "idempotent-replayed" not in again.headers
        assert len(executions) == 4
    finally:
        await middleware.aclose()


# -- the cluster ------------------------------------------------------------------------------


@pytest.fixture
async def cluster_store(tmp_path: Path) -> AsyncIterator[RedisStore]:
    ledger = open_store(fresh_url("redis-cluster", tmp_path))
    assert isinstance(ledger, RedisStore)
    try:
        yield ledger
    finally:
        await ledger.aclose()


async def test_cluster_records_spread_over_every_master(cluster_store: RedisStore) -> None:
    """Records land on all three masters: one key per record, hashed by its own slot."""
    for _ in range(60):
        assert await cluster_store.claim(rid(), token(), FP, LONG, LONG) is None
    addresses = master_addresses(cluster_store)
    assert len(addresses) == 3
    for node, addr in zip(masters(cluster_store), addresses, strict=True):
        with node:
            held = list(node.scan_iter(match=f"{cluster_store.prefix}:*", count=1000))
        assert held, f"no record on the master {addr}"


async def test_cluster_found_from_one_seed_and_moved_is_followed(tmp_path: Path) -> None:
    """Seeded with one node the store finds all masters; a wrong slot map is fixed by MOVED."""
    base = open_store(fresh_url("redis-cluster", tmp_path))
    assert isinstance(base, RedisStore)
    first, second, _ = master_addresses(base)
    store = RedisStore.from_url(f"redis+cluster://{second[0]}:{second[1]}?prefix={base.prefix}")
    try:
        records = [(rid(), token()) for _ in range(10)]
        for r, t in records:
            assert await store.claim(r, t, FP, LONG, LONG) is None
        assert len(await store._masters(store._current_link())) == 3
        # Every slot pointed at one master: a record elsewhere gets MOVED and follows it.
        owners = slot_map(base)
        while True:
            moved, moved_token = rid(), token()
            slot = key_slot(record_key(store, moved).encode())
            if next(m for start, end, m in owners if start <= slot <= end) != first:
                break
        store._slots = [first] * 16384
        assert await store.claim(moved, moved_token, FP, LONG, LONG) is None
        assert store._stale  # a MOVED asks for a fresh map...
        with node_for(base, record_key(base, moved)) as node:
            assert node.hget(record_key(base, moved), "token") == str(moved_token).encode()
        assert await store.get(records[0][0]) is not None
        assert not store._stale  # ...read on the next call
        assert len({a for a in store._slots if a is not None}) == 3
        for r, t in [*records, (moved, moved_token)]:
            record = await store.get(r)
            assert record is not None
            assert record.token == t
    finally:
        await store.aclose()
        await base.aclose()


async def test_cluster_ask_redirection_during_a_slot_migration(cluster_store: RedisStore) -> None:
    """A claim in a migrating slot follows ASK to the importing node (ASKING, then the call)."""
    addresses = master_addresses(cluster_store)
    nodes = {addr: redis.Redis(host=addr[0], port=addr[1]) for addr in addresses}
    ids = {addr: run(node, "CLUSTER MYID").decode() for addr, node in nodes.items()}
    owners = slot_map(cluster_store)
    # A fresh record whose slot holds no key at all: nothing needs migrating for real.
    while True:
        r = rid()
        key = record_key(cluster_store, r)
        slot = key_slot(key.encode())
        source_addr = next(m for start, end, m in owners if start <= slot <= end)
        if run(nodes[source_addr], "CLUSTER COUNTKEYSINSLOT", slot) == 0:
            break
    target_addr = next(a for a in addresses if a != source_addr)
    source, target = nodes[source_addr], nodes[target_addr]
    await cluster_store.get(rid())  # the slot map is read before the migration starts
    try:
        run(target, "CLUSTER SETSLOT", slot, "IMPORTING", ids[source_addr])
        run(source, "CLUSTER SETSLOT", slot, "MIGRATING", ids[target_addr])
        t = token()
        assert await cluster_store.claim(r, t, FP, LONG, LONG) is None
        # The record is on the importing node, which does not own the slot yet.
        pipe = target.pipeline(transaction=False)
        run(pipe, "ASKING")
        pipe.hget(key, "token")
        run(pipe, "ASKING")
        pipe.delete(key)
        _, held, _, _ = pipe.execute()
        assert held == str(t).encode()
    finally:
        for node in (target, source):
            run(node, "CLUSTER SETSLOT", slot, "STABLE")
        for node in nodes.values():
            node.close()


# -- waiting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["complete", "release"])
async def test_wait_returns_when_another_handle_finishes(
    store: RedisStore, url: str, outcome: str
) -> None:
    """wait(rid, 30) returns on the pub/sub notice of complete/release from another handle."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    other = open_store(url)
    try:
        waiting = asyncio.create_task(asyncio.wait_for(other.wait(r, 30), 10))
        await asyncio.sleep(0.2)  # most likely subscribed by now; correct either way
        assert not waiting.done()
        if outcome == "complete":
            assert await store.complete(r, t, State.DONE, b"resp", LONG)
        else:
            assert await store.release(r, t)
        await waiting  # a TimeoutError here would mean the notice was missed
    finally:
        await other.aclose()


async def test_waiters_share_one_subscriber_connection(store: RedisStore, url: str) -> None:
    """Twenty waiters on different records use one pub/sub connection, and all are woken."""
    claims = [(rid(), token()) for _ in range(20)]
    for r, t in claims:
        assert await store.claim(r, t, FP, LONG, LONG) is None
    other = open_store(url)
    assert isinstance(other, RedisStore)
    try:
        waits = [asyncio.create_task(asyncio.wait_for(other.wait(r, 30), 10)) for r, _ in claims]
        await asyncio.sleep(0.3)
        for r, t in claims:
            assert await store.complete(r, t, State.DONE, b"r", LONG)
        await asyncio.gather(*waits)
        subscribers = len(other._current_link().subscribers)
        assert 1 <= subscribers <= (3 if other.cluster else 1)  # one per node at most
    finally:
        await other.aclose()


async def test_wait_returns_at_once_for_a_finished_record_and_by_its_timeout(
    store: RedisStore,
) -> None:
    """wait() on a done record returns at once; on a held one it returns when its time is up."""
    r, t = rid(), token()
    assert await store.claim(r, t, FP, LONG, LONG) is None
    await bounded(store.wait(r, 0.3))  # nothing happened: back by its own timeout
    assert await store.complete(r, t, State.DONE, b"r", LONG)
    await asyncio.wait_for(store.wait(r, 30), HANG)
    await asyncio.wait_for(store.wait(rid(), 30), HANG)  # absent: nothing to wait for


async def test_wait_wakes_when_the_holders_lease_runs_out(store: RedisStore) -> None:
    """A holder that dies sends no notice: wait() returns once its lease is over, to take over."""
    r = rid()
    assert await store.claim(r, token(), FP, 0.5, LONG) is None
    await asyncio.wait_for(store.wait(r, 30), HANG)
    assert await store.claim(r, token(), FP, LONG, LONG) is None


# -- a private server for faults --------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own, on a free loopback port, killed and restarted at will."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.directory), *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        poll_until(self._answers, timeout=30, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)

    def pause(self, paused: bool) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)


@contextlib.contextmanager
def private_redis(directory: Path, *extra: str) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(directory, *extra)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.kill()


async def test_a_killed_server_is_unavailable_and_the_store_recovers(tmp_path: Path) -> None:
    """Server killed: every primitive raises StoreUnavailable; restarted: the same store works."""
    with private_redis(tmp_path) as server:
        store = open_store(server.url)
        try:
            r, t = rid(), token()
            assert await store.claim(r, t, FP, LONG, LONG) is None
            server.kill()
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.claim(rid(), token(), FP, LONG, LONG),
                lambda: store.renew(r, t, LONG),
                lambda: store.complete(r, t, State.DONE, b"x", LONG),
                lambda: store.release(r, t),
                lambda: store.get(r),
                lambda: store.delete(r),
                lambda: store.scan(),
                lambda: store.stats(),
                lambda: store.purge_expired(),
                lambda: store.initialize(),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable) as caught:
                    await bounded(call())
                assert type(caught.value) is StoreUnavailable
                assert f"127.0.0.1:{server.port}" in str(caught.value)
            await bounded(store.wait(r, 0.2))  # falls back to polling; never raises
            server.start()  # the same port
            r2, t2 = rid(), token()
            assert await bounded(store.claim(r2, t2, FP, LONG, LONG)) is None
            assert await bounded(store.complete(r2, t2, State.DONE, b"again", LONG))
            record = await bounded(store.get(r2))
            assert record is not None
            assert record.response == b"again"
        finally:
            await store.aclose()


async def test_a_silent_server_times_out_and_the_store_recovers(tmp_path: Path) -> None:
    """A frozen server (SIGSTOP): calls fail with StoreUnavailable after the timeout, not hang."""
    with private_redis(tmp_path) as server:
        store = open_store(server.url + "?timeout=0.5")
        try:
            assert await store.claim(rid(), token(), FP, LONG, LONG) is None
            server.pause(True)
            results = await bounded(
                asyncio.gather(
                    *(store.claim(rid(), token(), FP, LONG, LONG) for _ in range(5)),
                    return_exceptions=True,
                )
            )
            assert all(type(result) is StoreUnavailable for result in results), results
            with pytest.raises(StoreUnavailable):  # a new connection gets no answer either
                await bounded(store.get(rid()))
            server.pause(False)
            r, t = rid(), token()
            for _ in range(50):  # the server catches up with what it queued while frozen
                with contextlib.suppress(StoreUnavailable):
                    if await bounded(store.claim(r, t, FP, LONG, LONG)) is None:
                        break
                await asyncio.sleep(0.1)
            record = await bounded(store.get(r))
            assert record is not None
            assert record.token == t
        finally:
            await store.aclose()


async def test_a_long_script_makes_the_store_busy(tmp_path: Path) -> None:
    """While another client's script overruns (BUSY), calls raise StoreBusy, then work again."""
    with private_redis(tmp_path, "--busy-reply-threshold", "100") as server:
        store = open_store(server.url)
        blocker = redis.Redis(port=server.port)
        killer = redis.Redis(port=server.port)
        try:
            assert await store.claim(rid(), token(), FP, LONG, LONG) is None
            endless = "while true do end"  # read-only: SCRIPT KILL can stop it
            spin = threading.Thread(
                target=_run_quietly, args=(lambda: blocker.eval(endless, 0),), daemon=True
            )
            spin.start()
            caught: StoreError | None = None
            for _ in range(100):
                await asyncio.sleep(0.05)
                try:
                    await bounded(store.get(rid()))
                except StoreBusy as exc:
                    caught = exc
                    break
            assert isinstance(caught, StoreBusy)
            assert "BUSY" in str(caught)
            killer.script_kill()
            spin.join(timeout=HANG)
            assert await bounded(store.claim(rid(), token(), FP, LONG, LONG)) is None
        finally:
            with contextlib.suppress(redis.RedisError):
                killer.script_kill()
            blocker.close()
            killer.close()
            await store.aclose()


def _run_quietly(call: Callable[[], object]) -> None:
    with contextlib.suppress(redis.RedisError):
        call()


async def test_a_blocked_event_loop_does_not_time_out_commands_it_held_back(
    tmp_path: Path,
) -> None:
    """Commands queued just before the event loop is blocked past the timeout (a sync call in
    a handler) are judged from when they were written, not failed as timed out (which left
    their claims made but answered 503, the keys stuck at 409 for a lease)."""
    url = fresh_url("redis", tmp_path) + "&timeout=0.5"
    store = open_store(url)
    try:
        await bounded(store.get(rid()))  # connected and idle
        claims = [(rid(), token()) for _ in range(50)]

        async def blocker() -> None:
            time.sleep(0.8)  # noqa: ASYNC251 - the point: the loop blocked past the timeout

        # The first claim is written at once; the others wait for the end of this loop turn,
        # which the blocker, scheduled before that flush, delays.
        tasks = [asyncio.ensure_future(store.claim(r, t, FP, LONG, LONG)) for r, t in claims]
        tasks.append(asyncio.ensure_future(blocker()))
        results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
        assert results[:-1] == [None] * len(claims), results
    finally:
        await store.aclose()


async def test_a_full_server_never_lets_a_claim_take_over_a_holder_that_cannot_renew(
    tmp_path: Path,
) -> None:
    """Redis at maxmemory (noeviction): the holder's renewal still goes through (it grows
    nothing), and a takeover claim is refused like a fresh claim; before, renewals failed with
    OOM while a duplicate's takeover succeeded (its DEL let its HSET past the OOM check):
    a double execution."""
    with private_redis(tmp_path, "--maxmemory-policy", "noeviction") as server:
        store = open_store(server.url)
        admin = redis.Redis(port=server.port)
        try:
            r, holder = rid(), token()
            assert await bounded(store.claim(r, holder, FP, 0.5, LONG)) is None
            for i in range(300):
                admin.set(f"other:{i}", b"x" * 10_000)
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", str(used - 1_000_000))  # full, nothing evictable
            with pytest.raises(StoreUnavailable, match="OOM"):
                await bounded(store.claim(rid(), token(), FP, LONG, LONG))  # a fresh claim
            await asyncio.sleep(0.6)  # the holder's lease ran out, unrenewed
            with pytest.raises(StoreUnavailable, match="OOM"):
                await bounded(store.claim(r, token(), FP, LONG, LONG))  # no takeover
            assert await bounded(store.renew(r, holder, LONG))  # the holder keeps it
            record = await bounded(store.get(r))
            assert record is not None
            assert record.token == holder
            assert record.lease_until - record.created_at > 10
        finally:
            with contextlib.suppress(redis.RedisError):
                admin.config_set("maxmemory", "0")
            admin.close()
            await store.aclose()


async def test_authentication_and_acl_user(tmp_path: Path) -> None:
    """Password and ACL user from the URL are sent (AUTH); a wrong one is unavailable, hidden."""
    with private_redis(
        tmp_path, "--requirepass", "s3cret", "--user", "app", "on", ">app-pw", "~*", "&*", "+@all"
    ) as server:
        base = f"127.0.0.1:{server.port}"
        for good in (f"redis://:s3cret@{base}/2", f"redis://app:app-pw@{base}/0"):
            store = open_store(good)
            try:
                r = rid()
                assert await bounded(store.claim(r, token(), FP, LONG, LONG)) is None
                assert await bounded(store.get(r)) is not None
            finally:
                await store.aclose()
        wrong = open_store(f"redis://app:not-s3cret@{base}/0")
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await bounded(wrong.claim(rid(), token(), FP, LONG, LONG))
            assert "not-s3cret" not in str(caught.value)
            assert "WRONGPASS" in str(caught.value)
        finally:
            await wrong.aclose()


async def test_wait_polls_when_subscribing_is_refused(tmp_path: Path) -> None:
    """With SUBSCRIBE disabled on the server, wait() falls back to polling: it still returns."""
    with private_redis(tmp_path, "--rename-command", "SUBSCRIBE", "") as server:
        store = open_store(server.url)
        try:
            r, t = rid(), token()
            assert await store.claim(r, t, FP, LONG, LONG) is None
            for _ in range(3):
                await asyncio.wait_for(store.wait(r, 30), HANG)  # a poll interval each
        finally:
            await store.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (bounded by the caller)."""
    while not condition():  # noqa: ASYNC110 - the store's own state: nothing to await
        await asyncio.sleep(0.01)


def subscribed(store: RedisStore, r: bytes) -> bool:
    """Whether a subscriber connection of ``store`` has confirmed the channel of ``r``."""
    channel = record_key(store, r).encode()
    return any(channel in sub._confirmed for sub in store._current_link().subscribers.values())


async def test_a_silent_subscriber_is_replaced_and_waiting_goes_on(tmp_path: Path) -> None:
    """A subscriber connection that never answers (a dead peer, no reset) is dropped: the wait
    falls back to polling instead of sleeping out its timeout, and the next wait is notified."""
    url = fresh_url("redis", tmp_path)
    parts = urlsplit(url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 6379)
    relayed = parts._replace(netloc=f"127.0.0.1:{relay.port}").geturl() + "&timeout=0.5"
    store, direct = open_store(relayed), open_store(url)
    assert isinstance(store, RedisStore)
    try:
        r, t = rid(), token()
        assert await bounded(direct.claim(r, t, FP, LONG, LONG)) is None
        assert await bounded(store.get(r)) is not None  # the command connection is up
        relay.cut("stall")  # the subscriber connection opened now is never relayed
        waiting = asyncio.ensure_future(store.wait(r, 120))
        await bounded(until(lambda: bool(store._current_link().subscribers)))
        relay.restore()  # new connections work again; the silent one stays silent
        assert await bounded(direct.complete(r, t, State.DONE, b"done", LONG))
        await bounded(waiting)  # before: slept out its 120 s
        r2, t2 = rid(), token()
        assert await bounded(direct.claim(r2, t2, FP, LONG, LONG)) is None
        waiting = asyncio.ensure_future(store.wait(r2, 120))
        await bounded(until(lambda: subscribed(store, r2)))
        assert await bounded(direct.release(r2, t2))
        await bounded(waiting)  # notified on a new subscriber connection
    finally:
        await store.aclose()
        await direct.aclose()
        relay.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed key and certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """rediss:// speaks TLS, verifying the server against ssl_ca_certs."""
    key, cert = certificate
    port = free_port()
    tls = ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no")
    with private_redis(tmp_path, "--tls-port", str(port), *tls) as server:
        store = open_store(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
        untrusting = open_store(f"rediss://127.0.0.1:{port}/0")
        plain = open_store(server.url)
        try:
            r, t = rid(), token()
            assert await bounded(store.claim(r, t, FP, LONG, LONG)) is None
            assert await bounded(store.complete(r, t, State.DONE, b"tls", LONG))
            record = await bounded(plain.get(r))  # the same server, over plain TCP
            assert record is not None
            assert record.response == b"tls"
            with pytest.raises(StoreUnavailable):  # an unknown CA is refused
                await bounded(untrusting.get(r))
        finally:
            for ledger in (store, untrusting, plain):
                await ledger.aclose()


async def test_tls_with_a_client_certificate(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    """rediss:// with ssl_certfile and ssl_keyfile presents a client certificate, which a TLS
    Redis asks for by default (tls-auth-clients yes); before, no URL could reach such a server."""
    key, cert = certificate
    port = free_port()
    tls = (
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
    )
    with private_redis(tmp_path, "--tls-port", str(port), *tls):
        base = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        store = open_store(f"{base}&ssl_certfile={cert}&ssl_keyfile={key}")
        anonymous = open_store(base)
        try:
            r, t = rid(), token()
            assert await bounded(store.claim(r, t, FP, LONG, LONG)) is None
            assert await bounded(store.complete(r, t, State.DONE, b"mtls", LONG))
            record = await bounded(store.get(r))
            assert record is not None
            assert record.response == b"mtls"
            with pytest.raises(StoreUnavailable):  # no certificate: refused by the server
                await bounded(anonymous.get(r))
        finally:
            await store.aclose()
            await anonymous.aclose()
    with pytest.raises(ConfigError, match="ssl_keyfile"):
        RedisStore.from_url(f"rediss://127.0.0.1:{port}/0?ssl_keyfile={key}")  # no certfile
    with pytest.raises(ConfigError, match="need rediss"):
        RedisStore.from_url(f"redis://127.0.0.1:{port}/0?ssl_certfile={cert}")
    with pytest.raises(ConfigError, match="ssl_certfile"):
        RedisStore.from_url(f"rediss://127.0.0.1:{port}/0?ssl_certfile={tmp_path / 'none.pem'}")


# -- event loops and fork ---------------------------------------------------------------------


def test_a_store_outlives_its_event_loops() -> None:
    """One store used under several asyncio.run() calls (a CLI) opens connections per loop."""
    store = open_store(f"{require_server('redis')}?prefix=rstest-loops-{secrets.token_hex(4)}")
    r, t = rid(), token()
    assert asyncio.run(store.claim(r, t, FP, LONG, LONG)) is None
    assert asyncio.run(store.complete(r, t, State.DONE, b"done", LONG))
    record = asyncio.run(store.get(r))
    assert record is not None
    assert record.response == b"done"
    asyncio.run(store.aclose())


@forks
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_a_store_used_before_fork_works_in_parent_and_child(kind: str, tmp_path: Path) -> None:
    """The parent's connection survives the child, which opens its own: both see all records."""
    store = open_store(fresh_url(kind, tmp_path))
    assert isinstance(store, RedisStore)
    loop = asyncio.new_event_loop()
    try:
        before, t = rid(), token()
        assert loop.run_until_complete(store.claim(before, t, FP, LONG, LONG)) is None
        for _ in range(30):  # connections to every master
            assert loop.run_until_complete(store.claim(rid(), token(), FP, LONG, LONG)) is None
        opened = [c for link in store._links.values() for c in link.conns.values()]
        assert opened
        child_records = [(rid(), token()) for _ in range(50)]

        async def child() -> None:
            assert not store._links  # the parent's sockets were forgotten at the fork
            seen = await store.get(before)
            assert seen is not None
            assert seen.token == t
            for r, tk in child_records:
                assert await store.claim(r, tk, FP, LONG, LONG) is None
                assert await store.complete(r, tk, State.DONE, b"child", LONG)

        pid = fork_child(child)

        async def parent() -> None:  # meanwhile, on the parent's own connections
            for _ in range(50):
                r, tk = rid(), token()
                assert await store.claim(r, tk, FP, LONG, LONG) is None
                record = await store.get(r)
                assert record is not None
                assert record.token == tk

        loop.run_until_complete(parent())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The same sockets, still open: the child neither used nor closed the parent's.
        now = [c for link in store._links.values() for c in link.conns.values()]
        assert all(c in now and not c.closed for c in opened)

        async def after() -> None:
            for r, tk in child_records:
                record = await store.get(r)
                assert record is not None
                assert (record.token, record.response) == (tk, b"child")

        loop.run_until_complete(after())
    finally:
        loop.run_until_complete(store.aclose())
        loop.close()


# -- over HTTP --------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def counting_app(executions: list[int]) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app answering 201 with a body naming its execution, which it records."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        executions.append(len(executions))
        key = dict(scope["headers"]).get(b"idempotency-key", b"").decode()
        body = json.dumps({"execution": len(executions), "key": key}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_http_requests_fail_closed_while_redis_is_down_and_recover(tmp_path: Path) -> None:
    """Keyed POSTs in a loop: Redis killed -> 503 problem+json with Retry-After, the handler
    never runs; Redis restarted -> 201 again, by itself. Never a 500."""
    executions: list[int] = []
    executed_keys: list[str] = []
    app = counting_app(executions)

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        executed_keys.append(dict(scope["headers"]).get(b"idempotency-key", b"").decode())
        await app(scope, receive, send)

    with private_redis(tmp_path) as server:
        middleware = IdempotencyMiddleware(recording, store=server.url)
        with serve_in_thread(middleware) as base, httpx.Client(base_url=base, timeout=30) as client:
            answers: list[tuple[str, httpx.Response]] = []
            stop = threading.Event()

            def statuses() -> list[int]:
                return [response.status_code for _, response in list(answers)]

            def post_in_a_loop() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    key = f"k-{n}"
                    answers.append((key, client.post("/orders", headers={"Idempotency-Key": key})))
                    time.sleep(0.01)

            poster = threading.Thread(target=post_in_a_loop, daemon=True)
            poster.start()
            try:
                poll_until(lambda: statuses().count(201) >= 5, what="first successes")
                server.kill()
                seen = len(answers)
                poll_until(lambda: statuses()[seen:].count(503) >= 10, what="503s while down")
                server.start()
                recovered = len(answers)
                poll_until(lambda: statuses()[recovered:].count(201) >= 5, what="recovery")
            finally:
                stop.set()
                poster.join(timeout=HANG)
    assert set(statuses()) <= {201, 503}, statuses()
    for _, response in answers:
        if response.status_code == 503:
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"]
            assert response.json()["status"] == 503
    succeeded = {key for key, response in answers if response.status_code == 201}
    refused = {key for key, response in answers if response.status_code == 503}
    assert set(executed_keys) == succeeded  # a refused request never ran
    assert not refused & set(executed_keys)


async def test_closing_the_store_under_a_connecting_request_is_unavailable_not_cancelled(
    url: str,
) -> None:
    """A request waiting for a connection (or the slot map) that the store's close cancels
    gets StoreUnavailable (a 503), never a CancelledError it did not ask for (a 500)."""
    ledger = open_store(url)
    pending = asyncio.ensure_future(ledger.claim(rid(), token(), FP, LONG, LONG))
    await asyncio.sleep(0)  # the claim is opening its connection
    await ledger.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await bounded(pending)
    assert not pending.cancelled()


@pytest.mark.parametrize("host", ["a..b", "x" * 70 + ".example"])
async def test_a_host_name_that_cannot_be_encoded_is_unavailable(host: str) -> None:
    """A host IDNA cannot encode (an empty or overlong label) is a StoreUnavailable (503),
    not a UnicodeError escaping as a 500."""
    ledger = open_store(f"redis://{host}:6379")
    try:
        with pytest.raises(StoreUnavailable, match="idna"):
            await bounded(ledger.claim(rid(), token(), FP, LONG, LONG))
    finally:
        await ledger.aclose()
