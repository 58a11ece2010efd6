"""The contract (rules 1-24) over real HTTP: ``retrysafe gateway`` in front of a separate upstream.

One upstream process (``upstream_app``) and one gateway process per ledger (SQLite, Redis,
PostgreSQL) serve the whole module; the gateway's TOML gives each rule's configurable part a
route of its own.
Executions are counted where they happen, in the upstream's execution log; every test uses keys
and paths of its own. Rule 13 (the store's clock) is a store property, proven by the store
tests; rule 10 across processes and hosts is in ``test_gateway_clients.py``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from conftest import drop_postgres_table, fresh_url, require_server
from gateway_support import Process, Upstream, run_gateway, run_upstream
from servers import Relay, poll_until

from retrysafe.problems import DEFAULT_PROBLEM_BASE

REPLAYED = "idempotent-replayed"

CONFIG = """
[idempotency]
lease = 15

[[routes]]
path = "/required/**"
require_key = true

[[routes]]
path = "/put/**"
methods = ["PUT"]

[[routes]]
path = "/scoped/**"
scope_headers = ["X-API-Key"]
scope_cookies = ["session"]

[[routes]]
path = "/excluded/**"
exclude_fields = ["timestamp"]

[[routes]]
path = "/wait/**"
wait = 10

[[routes]]
path = "/short-wait/**"
wait = 0.2

[[routes]]
path = "/heartbeat/**"
lease = 1

[[routes]]
path = "/ttl/**"
ttl = 1

[[routes]]
path = "/small/**"
max_request_body = 64
max_response_body = 64

[[routes]]
path = "/success-only/**"
outcome = "success"

[[routes]]
path = "/exceptions/**"
release_statuses = [404]
store_statuses = ["503-503"]

[[routes]]
path = "/denied/**"
denied_headers = ["x-secret", "set-cookie", "date"]
"""


@dataclass
class Gateway:
    kind: str
    store: str
    process: Process
    upstream: Upstream
    client: httpx.Client

    def request(
        self, method: str, path: str, key: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Idempotency-Key"] = key
        self.client.cookies.clear()  # each request is a caller of its own, as the test says
        return self.client.request(method, path, headers=headers, **kwargs)

    def post(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, key, **kwargs)

    def executions(self, path: str) -> int:
        return len(self.upstream.executions(path=path))


def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with run_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "redis", "postgres"])
def gw(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The gateway in front of the upstream, on each ledger."""
    directory = tmp_path_factory.mktemp(f"gateway-{request.param}")
    store = fresh_url(request.param, directory)
    try:
        with (
            run_gateway(upstream.url, directory, "--store", store, config=CONFIG) as process,
            httpx.Client(base_url=process.url, timeout=30) as client,
        ):
            yield Gateway(request.param, store, process, upstream, client)
    finally:
        if request.param == "postgres":
            drop_postgres_table(store)


def postgres_query(url: str, sql: str) -> list[Any]:
    """Run ``sql`` on the ledger table of a PostgreSQL store URL (``{t}`` names the table)."""
    import asyncio

    import asyncpg

    parts = urlsplit(url)
    table = parse_qs(parts.query)["table"][0]

    async def run() -> list[Any]:
        conn = await asyncpg.connect(parts._replace(query="").geturl())
        try:
            return list(await conn.fetch(sql.format(t=f'"{table}"')))
        finally:
            await conn.close()

    return asyncio.run(run())


def postgres_contents(url: str) -> bytes:
    """Every column of every row of a PostgreSQL ledger, concatenated."""
    rows = postgres_query(url, "SELECT * FROM {t}")
    assert rows, "the ledger holds no record"
    return b"".join(
        value if isinstance(value, bytes) else str(value).encode() for row in rows for value in row
    )


def redis_contents(url: str) -> bytes:
    """Every key name and field of a Redis ledger, concatenated."""
    import redis

    base, _, query = url.partition("?")
    prefix = dict(p.split("=", 1) for p in query.split("&"))["prefix"]
    client = redis.Redis.from_url(base)
    try:
        out = []
        for name in client.scan_iter(match=f"{prefix}:*"):
            out.append(name)
            for field, value in client.hgetall(name).items():
                out += (field, value)
        assert out, "the ledger holds no record"
        return b"".join(out)
    finally:
        client.close()


def assert_problem(
    response: httpx.Response, slug: str, status: int, base: str = DEFAULT_PROBLEM_BASE
) -> dict[str, Any]:
    """An RFC 9457 problem (rule 24)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert REPLAYED not in response.headers
    document: dict[str, Any] = response.json()
    assert document["type"] == base + slug
    assert document["status"] == status
    assert isinstance(document["title"], str)
    assert document["title"]
    assert isinstance(document["detail"], str)
    assert document["detail"]
    return document


def assert_replay_of(replay: httpx.Response, original: httpx.Response) -> None:
    assert REPLAYED not in original.headers
    assert replay.headers.get(REPLAYED) == "true"
    assert replay.status_code == original.status_code
    assert replay.content == original.content


# -- 1-2. which requests --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_post_and_patch_are_protected(gw: Gateway, method: str) -> None:
    """A keyed POST or PATCH runs once upstream; the retry is the recorded answer."""
    path, key = f"/things/{uid()}", uid()
    first = gw.request(method, path, key, json={"a": 1})
    again = gw.request(method, path, key, json={"a": 1})
    assert first.status_code == 200, (first.headers, first.text)
    assert_replay_of(again, first)
    assert gw.executions(path) == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_pass_through_with_their_key(gw: Gateway, method: str) -> None:
    """GET/PUT/DELETE run every time, key or not, and are never replayed."""
    path, key = f"/things/{uid()}", uid()
    for _ in range(2):
        response = gw.request(method, path, key)
        assert response.status_code == 200
        assert REPLAYED not in response.headers
    assert gw.executions(path) == 2


def test_protected_methods_are_configurable_per_route(gw: Gateway) -> None:
    """On a route protecting PUT only, PUT is replayed and POST passes through."""
    put_path, post_path, key = f"/put/{uid()}", f"/put/{uid()}", uid()
    first = gw.request("PUT", put_path, key)
    assert_replay_of(gw.request("PUT", put_path, key), first)
    gw.post(post_path, key)
    assert REPLAYED not in gw.post(post_path, key).headers
    assert gw.executions(put_path) == 1
    assert gw.executions(post_path) == 2


def test_protected_request_without_key_passes_through(gw: Gateway) -> None:
    """A POST without a key runs every time; nothing is recorded."""
    path = f"/things/{uid()}"
    assert gw.post(path).status_code == 200
    assert gw.post(path).status_code == 200
    assert gw.executions(path) == 2


def test_require_key_per_route(gw: Gateway) -> None:
    """require_key refuses a keyless POST with 400 missing-key; it is not executed."""
    path = f"/required/{uid()}"
    assert_problem(gw.post(path), "missing-key", 400)
    assert gw.executions(path) == 0
    assert gw.post(path, uid()).status_code == 200


# -- 3-5. the key ---------------------------------------------------------------------------


def test_header_name_is_matched_case_insensitively(gw: Gateway) -> None:
    """``IDEMPOTENCY-KEY`` and ``idempotency-key`` name the same record."""
    path, key = f"/things/{uid()}", uid()
    gw.client.cookies.clear()
    first = gw.client.post(path, headers={"IDEMPOTENCY-KEY": key})
    again = gw.client.post(path, headers={"idempotency-key": key})
    assert_replay_of(again, first)


def test_quoted_and_bare_key_name_the_same_record(gw: Gateway) -> None:
    """``"abc"`` (a structured-field string) and ``abc`` are one key."""
    path, key = f"/things/{uid()}", uid()
    first = gw.post(path, f'"{key}"')
    assert_replay_of(gw.post(path, key), first)


def test_longest_and_shortest_keys_are_accepted(gw: Gateway) -> None:
    """Keys of 1 and 255 printable characters work; 256 is refused as malformed."""
    tag = uid()
    for key in (tag[:1], (tag * 30)[:255]):
        path = f"/things/{uid()}"
        first = gw.post(path, key)
        assert first.status_code == 200
        assert_replay_of(gw.post(path, key), first)
    path = f"/things/{uid()}"
    assert_problem(gw.post(path, "k" * 256), "malformed-key", 400)
    assert gw.executions(path) == 0


@pytest.mark.parametrize(
    "value",
    [b"", b'"unterminated', b"a\tb", b"caf\xc3\xa9", b"one, two", b'"a", "b"'],
    ids=["empty", "broken-quote", "control", "non-ascii", "list", "sf-list"],
)
def test_malformed_keys_are_refused_and_not_executed(gw: Gateway, value: bytes) -> None:
    """Malformed keys get 400 malformed-key; nothing is executed."""
    path = f"/things/{uid()}"
    response = gw.client.post(path, headers=[(b"Idempotency-Key", value)])
    assert_problem(response, "malformed-key", 400)
    assert gw.executions(path) == 0


def test_a_repeated_key_header_is_refused(gw: Gateway) -> None:
    """Two Idempotency-Key headers are malformed, even when they agree."""
    path = f"/things/{uid()}"
    headers = [(b"Idempotency-Key", b"same"), (b"Idempotency-Key", b"same")]
    assert_problem(gw.client.post(path, headers=headers), "malformed-key", 400)
    assert gw.executions(path) == 0


# -- 6-7. scope -----------------------------------------------------------------------------


def test_callers_with_different_credentials_never_share_a_record(gw: Gateway) -> None:
    """B's request with A's key runs for B and never returns A's answer (or A's cookie)."""
    path, key = f"/things/{uid()}", uid()
    cookie = json.dumps([["set-cookie", "session=alice-secret"]])
    alice = gw.post(path, key, headers={"Authorization": "Bearer alice", "x-respond": cookie})
    bob = gw.post(path, key, headers={"Authorization": "Bearer bob"})
    assert REPLAYED not in bob.headers
    assert bob.json()["nonce"] != alice.json()["nonce"]
    assert "alice-secret" not in bob.text
    assert "set-cookie" not in bob.headers
    assert gw.executions(path) == 2
    assert_replay_of(gw.post(path, key, headers={"Authorization": "Bearer alice"}), alice)


def test_requests_without_credentials_share_the_anonymous_scope(gw: Gateway) -> None:
    """Two callers without credentials share a key's record (documented)."""
    path, key = f"/things/{uid()}", uid()
    first = gw.post(path, key)
    assert_replay_of(gw.post(path, key), first)


def test_scope_headers_and_cookies_separate_callers(gw: Gateway) -> None:
    """On a route with an API-key header and a session cookie, each separates callers."""
    path, key = f"/scoped/{uid()}", uid()
    a = gw.post(path, key, headers={"X-API-Key": "key-a"})
    assert REPLAYED not in gw.post(path, key, headers={"X-API-Key": "key-b"}).headers
    assert_replay_of(gw.post(path, key, headers={"X-API-Key": "key-a"}), a)
    path2 = f"/scoped/{uid()}"
    s1 = gw.post(path2, key, headers={"Cookie": "session=s1; theme=dark"})
    assert REPLAYED not in gw.post(path2, key, headers={"Cookie": "session=s2"}).headers
    assert_replay_of(gw.post(path2, key, headers={"Cookie": "theme=light; session=s1"}), s1)


def test_ledger_and_logs_hold_no_raw_key_or_credentials(gw: Gateway) -> None:
    """Neither the key nor the Authorization value reaches the ledger or the gateway's logs."""
    path, key, secret = f"/things/{uid()}", "rawkey-" + uid(), "tok-" + uid()
    headers = {"Authorization": f"Bearer {secret}", "x-size": "100"}  # no echo in the body
    gw.post(path, key, headers=headers)
    assert gw.post(path, key, headers=headers).headers[REPLAYED] == "true"
    if gw.kind == "sqlite":
        ledger = b"".join(
            Path(gw.store.removeprefix("sqlite:///") + suffix).read_bytes()
            for suffix in ("", "-wal")
            if Path(gw.store.removeprefix("sqlite:///") + suffix).exists()
        )
    elif gw.kind == "postgres":
        ledger = postgres_contents(gw.store)
    else:
        ledger = redis_contents(gw.store)
    assert key.encode() not in ledger
    assert secret.encode() not in ledger
    log = gw.process.log()
    assert key not in log
    assert secret not in log


# -- 8-9. fingerprint -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["body", "path", "method", "query"])
def test_same_key_for_another_request_is_key_reused(gw: Gateway, variant: str) -> None:
    """Same key, other body/path/method/query: 422 key-reused, not executed, no replay."""
    path, key = f"/things/{uid()}", uid()
    gw.post(path, key, json={"amount": 1})
    other = {
        "body": lambda: gw.post(path, key, json={"amount": 2}),
        "path": lambda: gw.post(path + "x", key, json={"amount": 1}),
        "method": lambda: gw.request("PATCH", path, key, json={"amount": 1}),
        "query": lambda: gw.post(path + "?page=2", key, json={"amount": 1}),
    }[variant]()
    assert_problem(other, "key-reused", 422)
    assert len(gw.upstream.executions(key=key)) == 1


def test_json_key_order_and_whitespace_do_not_count(gw: Gateway) -> None:
    """The same JSON document, reordered and re-spaced, is the same request: replayed."""
    path, key = f"/things/{uid()}", uid()
    headers = {"content-type": "application/json"}
    first = gw.post(path, key, content=b'{"a": 1, "b": [1, 2]}', headers=headers)
    again = gw.post(path, key, content=b'{"b":[1,2],"a":1}', headers=headers)
    assert_replay_of(again, first)


def test_excluded_fields_do_not_count(gw: Gateway) -> None:
    """A route's excluded field (a client timestamp) may differ between retries."""
    path, key = f"/excluded/{uid()}", uid()
    first = gw.post(path, key, json={"amount": 5, "timestamp": 1})
    assert_replay_of(gw.post(path, key, json={"amount": 5, "timestamp": 2}), first)


# -- 10-12. exactly once ----------------------------------------------------------------------


def test_concurrent_duplicates_execute_exactly_once(gw: Gateway) -> None:
    """Twelve duplicates at once: one execution; the rest replay it or get 409 in-progress."""
    path, key = f"/things/{uid()}", uid()
    barrier = threading.Barrier(12)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=gw.process.url, timeout=30) as client:
            barrier.wait()
            return client.post(path, headers={"Idempotency-Key": key, "x-delay": "0.3"})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    assert gw.executions(path) == 1
    originals = [r for r in responses if r.status_code == 200 and REPLAYED not in r.headers]
    assert len(originals) == 1
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, "in-progress", 409)
            assert response.headers["retry-after"].isdigit()
        else:
            assert response.content == originals[0].content


def test_wait_gives_a_duplicate_the_replay(gw: Gateway) -> None:
    """With wait, a duplicate arriving mid-flight is held, then gets the original's answer."""
    path, key = f"/wait/{uid()}", uid()
    with ThreadPoolExecutor(1) as pool:
        original = pool.submit(gw.post, path, key, headers={"x-delay": "1"})
        poll_until(lambda: gw.executions(path) == 1, timeout=10, what="the original to start")
        duplicate = gw.post(path, key, headers={"x-delay": "1"})
        assert_replay_of(duplicate, original.result())
    assert gw.executions(path) == 1


def test_wait_that_runs_out_gives_409_with_retry_after(gw: Gateway) -> None:
    """A bounded wait that ends before the original answers: 409 in-progress, Retry-After."""
    path, key = f"/short-wait/{uid()}", uid()
    with ThreadPoolExecutor(1) as pool:
        original = pool.submit(gw.post, path, key, headers={"x-delay": "2"})
        poll_until(lambda: gw.executions(path) == 1, timeout=10, what="the original to start")
        response = gw.post(path, key, headers={"x-delay": "2"})
        assert_problem(response, "in-progress", 409)
        assert "retry-after" in response.headers
        assert original.result().status_code == 200
    assert gw.executions(path) == 1


def test_heartbeat_keeps_a_slow_upstream_claim(gw: Gateway) -> None:
    """An upstream slower than the lease (1 s) keeps its claim: a late duplicate gets 409."""
    path, key = f"/heartbeat/{uid()}", uid()
    with ThreadPoolExecutor(1) as pool:
        original = pool.submit(gw.post, path, key, headers={"x-delay": "2.5"})
        poll_until(lambda: gw.executions(path) == 1, timeout=10, what="the original to start")
        time.sleep(1.6)  # past the lease: only the heartbeat keeps the claim
        assert_problem(gw.post(path, key, headers={"x-delay": "2.5"}), "in-progress", 409)
        first = original.result()
    assert_replay_of(gw.post(path, key, headers={"x-delay": "2.5"}), first)
    assert gw.executions(path) == 1


# -- 14-17. what is stored and replayed ------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 302, 400, 404, 422])
def test_final_statuses_are_stored_and_replayed(gw: Gateway, status: int) -> None:
    """2xx, 3xx and final 4xx are recorded and replayed."""
    path, key = f"/things/{uid()}", uid()
    headers = {"x-status": str(status), "x-respond": '[["location", "/elsewhere"]]'}
    first = gw.post(path, key, headers=headers)
    assert first.status_code == status
    assert_replay_of(gw.post(path, key, headers=headers), first)
    assert gw.executions(path) == 1


@pytest.mark.parametrize("status", [500, 503, 408, 409, 429])
def test_transient_statuses_release_the_key(gw: Gateway, status: int) -> None:
    """5xx and 408/409/423/425/429 are not kept: the retry executes again."""
    path, key = f"/things/{uid()}", uid()
    assert gw.post(path, key, headers={"x-status": str(status)}).status_code == status
    retry = gw.post(path, key)
    assert retry.status_code == 200
    assert REPLAYED not in retry.headers
    assert gw.executions(path) == 2


def test_outcome_policy_per_route(gw: Gateway) -> None:
    """Per route: "success" releases a 404; exceptions release 404 and keep 503."""
    for path, status, kept in [
        (f"/success-only/{uid()}", 404, False),
        (f"/exceptions/{uid()}", 404, False),
        (f"/exceptions/{uid()}", 503, True),
        (f"/success-only/{uid()}", 201, True),
    ]:
        key = uid()
        first = gw.post(path, key, headers={"x-status": str(status)})
        again = gw.post(path, key, headers={"x-status": str(status)})
        assert (again.headers.get(REPLAYED) == "true") is kept, (path, status)
        assert gw.executions(path) == (1 if kept else 2)
        if kept:
            assert_replay_of(again, first)


def test_replay_is_byte_identical_with_repeated_headers_in_order(gw: Gateway) -> None:
    """Status, headers (repeats and order kept) and body are replayed as they were."""
    path, key = f"/things/{uid()}", uid()
    extra = [["x-multi", "1"], ["etag", '"v1"'], ["x-multi", "2"], ["location", "/things/9"]]
    headers = {"x-status": "201", "x-respond": json.dumps(extra)}
    first = gw.post(path, key, headers=headers)
    again = gw.post(path, key, headers=headers)
    assert_replay_of(again, first)

    def kept(response: httpx.Response) -> list[tuple[str, str]]:
        names = {"x-multi", "etag", "location", "content-type", "content-length"}
        return [(n, v) for n, v in response.headers.multi_items() if n in names]

    assert kept(again) == kept(first)
    assert [v for n, v in again.headers.multi_items() if n == "x-multi"] == ["1", "2"]


def test_set_cookie_and_configured_headers_are_not_replayed(gw: Gateway) -> None:
    """Set-Cookie is delivered once, never replayed; a route may deny more headers."""
    path, key = f"/things/{uid()}", uid()
    respond = json.dumps([["set-cookie", "s=1"], ["x-secret", "shh"], ["etag", '"e"']])
    first = gw.post(path, key, headers={"x-respond": respond})
    assert first.headers["set-cookie"] == "s=1"
    again = gw.post(path, key, headers={"x-respond": respond})
    assert "set-cookie" not in again.headers
    assert again.headers["etag"] == '"e"'
    assert again.headers["x-secret"] == "shh"
    denied, key = f"/denied/{uid()}", uid()
    gw.post(denied, key, headers={"x-respond": respond})
    again = gw.post(denied, key, headers={"x-respond": respond})
    assert again.headers.get(REPLAYED) == "true"
    assert "x-secret" not in again.headers


def test_streaming_response_streams_and_is_kept_whole(gw: Gateway) -> None:
    """The first chunk reaches the client before the upstream sends the last; the replay is
    the whole body."""
    path, key = f"/stream/{uid()}", uid()
    with gw.client.stream("POST", path, headers={"Idempotency-Key": key}) as response:
        chunks = response.iter_raw()
        assert next(chunks).startswith(b"first-")  # the upstream has not sent its end yet
        gw.upstream.go(key)
        rest = b"".join(chunks)
    body = b"first-" + rest if not rest.startswith(b"first-") else rest
    again = gw.post(path, key)
    assert again.headers.get(REPLAYED) == "true"
    assert again.content.endswith(b"-last")
    assert again.content.startswith(b"first-")
    assert again.content.endswith(body[-21:])
    assert gw.executions(path) == 1


# -- 18-19. sizes and expiry ----------------------------------------------------------------------


def test_oversized_response_is_delivered_whole_then_replay_unavailable(gw: Gateway) -> None:
    """A response over the route's storable size reaches the client whole; a retry gets 410
    replay-unavailable and the upstream never runs it again."""
    path, key = f"/small/{uid()}", uid()
    first = gw.post(path, key, headers={"x-size": "300000"})
    assert first.status_code == 200
    assert len(first.content) == 300000
    assert_problem(gw.post(path, key, headers={"x-size": "300000"}), "replay-unavailable", 410)
    assert gw.executions(path) == 1


def test_request_body_over_the_limit_gets_413(gw: Gateway) -> None:
    """A keyed request body over the route's limit: 413 body-too-large, not executed."""
    path = f"/small/{uid()}"
    assert_problem(gw.post(path, uid(), content=b"x" * 65), "body-too-large", 413)
    assert gw.executions(path) == 0


def test_records_expire_after_the_ttl(gw: Gateway) -> None:
    """After the route's retention (1 s) the key executes anew."""
    path, key = f"/ttl/{uid()}", uid()
    first = gw.post(path, key)
    assert_replay_of(gw.post(path, key), first)
    time.sleep(1.3)
    again = gw.post(path, key)
    assert REPLAYED not in again.headers
    assert gw.executions(path) == 2


# -- 22-23. damaged records, no 500 ----------------------------------------------------------------


def test_corrupt_record_is_treated_as_absent(gw: Gateway) -> None:
    """A record that cannot be decoded acts as absent: the key executes again, no 500."""
    path, key = f"/things/{uid()}", uid()
    gw.post(path, key)
    if gw.kind == "sqlite":
        with sqlite3.connect(gw.store.removeprefix("sqlite:///")) as db:
            db.execute(
                "UPDATE retrysafe_records SET response = x'00ff00ff' WHERE response IS NOT NULL"
            )
    elif gw.kind == "postgres":
        rows = postgres_query(
            gw.store,
            "UPDATE {t} SET response = '\\x00ff00ff'::bytea WHERE response IS NOT NULL"
            " RETURNING rid",
        )
        assert len(rows) >= 1
    else:  # Redis: one hash per record under the ledger's prefix
        parts = urlsplit(gw.store)
        prefix = parse_qs(parts.query)["prefix"][0]
        client = redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
        try:
            damaged = 0
            for name in client.scan_iter(match=f"{prefix}:*"):
                if client.hget(name, "response"):
                    client.hset(name, "response", b"\x00\xff\x00\xff")
                    damaged += 1
            assert damaged >= 1
        finally:
            client.close()
    again = gw.post(path, key)
    assert again.status_code == 200
    assert REPLAYED not in again.headers
    assert gw.executions(path) == 2


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000 + b"]" * 5000, b"\xff\xfe not json", b'{"a": NaN}', b'{"a": 1e999999}'],
    ids=["deep-json", "binary", "nan", "huge-number"],
)
def test_odd_bodies_are_no_500(gw: Gateway, body: bytes) -> None:
    """Bodies that are not plain JSON are fingerprinted and replayed like any other."""
    path, key = f"/things/{uid()}", uid()
    headers = {"content-type": "application/json"}
    first = gw.post(path, key, content=body, headers=headers)
    assert first.status_code == 200
    assert_replay_of(gw.post(path, key, content=body, headers=headers), first)


# -- 20-21, 24: the ledger failing, the problem base -----------------------------------------


@pytest.fixture(scope="module")
def redis_relay() -> Iterator[Relay]:
    """A switchable relay in front of the real Redis."""
    url = require_server("redis")
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    relay = Relay(host, int(port))
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def relayed_gw(
    upstream: Upstream, redis_relay: Relay, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway whose Redis ledger is reached through a relay the test can cut, with a
    problem base of its own."""
    directory = tmp_path_factory.mktemp("gateway-relayed")
    store = f"redis://127.0.0.1:{redis_relay.port}/0?prefix=rsgw-{uid()}&timeout=0.5"
    config = '[idempotency]\nproblem_base = "https://errors.example.com/"\n'
    with (
        run_gateway(upstream.url, directory, "--store", store, config=config) as process,
        httpx.Client(base_url=process.url, timeout=30) as client,
    ):
        yield Gateway("redis", store, process, upstream, client)


def test_unreachable_store_gives_503_and_does_not_execute(
    relayed_gw: Gateway, redis_relay: Relay
) -> None:
    """Ledger down: 503 store-unavailable with Retry-After, under the configured problem base;
    nothing reaches the upstream. It recovers by itself."""
    path, key = f"/things/{uid()}", uid()
    redis_relay.cut("down")
    try:
        response = relayed_gw.post(path, key)
        assert_problem(response, "store-unavailable", 503, "https://errors.example.com/")
        assert response.headers["retry-after"].isdigit()
        assert relayed_gw.executions(path) == 0
    finally:
        redis_relay.restore()
    poll_until(lambda: relayed_gw.post(path, key).status_code == 200, timeout=20)
    assert relayed_gw.executions(path) == 1


def test_store_failing_after_the_upstream_ran_still_answers(
    relayed_gw: Gateway, redis_relay: Relay
) -> None:
    """The ledger fails while the upstream runs: the client still gets the upstream's answer."""
    path, key = f"/things/{uid()}", uid()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(relayed_gw.post, path, key, headers={"x-delay": "0.5"})
        poll_until(lambda: relayed_gw.executions(path) == 1, timeout=10, what="the upstream")
        redis_relay.cut("down")
        try:
            response = pending.result()
        finally:
            redis_relay.restore()
    assert response.status_code == 200
    assert response.json()["path"] == path
    assert "store-error" in relayed_gw.process.log()


def test_every_refusal_uses_the_configured_problem_base(relayed_gw: Gateway) -> None:
    """Rule 24: problem types sit under the configured base."""
    response = relayed_gw.post(f"/things/{uid()}", "")
    assert_problem(response, "malformed-key", 400, "https://errors.example.com/")
