"""The contract (rules 1-24), tested in-process through the ASGI middleware.

Requests go through ``httpx.ASGITransport`` (or straight to the ASGI callable where httpx would
tidy a header up). The inner app counts its executions and answers with a nonce, so a second
execution is visible in the count and in the body. Tests that involve the ledger run once per
store kind (``store_url``); failure tests need SQLite, whose file can be locked or damaged for
real. Time passes for real; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from retrysafe import (
    ConfigError,
    Decision,
    Engine,
    Event,
    IdempotencyMiddleware,
    Problem,
    Replay,
    RequestView,
    Route,
)
from retrysafe.policy import DEFAULT_DENIED_HEADERS, PolicyOptions
from retrysafe.problems import DEFAULT_PROBLEM_BASE

pytestmark = pytest.mark.anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

REPLAYED = "idempotent-replayed"
TABLE = "retrysafe_records"


# -- the inner app --------------------------------------------------------------------------------


class Counting:
    """An ASGI app that counts executions and answers each with a fresh nonce.

    The status is ``status``, or the request's ``x-status`` header; ``headers`` are added to the
    response; ``chunks`` replace the JSON body (sent as several body messages).
    """

    def __init__(
        self,
        *,
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] = (),
        chunks: Sequence[bytes] | None = None,
        delay: float = 0.0,
        fail_first: int = 0,
    ) -> None:
        self.calls = 0
        self.status = status
        self.headers = list(headers)
        self.chunks = chunks
        self.delay = delay
        self.fail_first = fail_first
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        n = self.calls
        parts = []
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.bodies.append(b"".join(parts))
        if self.delay:
            await asyncio.sleep(self.delay)
        if n <= self.fail_first:
            raise RuntimeError("the handler failed")
        status = int(dict(scope["headers"]).get(b"x-status", self.status))
        if self.chunks is None:
            document = {"n": n, "nonce": secrets.token_hex(8), "path": scope["path"]}
            chunks: Sequence[bytes] = [json.dumps(document).encode()]
            head = [(b"content-type", b"application/json")]
        else:
            chunks, head = self.chunks, []
        size = str(sum(map(len, chunks))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*head, (b"content-length", size), *self.headers],
            }
        )
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp, store: str, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, IdempotencyMiddleware]]:
    """An httpx client talking in-process to ``IdempotencyMiddleware(app, store=store, ...)``."""
    middleware = IdempotencyMiddleware(app, store=store, **options)
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, middleware
    finally:
        await middleware.aclose()


def http_scope(
    headers: Headers, *, method: str = "POST", path: str = "/o", spec: str = "2.4", **more: Any
) -> Scope:
    """An HTTP scope as uvicorn builds it, with exactly these header bytes."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("t", 80),
        "client": ("127.0.0.1", 50000),
        **more,
    }


async def call_raw(
    app: ASGIApp,
    method: str,
    path: str,
    headers: Headers,
    body: bytes = b"",
    extensions: dict[str, Any] | None = None,
) -> tuple[int, Headers, bytes]:
    """Call an ASGI app with exactly these header bytes; return status, headers, body."""
    scope = http_scope(headers, method=method, path=path, extensions=extensions or {})
    delivered = False
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def key(value: str = "key-1", **headers: str) -> dict[str, str]:
    """Request headers: the Idempotency-Key plus ``headers`` (underscores become dashes)."""
    return {"Idempotency-Key": value, **{k.replace("_", "-"): v for k, v in headers.items()}}


def assert_problem(
    response: httpx.Response, slug: str, status: int, base: str = DEFAULT_PROBLEM_BASE
) -> dict[str, Any]:
    """Check an RFC 9457 problem response (rule 24) and return its document."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert REPLAYED not in response.headers
    document: dict[str, Any] = response.json()
    assert document["type"] == base + slug
    assert document["type"].endswith(slug)
    assert document["status"] == status
    assert isinstance(document["title"], str)
    assert document["title"]
    assert isinstance(document["detail"], str)
    assert document["detail"]
    return document


def assert_original(response: httpx.Response, n: int | None = None) -> None:
    """An answer from the handler itself (200 from execution number ``n``), not a replay."""
    assert REPLAYED not in response.headers
    if n is not None:
        assert response.status_code == 200, response.text
        assert response.json()["n"] == n


def assert_replay_of(replay: httpx.Response, original: httpx.Response) -> None:
    """``replay`` repeats ``original`` byte for byte, marked as a replay."""
    assert replay.headers.get(REPLAYED) == "true"
    assert replay.status_code == original.status_code
    assert replay.content == original.content


def sqlite_path(store_url: str) -> str:
    """The file a ``sqlite:///`` URL names."""
    return urlsplit(store_url).path[1:]


def sqlite_url(tmp_path: Path, **query: str) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


# -- 1. which requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_and_patch_are_protected(store_url: str, method: str) -> None:
    """POST and PATCH with a key execute once; the retry replays the first response."""
    app = Counting()
    async with serve(app, store_url) as (client, _):
        first = await client.request(method, "/orders", headers=key(), json={"a": 1})
        second = await client.request(method, "/orders", headers=key(), json={"a": 1})
    assert_original(first, 1)
    assert_replay_of(second, first)
    assert app.calls == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_pass_through_and_store_nothing(store_url: str, method: str) -> None:
    """GET/PUT/DELETE with a key execute every time; nothing is stored under the key."""
    app = Counting()
    async with serve(app, store_url) as (client, middleware):
        first = await client.request(method, "/orders", headers=key())
        second = await client.request(method, "/orders", headers=key())
        # had anything been stored under the key, this POST would be refused or replayed
        post = await client.post("/orders", headers=key(), content=b"new")
    assert_original(first, 1)
    assert_original(second, 2)
    assert_original(post, 3)
    assert app.calls == 3
    assert middleware.engine.counts[Event.EXECUTED] == 1


async def test_protected_methods_are_configurable_globally_and_per_route(store_url: str) -> None:
    """``methods`` changes what is protected, for the whole app and for one route."""
    app = Counting()
    routes = [Route("/both", methods=["post", "put"])]
    async with serve(app, store_url, methods=["PUT"], routes=routes) as (client, _):
        put1 = await client.put("/things", headers=key("a"))
        put2 = await client.put("/things", headers=key("a"))
        post1 = await client.post("/things", headers=key("b"))
        post2 = await client.post("/things", headers=key("b"))
        both1 = await client.post("/both", headers=key("c"))
        both2 = await client.post("/both", headers=key("c"))
    assert_replay_of(put2, put1)
    assert_original(post1, 2)
    assert_original(post2, 3)
    assert_replay_of(both2, both1)
    assert app.calls == 4


# -- 2. requests without a key --------------------------------------------------------------------


async def test_protected_request_without_key_passes_through(store_url: str) -> None:
    """A POST without a key executes every time and is never marked as a replay."""
    app = Counting()
    async with serve(app, store_url) as (client, middleware):
        first = await client.post("/orders", json={"a": 1})
        second = await client.post("/orders", json={"a": 1})
    assert_original(first, 1)
    assert_original(second, 2)
    assert middleware.engine.counts[Event.EXECUTED] == 0


async def test_require_key_globally(store_url: str) -> None:
    """With require_key, a protected request without a key gets 400 missing-key, unexecuted."""
    app = Counting()
    async with serve(app, store_url, require_key=True) as (client, _):
        refused = await client.post("/orders", json={"a": 1})
        unprotected = await client.get("/orders")
        keyed = await client.post("/orders", headers=key(), json={"a": 1})
    assert_problem(refused, "missing-key", 400)
    assert_original(unprotected, 1)
    assert_original(keyed, 2)
    assert app.calls == 2


async def test_require_key_per_route(store_url: str) -> None:
    """require_key on one Route refuses keyless requests there and nowhere else."""
    app = Counting()
    routes = [Route("/payments/{id}", require_key=True)]
    async with serve(app, store_url, routes=routes) as (client, _):
        refused = await client.post("/payments/7", json={"a": 1})
        elsewhere = await client.post("/orders", json={"a": 1})
        keyed = await client.post("/payments/7", headers=key(), json={"a": 1})
    assert_problem(refused, "missing-key", 400)
    assert_original(elsewhere, 1)
    assert_original(keyed, 2)
    assert app.calls == 2


async def test_a_trailing_double_star_covers_the_bare_prefix(store_url: str) -> None:
    """Route("/payments/**") applies to POST /payments itself, not only to paths below it."""
    app = Counting()
    routes = [Route("/payments/**", require_key=True)]
    async with serve(app, store_url, routes=routes) as (client, _):
        bare = await client.post("/payments", json={"a": 1})
        below = await client.post("/payments/7/refund", json={"a": 1})
        sibling = await client.post("/paymentsx", json={"a": 1})
    assert_problem(bare, "missing-key", 400)
    assert_problem(below, "missing-key", 400)
    assert_original(sibling, 1)
    assert app.calls == 1


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("/v1/**", ["/v1", "/v1/", "/v1/a/b"], ["/v1x", "/v", "/"]),
        ("/a/**/b", ["/a/b", "/a/x/b", "/a/x/y/b"], ["/ab", "/a/b/c", "/a/xb"]),
        ("/a/**/**", ["/a", "/a/", "/a/x", "/a/x/y"], ["/ab", "/"]),
        ("/a/**/**/b", ["/a/b", "/a/x/b", "/a/x/y/b"], ["/ab", "/a/b/c"]),
        ("/**", ["/", "/a", "/a/b"], []),
        ("/x**", ["/x", "/xy", "/x/y"], ["/"]),
        ("/items/{id}", ["/items/7"], ["/items", "/items/", "/items/7/x"]),
        ("/files/*.json", ["/files/a.json"], ["/files/a/b.json", "/files/a.txt"]),
    ],
)
def test_route_patterns(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    """Each pattern form matches the paths its documentation promises, and no others."""
    route = Route(pattern)
    assert [p for p in matching if not route.matches(p)] == []
    assert [p for p in not_matching if route.matches(p)] == []


# -- 3-5. the key ---------------------------------------------------------------------------------


async def test_header_name_matched_case_insensitively(store_url: str) -> None:
    """Idempotency-Key, IDEMPOTENCY-KEY and idempotency-key name the same record."""
    app = Counting()
    async with serve(app, store_url) as (client, middleware):
        first = await client.post("/orders", headers={"IDEMPOTENCY-KEY": "abc"})
        raw = await call_raw(middleware, "POST", "/orders", [(b"Idempotency-Key", b"abc")])
        raw_upper = await call_raw(middleware, "POST", "/orders", [(b"IDEMPOTENCY-KEY", b"abc")])
    assert_original(first, 1)
    for status, headers, body in (raw, raw_upper):
        assert status == 200
        assert (b"idempotent-replayed", b"true") in headers
        assert body == first.content
    assert app.calls == 1


async def test_header_name_is_configurable(store_url: str) -> None:
    """With header="X-Request-Key" that header carries the key and Idempotency-Key is ignored."""
    app = Counting()
    async with serve(app, store_url, header="X-Request-Key") as (client, _):
        ignored1 = await client.post("/orders", headers=key("a"))
        ignored2 = await client.post("/orders", headers=key("a"))
        first = await client.post("/orders", headers={"x-request-key": "b"})
        second = await client.post("/orders", headers={"X-REQUEST-KEY": "b"})
    assert_original(ignored1, 1)
    assert_original(ignored2, 2)
    assert_original(first, 3)
    assert_replay_of(second, first)
    assert app.calls == 3


@pytest.mark.parametrize(
    ("quoted", "bare"),
    [('"abc-123"', "abc-123"), (r'"a\"b\\c"', 'a"b\\c'), ('"x"', "x")],
)
async def test_quoted_and_bare_key_name_the_same_record(
    store_url: str, quoted: str, bare: str
) -> None:
    """A Structured Field string and the bare value it unquotes to are one key."""
    app = Counting()
    async with serve(app, store_url) as (client, _):
        first = await client.post("/orders", headers=key(quoted))
        second = await client.post("/orders", headers=key(bare))
    assert_original(first, 1)
    assert_replay_of(second, first)
    assert app.calls == 1


async def test_longest_and_shortest_keys_are_accepted(store_url: str) -> None:
    """Keys of 1 and 255 printable characters (quoted or not) are valid and distinct."""
    app = Counting()
    long_key = "k" * 254 + "~"
    async with serve(app, store_url) as (client, _):
        short = await client.post("/orders", headers=key("x"))
        long1 = await client.post("/orders", headers=key(long_key))
        long2 = await client.post("/orders", headers=key(f'"{long_key}"'))
        spaced = await client.post("/orders", headers=key("a b !#$%&'()*+-./:;<=>?@[]^_`{|}~"))
    assert_original(short, 1)
    assert_original(long1, 2)
    assert_replay_of(long2, long1)
    assert_original(spaced, 3)


MALFORMED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"   ", id="blank"),
    pytest.param(b'""', id="empty-quoted"),
    pytest.param(b"k" * 256, id="256-chars"),
    pytest.param(b'"' + b"k" * 256 + b'"', id="256-chars-quoted"),
    pytest.param("clé".encode(), id="non-ascii-utf8"),
    pytest.param(b"cl\xe9", id="non-ascii-latin1"),
    pytest.param(b"ab\x01cd", id="control-char"),
    pytest.param(b"ab\tcd", id="tab"),
    pytest.param(b"ab\x7fcd", id="del"),
    pytest.param(b'"abc', id="unclosed-quote"),
    pytest.param(b'"ab"cd', id="text-after-quote"),
    pytest.param(b'"ab\\qc"', id="bad-escape"),
    pytest.param(b'"abc\\"', id="escape-at-end"),
    pytest.param(b"a, b", id="list"),
    pytest.param(b'"a", "b"', id="quoted-list"),
    pytest.param(b'"abc";p=1', id="parameters"),
]


@pytest.mark.parametrize("value", MALFORMED)
async def test_malformed_key_is_refused(store_url: str, value: bytes) -> None:
    """A malformed key gets 400 malformed-key; nothing is executed or claimed."""
    app = Counting()
    async with serve(app, store_url) as (_, middleware):
        status, headers, body = await call_raw(
            middleware, "POST", "/orders", [(b"idempotency-key", value)], b"{}"
        )
    response = httpx.Response(status, headers=headers, content=body)
    assert_problem(response, "malformed-key", 400)
    assert app.calls == 0
    assert middleware.engine.counts[Event.EXECUTED] == 0


@pytest.mark.parametrize("second", [b"abc", b"other"])
async def test_repeated_key_header_is_refused(store_url: str, second: bytes) -> None:
    """Two Idempotency-Key headers, equal or not, get 400 malformed-key and no execution."""
    app = Counting()
    async with serve(app, store_url) as (client, _):
        response = await client.post(
            "/orders", headers=[("Idempotency-Key", "abc"), ("Idempotency-Key", second.decode())]
        )
    assert_problem(response, "malformed-key", 400)
    assert app.calls == 0


# -- 6-7. scope -----------------------------------------------------------------------------------


async def test_callers_with_different_credentials_never_share_a_record(store_url: str) -> None:
    """The same key from two Authorization values runs twice; each caller gets its own replay."""
    app = Counting()
    alice = key("shared", authorization="Bearer alice-token")
    bob = key("shared", authorization="Bearer bob-token")
    async with serve(app, store_url) as (client, _):
        a1 = await client.post("/orders", headers=alice, json={"a": 1})
        b1 = await client.post("/orders", headers=bob, json={"a": 1})
        a2 = await client.post("/orders", headers=alice, json={"a": 1})
        b2 = await client.post("/orders", headers=bob, json={"a": 1})
        bob_other = await client.post("/orders", headers=bob, json={"a": 2})
    assert_original(a1, 1)
    assert_original(b1, 2)
    assert a1.content != b1.content
    assert_replay_of(a2, a1)
    assert_replay_of(b2, b1)
    assert_problem(bob_other, "key-reused", 422)
    assert app.calls == 2


async def test_requests_without_credentials_share_the_anonymous_scope(store_url: str) -> None:
    """Two callers without credentials and the same key share one record."""
    app = Counting()
    async with serve(app, store_url) as (client, _):
        first = await client.post("/orders", headers=key(), json={"a": 1})
        second = await client.post("/orders", headers=key(), json={"a": 1})
        with_credentials = await client.post(
            "/orders", headers=key(authorization="Basic dTpw"), json={"a": 1}
        )
    assert_replay_of(second, first)
    assert_original(with_credentials, 2)


async def test_scope_callable_replaces_the_default(store_url: str) -> None:
    """A custom scope (tenant header) decides who shares records, not Authorization."""
    app = Counting()

    def tenant(request: RequestView) -> bytes | None:
        return request.header(b"x-tenant")

    async with serve(app, store_url, scope=tenant) as (client, _):
        t1 = await client.post("/o", headers=key(x_tenant="t1", authorization="A"))
        t1_other_user = await client.post("/o", headers=key(x_tenant="t1", authorization="B"))
        t2 = await client.post("/o", headers=key(x_tenant="t2", authorization="A"))
    assert_original(t1, 1)
    assert_replay_of(t1_other_user, t1)
    assert_original(t2, 2)


async def test_scope_headers_add_an_api_key_header(store_url: str) -> None:
    """With scope_headers including X-API-Key, callers differing only by it never share."""
    app = Counting()
    options: PolicyOptions = {"scope_headers": ["authorization", "X-API-Key"]}
    async with serve(app, store_url, **options) as (client, _):
        k1 = await client.post("/o", headers=key(x_api_key="key-one"))
        k2 = await client.post("/o", headers=key(x_api_key="key-two"))
        k1_again = await client.post("/o", headers=key(x_api_key="key-one"))
        k1_auth = await client.post("/o", headers=key(x_api_key="key-one", authorization="X"))
    assert_original(k1, 1)
    assert_original(k2, 2)
    assert_replay_of(k1_again, k1)
    assert_original(k1_auth, 3)


async def test_scope_cookies_separate_sessions(store_url: str) -> None:
    """With scope_cookies=["session"], callers with different session cookies never share."""
    app = Counting()
    async with serve(app, store_url, scope_cookies=["session"]) as (client, _):
        s1 = await client.post("/o", headers=key(cookie="session=s1"))
        s2 = await client.post("/o", headers=key(cookie="theme=dark; session=s2"))
        s1_again = await client.post("/o", headers=key(cookie="theme=light; session=s1"))
    assert_original(s1, 1)
    assert_original(s2, 2)
    assert_replay_of(s1_again, s1)
    assert app.calls == 2


async def test_store_holds_no_raw_key_or_credentials(tmp_path: Path) -> None:
    """The SQLite file (and its WAL) never contains the raw key or the Authorization value."""
    secret_key = "raw-key-7b0f3c1d9e2a"
    secret_auth = "Bearer cred-5a8e2f6b1c9d"
    url = sqlite_url(tmp_path)
    app = Counting()
    async with serve(app, url) as (client, _):
        for path in ("/a", "/b"):
            response = await client.post(
                path, headers=key(secret_key, authorization=secret_auth), json={"a": 1}
            )
            assert response.status_code in {200, 422}
        files = read_files(tmp_path)
    files.update({f"{name} (closed)": data for name, data in read_files(tmp_path).items()})
    assert sum(map(len, files.values())) > 0
    assert app.calls == 1
    for name, data in files.items():
        assert secret_key.encode() not in data, name
        assert secret_auth.encode() not in data, name
        assert b"cred-5a8e2f6b1c9d" not in data, name


# -- 8-9. fingerprint -----------------------------------------------------------------------------


VARIANTS = {
    "body": ("POST", "/orders", {"x": "1"}, {"amount": 2}),
    "path": ("POST", "/refunds", {"x": "1"}, {"amount": 1}),
    "method": ("PATCH", "/orders", {"x": "1"}, {"amount": 1}),
    "query": ("POST", "/orders", {"x": "2"}, {"amount": 1}),
    "no-query": ("POST", "/orders", {}, {"amount": 1}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_same_key_other_request_is_key_reused(store_url: str, variant: str) -> None:
    """Same key, different body/path/method/query: 422 key-reused, unexecuted, no replay."""
    app = Counting()
    method, path, params, body = VARIANTS[variant]
    async with serve(app, store_url) as (client, _):
        first = await client.post("/orders", params={"x": "1"}, headers=key(), json={"amount": 1})
        reused = await client.request(method, path, params=params, headers=key(), json=body)
        again = await client.post("/orders", params={"x": "1"}, headers=key(), json={"amount": 1})
    assert_original(first, 1)
    document = assert_problem(reused, "key-reused", 422)
    assert first.json()["nonce"] not in json.dumps(document)
    assert_replay_of(again, first)
    assert app.calls == 1


async def test_json_key_order_and_whitespace_do_not_count(store_url: str) -> None:
    """Equal JSON documents replay; differently spaced non-JSON bodies are different."""
    app = Counting()
    as_json = {"content-type": "application/json; charset=utf-8"}
    as_text = {"content-type": "text/plain"}
    async with serve(app, store_url) as (client, _):
        first = await client.post(
            "/o", headers=key("j", **as_json), content=b'{"a":1,"b":[1,2],"c":{"y":1,"x":2}}'
        )
        same = await client.post(
            "/o",
            headers=key("j", **as_json),
            content=b'{ "c" : {"x": 2, "y": 1},\n "b": [1, 2], "a": 1 }',
        )
        problem_json = await client.post(
            "/o",
            headers=key("j", **{"content-type": "application/merge-patch+json"}),
            content=b'{"b":[1,2],"a":1,"c":{"x":2,"y":1}}',
        )
        reordered_list = await client.post(
            "/o", headers=key("j", **as_json), content=b'{"a":1,"b":[2,1],"c":{"y":1,"x":2}}'
        )
        text = await client.post("/o", headers=key("t", **as_text), content=b'{"a":1}')
        text_spaced = await client.post("/o", headers=key("t", **as_text), content=b'{"a": 1}')
    assert_original(first, 1)
    assert_replay_of(same, first)
    assert_replay_of(problem_json, first)
    assert_problem(reordered_list, "key-reused", 422)
    assert_original(text, 2)
    assert_problem(text_spaced, "key-reused", 422)


async def test_excluded_fields_do_not_count(store_url: str) -> None:
    """exclude_fields leaves the named JSON fields out of the fingerprint, and only those."""
    app = Counting()
    async with serve(app, store_url, exclude_fields=["sent_at"]) as (client, _):
        first = await client.post("/o", headers=key(), json={"amount": 5, "sent_at": 1})
        later = await client.post("/o", headers=key(), json={"sent_at": 2, "amount": 5})
        other = await client.post("/o", headers=key(), json={"amount": 6, "sent_at": 1})
    assert_replay_of(later, first)
    assert_problem(other, "key-reused", 422)
    assert app.calls == 1


async def test_fingerprint_callable_replaces_the_default(store_url: str) -> None:
    """A custom fingerprint (the path only) decides what counts as the same request."""
    app = Counting()

    def by_path(request: RequestView) -> bytes:
        return request.path.encode()

    async with serve(app, store_url, fingerprint=by_path) as (client, _):
        first = await client.post("/o", headers=key(), json={"amount": 5})
        other_body = await client.post("/o", headers=key(), json={"amount": 6})
        other_path = await client.post("/p", headers=key(), json={"amount": 5})
    assert_replay_of(other_body, first)
    assert_problem(other_path, "key-reused", 422)
    assert app.calls == 1


# -- 10-12. exactly once --------------------------------------------------------------------------


async def test_concurrent_duplicates_execute_exactly_once(store_url: str) -> None:
    """20 concurrent duplicates: one execution; the rest get 409 in-progress or the replay."""
    app = Counting(delay=0.3)
    async with serve(app, store_url) as (client, middleware):
        responses = await asyncio.gather(
            *(client.post("/o", headers=key(), json={"a": 1}) for _ in range(20))
        )
        later = await client.post("/o", headers=key(), json={"a": 1})
    assert app.calls == 1
    originals = [r for r in responses if r.status_code == 200 and REPLAYED not in r.headers]
    assert len(originals) == 1
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, "in-progress", 409)
            assert int(response.headers["retry-after"]) >= 1
        elif response is not originals[0]:
            assert_replay_of(response, originals[0])
    assert_replay_of(later, originals[0])  # a 409 was never stored
    assert middleware.engine.counts[Event.EXECUTED] == 1


async def test_wait_gives_duplicates_the_replay(store_url: str) -> None:
    """With wait=5, concurrent duplicates are held until the original ends, then replayed."""
    app = Counting(delay=0.3)
    async with serve(app, store_url, wait=5) as (client, _):
        responses = await asyncio.gather(
            *(client.post("/o", headers=key(), json={"a": 1}) for _ in range(10))
        )
    assert app.calls == 1
    originals = [r for r in responses if REPLAYED not in r.headers]
    assert len(originals) == 1
    assert_original(originals[0], 1)
    for response in responses:
        if response is not originals[0]:
            assert_replay_of(response, originals[0])


async def test_wait_that_runs_out_gives_409(store_url: str) -> None:
    """A duplicate whose wait ends before the original gets 409 in-progress."""
    app = Counting(delay=1.0)
    async with serve(app, store_url, wait=0.1) as (client, _):
        original = asyncio.ensure_future(client.post("/o", headers=key(), json={"a": 1}))
        await asyncio.sleep(0.2)
        duplicate = await client.post("/o", headers=key(), json={"a": 1})
        first = await original
    assert_problem(duplicate, "in-progress", 409)
    assert "retry-after" in duplicate.headers
    assert_original(first, 1)
    assert app.calls == 1


async def test_waiting_duplicate_runs_when_the_original_is_released(store_url: str) -> None:
    """If the original ends in a 5xx while a duplicate waits, the duplicate executes."""
    app = Counting(delay=0.3)
    async with serve(app, store_url, wait=5) as (client, _):
        failing = asyncio.ensure_future(client.post("/o", headers=key(x_status="503")))
        await asyncio.sleep(0.1)
        retry = await client.post("/o", headers=key())
        first = await failing
    assert first.status_code == 503
    assert_original(retry, 2)
    assert app.calls == 2


async def test_heartbeat_keeps_a_slow_handler_claim(store_url: str) -> None:
    """A handler slower than its lease keeps the claim: a duplicate meanwhile gets 409."""
    app = Counting(delay=1.5)
    async with serve(app, store_url, lease=0.6) as (client, middleware):
        original = asyncio.ensure_future(client.post("/o", headers=key(), json={"a": 1}))
        await asyncio.sleep(1.0)  # past the first lease: only renewals hold the claim
        duplicate = await client.post("/o", headers=key(), json={"a": 1})
        first = await original
        retry = await client.post("/o", headers=key(), json={"a": 1})
    assert_problem(duplicate, "in-progress", 409)
    assert_original(first, 1)
    assert_replay_of(retry, first)
    assert app.calls == 1
    assert middleware.engine.counts[Event.LEASE_LOST] == 0


async def test_ttl_shorter_than_the_handler_never_lets_a_duplicate_run(store_url: str) -> None:
    """A record does not expire under a running handler, however short the ttl."""
    app = Counting(delay=1.5)
    async with serve(app, store_url, lease=0.6, ttl=0.3) as (client, _):
        original = asyncio.ensure_future(client.post("/o", headers=key(), json={"a": 1}))
        await asyncio.sleep(1.0)  # past the ttl and the first lease
        duplicate = await client.post("/o", headers=key(), json={"a": 1})
        first = await original
    assert_problem(duplicate, "in-progress", 409)
    assert_original(first, 1)
    assert app.calls == 1


# -- 14-16. what is stored and replayed -----------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 302, 400, 403, 404, 410, 422])
async def test_final_statuses_are_stored_and_replayed(store_url: str, status: int) -> None:
    """2xx, 3xx and ordinary 4xx are final: the retry replays them without executing."""
    app = Counting(status=status, headers=[(b"location", b"/orders/1")])
    async with serve(app, store_url) as (client, _):
        first = await client.post("/o", headers=key(), json={"a": 1})
        second = await client.post("/o", headers=key(), json={"a": 1})
    assert first.status_code == status
    assert REPLAYED not in first.headers
    assert_replay_of(second, first)
    assert app.calls == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409, 423, 425, 429])
async def test_transient_statuses_release_the_key(store_url: str, status: int) -> None:
    """5xx and 408/409/423/425/429 are not stored: a retry executes again."""
    app = Counting()
    async with serve(app, store_url) as (client, middleware):
        first = await client.post("/o", headers=key(x_status=str(status)), json={"a": 1})
        retry = await client.post("/o", headers=key(), json={"a": 1})
        again = await client.post("/o", headers=key(), json={"a": 1})
    assert first.status_code == status
    assert REPLAYED not in first.headers
    assert_original(retry, 2)
    assert_replay_of(again, retry)
    assert middleware.engine.counts[Event.RELEASED] == 1


async def test_handler_exception_releases_the_key(store_url: str) -> None:
    """An unhandled exception propagates, frees the key, and the retry executes."""
    app = Counting(fail_first=1)
    async with serve(app, store_url) as (client, middleware):
        with pytest.raises(RuntimeError, match="the handler failed"):
            await client.post("/o", headers=key(), json={"a": 1})
        retry = await client.post("/o", headers=key(), json={"a": 1})
    assert_original(retry, 2)
    assert middleware.engine.counts[Event.RELEASED] == 1


async def test_store_status_policy_per_route(store_url: str) -> None:
    """A Route's store_status overrides which statuses are final, there only."""
    app = Counting(status=404)
    routes = [Route("/strict", store_status=lambda status: 200 <= status < 300)]
    async with serve(app, store_url, routes=routes) as (client, _):
        strict1 = await client.post("/strict", headers=key("a"))
        strict2 = await client.post("/strict", headers=key("a"))
        default1 = await client.post("/default", headers=key("b"))
        default2 = await client.post("/default", headers=key("b"))
    assert_original(strict1)
    assert_original(strict2)
    assert strict1.json()["n"] == 1
    assert strict2.json()["n"] == 2
    assert_replay_of(default2, default1)
    assert app.calls == 3


async def test_store_status_policy_globally(store_url: str) -> None:
    """A global store_status can make a 503 final (stored and replayed)."""
    app = Counting(status=503)
    async with serve(app, store_url, store_status=lambda status: True) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    assert_replay_of(second, first)
    assert app.calls == 1


async def test_replay_is_byte_identical_with_repeated_headers_in_order(store_url: str) -> None:
    """The replay repeats status, headers (repeats, order) and body bytes, plus the marker."""
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"x-multi", b"one"),
        (b"etag", b'"v1"'),
        (b"x-multi", b"two"),
        (b"link", b"</a>; rel=next"),
        (b"x-multi", b"three"),
    ]
    chunks = [bytes(range(256)), b"", b"\x00\r\n\xff" * 100, b"end"]
    app = Counting(status=201, headers=headers, chunks=chunks)
    async with serve(app, store_url) as (client, _):
        first = await client.post("/o", headers=key(), content=b"payload")
        second = await client.post("/o", headers=key(), content=b"payload")
    assert first.status_code == 201
    assert first.content == b"".join(chunks)
    assert REPLAYED.encode() not in [name.lower() for name, _ in first.headers.raw]
    assert second.status_code == 201
    assert second.content == first.content
    replayed_raw = [(n.lower(), v) for n, v in second.headers.raw]
    assert replayed_raw[-1] == (REPLAYED.encode(), b"true")
    assert replayed_raw[:-1] == [(n.lower(), v) for n, v in first.headers.raw]
    assert app.calls == 1


async def test_set_cookie_date_and_hop_by_hop_are_not_replayed(store_url: str) -> None:
    """Set-Cookie, Date and hop-by-hop headers reach the original only; safe ones are kept."""
    headers = [
        (b"location", b"/orders/9"),
        (b"etag", b'"abc"'),
        (b"set-cookie", b"session=s1; HttpOnly"),
        (b"Set-Cookie", b"other=2"),
        (b"date", b"Tue, 01 Jan 2030 00:00:00 GMT"),
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authenticate", b"Basic"),
        (b"x-custom", b"kept"),
    ]
    app = Counting(status=201, headers=headers)
    async with serve(app, store_url) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    original_names = {name.lower() for name, _ in first.headers.raw}
    assert {b"set-cookie", b"date", b"connection", b"keep-alive"} <= original_names
    assert_replay_of(second, first)
    for dropped in ("set-cookie", "date", "connection", "keep-alive", "proxy-authenticate"):
        assert dropped not in second.headers
    assert second.headers["location"] == "/orders/9"
    assert second.headers["etag"] == '"abc"'
    assert second.headers["content-type"] == "application/json"
    assert second.headers["x-custom"] == "kept"


async def test_headers_named_by_connection_are_not_replayed(store_url: str) -> None:
    """A header that the Connection header lists is hop-by-hop too: delivered once, not replayed."""
    headers = [(b"connection", b"X-Hop, x-other"), (b"x-hop", b"1"), (b"X-Other", b"2")]
    app = Counting(headers=headers)
    async with serve(app, store_url) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    assert first.headers["x-hop"] == "1"
    assert_replay_of(second, first)
    assert "x-hop" not in second.headers
    assert "x-other" not in second.headers


async def test_denied_headers_are_configurable(store_url: str) -> None:
    """denied_headers adds headers (any case) that are delivered once and never replayed."""
    headers = [(b"x-internal", b"secret"), (b"X-Trace", b"t1"), (b"x-public", b"p")]
    app = Counting(headers=headers)
    denied = DEFAULT_DENIED_HEADERS | {"X-Internal", "x-trace"}
    async with serve(app, store_url, denied_headers=denied) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    assert first.headers["x-internal"] == "secret"
    assert first.headers["x-trace"] == "t1"
    assert_replay_of(second, first)
    assert "x-internal" not in second.headers
    assert "x-trace" not in second.headers
    assert second.headers["x-public"] == "p"


# -- 18-19. sizes and expiry ----------------------------------------------------------------------


async def test_oversized_response_is_delivered_whole_then_replay_unavailable(
    store_url: str,
) -> None:
    """A response over max_response_body reaches the client whole; retries get 410, no rerun."""
    chunks = [bytes([i]) * 1000 for i in range(5)]
    app = Counting(chunks=chunks)
    async with serve(app, store_url, max_response_body=1000) as (client, middleware):
        first = await client.post("/o", headers=key(), content=b"x")
        retry = await client.post("/o", headers=key(), content=b"x")
        retry_again = await client.post("/o", headers=key(), content=b"x")
    assert first.status_code == 200
    assert first.content == b"".join(chunks)
    assert_problem(retry, "replay-unavailable", 410)
    assert_problem(retry_again, "replay-unavailable", 410)
    assert app.calls == 1
    assert middleware.engine.counts[Event.NOT_REPLAYABLE] == 1


async def test_response_at_the_size_limit_is_replayed(store_url: str) -> None:
    """A response exactly max_response_body long is still stored and replayed."""
    app = Counting(chunks=[b"a" * 600, b"b" * 400])
    async with serve(app, store_url, max_response_body=1000) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    assert_replay_of(second, first)
    assert app.calls == 1


async def test_request_body_over_the_limit_gets_413(store_url: str) -> None:
    """A keyed body over max_request_body gets 413 body-too-large, declared or streamed."""
    app = Counting()

    async def stream(parts: int) -> AsyncIterator[bytes]:
        for _ in range(parts):
            yield b"z" * 40

    async with serve(app, store_url, max_request_body=100) as (client, _):
        declared = await client.post("/o", headers=key("a"), content=b"z" * 101)
        streamed = await client.post("/o", headers=key("b"), content=stream(3))
        at_limit = await client.post("/o", headers=key("c"), content=b"z" * 100)
        streamed_small = await client.post("/o", headers=key("d"), content=stream(2))
    assert_problem(declared, "body-too-large", 413)
    assert_problem(streamed, "body-too-large", 413)
    assert_original(at_limit, 1)
    assert_original(streamed_small, 2)
    assert app.bodies == [b"z" * 100, b"z" * 80]


async def test_records_expire_after_ttl(store_url: str) -> None:
    """After the ttl (global or per route) the key executes anew; before it, it replays."""
    app = Counting()
    routes = [Route("/long", ttl=60)]
    async with serve(app, store_url, ttl=0.3, routes=routes) as (client, _):
        short1 = await client.post("/short", headers=key("a"))
        long1 = await client.post("/long", headers=key("b"))
        short2 = await client.post("/short", headers=key("a"))
        await asyncio.sleep(0.5)
        short3 = await client.post("/short", headers=key("a"))
        long2 = await client.post("/long", headers=key("b"))
        changed = await client.post("/short", headers=key("a"), content=b"new body")
    assert_original(short1, 1)
    assert_replay_of(short2, short1)
    assert_original(short3, 3)
    assert_replay_of(long2, long1)
    assert_problem(changed, "key-reused", 422)


# -- 20-22. failure -------------------------------------------------------------------------------


def read_files(directory: Path) -> dict[str, bytes]:
    """The contents of every file in ``directory``, by name."""
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def unreachable_store(tmp_path: Path) -> str:
    """A SQLite URL whose directory is a regular file: every connection attempt fails."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"x")
    return f"sqlite:///{blocker / 'ledger.db'}"


async def test_unreachable_store_gives_503_and_does_not_execute(tmp_path: Path) -> None:
    """A store that cannot be opened: 503 store-unavailable with Retry-After, no execution."""
    app = Counting()
    async with serve(app, unreachable_store(tmp_path)) as (client, middleware):
        response = await client.post("/o", headers=key(), json={"a": 1})
        unkeyed = await client.post("/o", json={"a": 1})
    assert_problem(response, "store-unavailable", 503)
    assert int(response.headers["retry-after"]) >= 1
    assert_original(unkeyed, 1)
    assert app.calls == 1
    assert middleware.engine.counts[Event.STORE_ERROR] == 1


async def test_locked_store_gives_503_and_does_not_execute(tmp_path: Path) -> None:
    """A ledger locked by another connection past busy_timeout: 503, then fine once free."""
    app = Counting()
    url = sqlite_url(tmp_path, busy_timeout="0.2")
    async with serve(app, url) as (client, _):
        warm = await client.post("/o", headers=key("warm"))
        other = sqlite3.connect(sqlite_path(url), isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            locked = await client.post("/o", headers=key("new"))
        finally:
            other.execute("ROLLBACK")
            other.close()
        retry = await client.post("/o", headers=key("new"))
    assert_original(warm, 1)
    assert_problem(locked, "store-unavailable", 503)
    assert "retry-after" in locked.headers
    assert_original(retry, 2)
    assert app.calls == 2


async def test_fail_open_executes_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fail_open=True runs the handler unprotected when the store fails; counted and logged."""
    caplog.set_level(logging.WARNING, logger="retrysafe")
    app = Counting()
    async with serve(app, unreachable_store(tmp_path), fail_open=True) as (client, middleware):
        first = await client.post("/o", headers=key(), json={"a": 1})
        second = await client.post("/o", headers=key(), json={"a": 1})
    assert_original(first, 1)
    assert_original(second, 2)
    assert middleware.engine.counts[Event.FAIL_OPEN] == 2
    assert any("fail-open" in record.getMessage() for record in caplog.records)


async def test_store_failing_after_the_handler_still_answers(tmp_path: Path) -> None:
    """If the outcome cannot be recorded the client still gets it, counted; once the ledger
    takes writes again (within the lease) it is recorded, and retries get the replay."""
    url = sqlite_url(tmp_path, busy_timeout="0.2")
    inner = Counting()

    async def locking_app(scope: Scope, receive: Receive, send: Send) -> None:
        """The first execution locks the ledger once its response starts, as it finishes."""
        first_call = inner.calls == 0

        async def send_locked(message: Message) -> None:
            if message["type"] == "http.response.start" and first_call:
                lock.execute("BEGIN EXCLUSIVE")
            await send(message)

        lock = sqlite3.connect(sqlite_path(url), isolation_level=None)
        try:
            await inner(scope, receive, send_locked)
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()

    async with serve(locking_app, url, lease=1.0) as (client, middleware):
        first = await client.post("/o", headers=key(), json={"a": 1})
        for _ in range(200):  # until the outcome is recorded: 409 meanwhile
            retry = await client.post("/o", headers=key(), json={"a": 1})
            if retry.status_code != 409:
                break
            assert_problem(retry, "in-progress", 409)
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.3)  # past the lease: still the replay
        after_lease = await client.post("/o", headers=key(), json={"a": 1})
    assert_original(first, 1)
    assert_replay_of(retry, first)
    assert_replay_of(after_lease, first)
    assert inner.calls == 1
    assert middleware.engine.counts[Event.STORE_ERROR] == 1
    assert middleware.engine.counts[Event.STORED] == 1


async def test_an_outcome_the_ledger_never_takes_leaves_the_key_to_the_lease(
    tmp_path: Path,
) -> None:
    """A ledger that refuses the outcome for a whole lease: the attempts stop, the key runs
    again after the lease (rule 21), and the late attempts never overwrite the new run."""
    url = sqlite_url(tmp_path, busy_timeout="0.05")
    inner = Counting()
    lock = sqlite3.connect(sqlite_path(url), isolation_level=None)

    async def locking_app(scope: Scope, receive: Receive, send: Send) -> None:
        """The first execution locks the ledger once its response starts."""
        first_call = inner.calls == 0

        async def send_locked(message: Message) -> None:
            if message["type"] == "http.response.start" and first_call:
                lock.execute("BEGIN EXCLUSIVE")
            await send(message)

        await inner(scope, receive, send_locked)

    try:
        async with serve(locking_app, url, lease=0.5) as (client, middleware):
            first = await client.post("/o", headers=key(), json={"a": 1})
            await asyncio.sleep(0.9)  # the lease and the attempts run out, the ledger locked
            lock.execute("ROLLBACK")
            again = await client.post("/o", headers=key(), json={"a": 1})
            replay = await client.post("/o", headers=key(), json={"a": 1})
    finally:
        lock.close()
    assert_original(first, 1)
    assert_original(again, 2)
    assert_replay_of(replay, again)
    assert middleware.engine.counts[Event.STORE_ERROR] == 2  # the first try, the last


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("response", b"\x00garbage\xff"),
        ("response", b"RS1" + b"\x00" * 40),
        ("response", "text, not a blob"),
        ("response", None),
        ("state", 7),
        ("state", "done"),
        ("expires_at", "garbage"),
        ("lease_until", "garbage"),
        ("fingerprint", "text, not a blob"),
    ],
)
async def test_corrupt_record_is_treated_as_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, value: object
) -> None:
    """A stored record that cannot be decoded is dropped: the request executes, never a 500."""
    caplog.set_level(logging.WARNING, logger="retrysafe")
    url = sqlite_url(tmp_path)
    app = Counting()
    async with serve(app, url) as (client, middleware):
        first = await client.post("/o", headers=key(), json={"a": 1})
        with contextlib.closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as db:
            changed = db.execute(f"UPDATE {TABLE} SET {column} = ?", (value,)).rowcount
        assert changed == 1
        second = await client.post("/o", headers=key(), json={"a": 1})
        third = await client.post("/o", headers=key(), json={"a": 1})
    assert_original(first, 1)
    assert_original(second, 2)
    assert_replay_of(third, second)
    assert middleware.engine.counts[Event.CORRUPT_RECORD] == 1
    assert any("corrupt-record" in record.getMessage() for record in caplog.records)


async def test_deeply_nested_json_body_is_no_500(store_url: str) -> None:
    """A JSON body too deep to canonicalise still gets an answer from the app, never a 500."""
    app = Counting()
    body = b"[" * 100_000 + b"]" * 100_000
    headers = key(content_type="application/json")
    async with serve(app, store_url, max_request_body=1 << 20) as (client, _):
        first = await client.post("/o", headers=headers, content=body)
        second = await client.post("/o", headers=headers, content=body)
    assert_original(first, 1)
    assert_replay_of(second, first)


# -- 24. problem responses ------------------------------------------------------------------------


async def test_problem_base_is_configurable(store_url: str) -> None:
    """problem_base prefixes every problem type URI, which still ends with the slug."""
    base = "https://docs.example.com/problems/"
    app = Counting(delay=0.3)
    routes = [Route("/required", require_key=True)]
    async with serve(app, store_url, problem_base=base, routes=routes, max_request_body=10) as (
        client,
        _,
    ):
        missing = await client.post("/required")
        malformed = await client.post("/o", headers=key("a, b"))
        too_large = await client.post("/o", headers=key(), content=b"x" * 11)
        original = asyncio.ensure_future(client.post("/o", headers=key(), content=b"1"))
        await asyncio.sleep(0.1)
        in_progress = await client.post("/o", headers=key(), content=b"1")
        await original
        reused = await client.post("/o", headers=key(), content=b"2")
    assert_problem(missing, "missing-key", 400, base)
    assert_problem(malformed, "malformed-key", 400, base)
    assert_problem(too_large, "body-too-large", 413, base)
    assert_problem(in_progress, "in-progress", 409, base)
    assert_problem(reused, "key-reused", 422, base)


async def test_problem_base_applies_to_store_unavailable(tmp_path: Path) -> None:
    """store-unavailable is a problem document under the configured base too."""
    base = "tag:example.com,2025:"
    async with serve(Counting(), unreachable_store(tmp_path), problem_base=base) as (client, _):
        response = await client.post("/o", headers=key())
    assert_problem(response, "store-unavailable", 503, base)


# -- hooks and logs -------------------------------------------------------------------------------


async def test_hooks_receive_decisions(store_url: str) -> None:
    """Every hook gets a Decision per event, carrying no key, with method, path and status."""
    decisions: list[Decision] = []
    app = Counting()
    async with serve(app, store_url, hooks=[decisions.append]) as (client, _):
        await client.post("/o", headers=key("hook-key-1"), json={"a": 1})
        await client.post("/o", headers=key("hook-key-1"), json={"a": 1})
        await client.post("/o", headers=key("hook-key-1"), json={"a": 2})
    events = [d.event for d in decisions]
    assert events == [Event.EXECUTED, Event.STORED, Event.REPLAYED, Event.KEY_REUSED]
    assert all(isinstance(d, Decision) for d in decisions)
    assert all(d.method == "POST" and d.path == "/o" for d in decisions)
    assert [d.status for d in decisions[1:]] == [200, 200, 422]
    assert len({d.record for d in decisions}) == 1
    assert all("hook-key-1" not in repr(d) for d in decisions)


async def test_a_raising_hook_does_not_break_the_request(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged; the request, the replay and the other hooks go on."""
    decisions: list[Decision] = []

    def broken(decision: Decision) -> None:
        raise ValueError("hook bug")

    app = Counting()
    async with serve(app, store_url, hooks=[broken, decisions.append]) as (client, _):
        first = await client.post("/o", headers=key())
        second = await client.post("/o", headers=key())
    assert_original(first, 1)
    assert_replay_of(second, first)
    assert [d.event for d in decisions] == [Event.EXECUTED, Event.STORED, Event.REPLAYED]
    assert any(record.exc_info for record in caplog.records)


async def test_logs_never_contain_the_key_or_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Debug logs of every kind of decision never show a raw key or an Authorization value."""
    caplog.set_level(logging.DEBUG, logger="retrysafe")
    secret_key = "raw-key-91c4e7a2"
    secret_auth = "Bearer token-3f9d0b6e"
    app = Counting(delay=0.2)
    for url in ("memory://", sqlite_url(tmp_path)):
        async with serve(app, url, max_request_body=50, max_response_body=10) as (client, _):
            headers = key(secret_key, authorization=secret_auth)
            original = asyncio.ensure_future(client.post("/o", headers=headers))
            await asyncio.sleep(0.05)
            await client.post("/o", headers=headers)  # in progress
            await original  # too large to keep
            await client.post("/o", headers=headers)  # replay unavailable
            await client.post("/o", headers=headers, content=b"other")  # key reused
            await client.post("/o", headers=headers, content=b"x" * 51)  # too large
            await client.post("/o", headers=key(secret_key + ",x", authorization=secret_auth))
            await client.post("/o", headers=key(secret_key + "\x01", authorization=secret_auth))
    async with serve(app, unreachable_store(tmp_path), fail_open=True) as (client, _):
        await client.post("/o", headers=key(secret_key, authorization=secret_auth))
    events = {record.getMessage().split()[0] for record in caplog.records}
    assert {"executed", "in-progress", "key-reused", "malformed-key", "fail-open"} <= events
    assert secret_key not in caplog.text
    assert "token-3f9d0b6e" not in caplog.text


# -- the ASGI face --------------------------------------------------------------------------------


async def test_app_receives_the_whole_body_then_disconnect(store_url: str) -> None:
    """The body read for the fingerprint reaches the app intact; later receive() disconnects."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            seen.append(message)
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        seen.append(await receive())

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"first,", b"", b"second,", bytes(range(256))):
            yield part

    expected = b"first,second," + bytes(range(256))
    async with serve(app, store_url) as (client, _):
        keyed = await client.post("/o", headers=key(), content=chunks())
        replay = await client.post("/o", headers=key(), content=chunks())
    assert keyed.content == expected
    assert_replay_of(replay, keyed)
    assert [m["type"] for m in seen[:-1]] == ["http.request"] * (len(seen) - 1)
    assert seen[-1] == {"type": "http.disconnect"}


async def test_client_gone_mid_stream_still_completes_the_record(store_url: str) -> None:
    """When the server's send raises (ASGI 2.4: client gone), the app finishes and is replayed."""
    app = Counting(chunks=[b"one,", b"two,", b"three"])
    middleware = IdempotencyMiddleware(app, store=store_url)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        if len(sent) == 2:
            raise OSError("the client went away")
        sent.append(message)

    scope = http_scope([(b"idempotency-key", b"gone-1")])
    await middleware(scope, receive, send)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        retry = await client.post("/o", headers=key("gone-1"), content=b"{}")
    await middleware.aclose()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert retry.headers[REPLAYED] == "true"
    assert retry.content == b"one,two,three"
    assert app.calls == 1


async def test_fastapi_add_middleware(store_url: str) -> None:
    """app.add_middleware(IdempotencyMiddleware, store=...) protects a FastAPI app."""

    app = FastAPI()
    created: list[Order] = []

    @app.post("/orders", status_code=201)
    async def create(order: Order) -> dict[str, Any]:
        created.append(order)
        return {"id": len(created), "item": order.item, "nonce": secrets.token_hex(8)}

    app.add_middleware(IdempotencyMiddleware, store=store_url)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = {"item": "book", "quantity": 2}
        first = await client.post("/orders", headers=key(), json=body)
        second = await client.post("/orders", headers=key(), json=body)
        reused = await client.post("/orders", headers=key(), json={**body, "quantity": 3})
        invalid = await client.post("/orders", headers=key("bad"), json={"item": "x"})
        invalid_again = await client.post("/orders", headers=key("bad"), json={"item": "x"})
    await _close_middleware(app)
    assert first.status_code == 201
    assert first.json()["item"] == "book"
    assert_replay_of(second, first)
    assert_problem(reused, "key-reused", 422)
    assert invalid.status_code == 422
    assert_replay_of(invalid_again, invalid)
    assert len(created) == 1


class Order(BaseModel):
    """The FastAPI test's request body."""

    item: str
    quantity: int


async def _close_middleware(app: Any) -> None:
    """Find the IdempotencyMiddleware Starlette built into ``app``'s stack and close it."""
    node = app.middleware_stack
    while node is not None:
        if isinstance(node, IdempotencyMiddleware):
            await node.aclose()
            return
        node = getattr(node, "app", None)
    raise AssertionError("IdempotencyMiddleware not found in the middleware stack")


# -- review fixes: configuration traps, routes, user callables, file sends, lifecycle ------------


@pytest.mark.parametrize(
    "option", ["methods", "scope_headers", "scope_cookies", "exclude_fields", "denied_headers"]
)
def test_a_string_where_names_are_expected_is_refused(option: str) -> None:
    """methods="POST" or scope_headers="x-api-key" is a ConfigError, never a set of letters."""
    options: dict[str, Any] = {option: "x-api-key"}
    with pytest.raises(ConfigError, match=option):
        IdempotencyMiddleware(Counting(), store="memory://", **options)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("wait", math.nan),
        ("wait", -1.0),
        ("lease", math.inf),
        ("lease", 1e300),
        ("lease", math.nan),
        ("lease", 0.0),
        ("ttl", math.nan),
        ("ttl", 0.0),
    ],
)
def test_times_that_would_break_the_contract_are_refused(option: str, value: float) -> None:
    """A NaN wait, an endless or absurd lease (a stuck key) or a NaN ttl is a ConfigError."""
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigError, match=option):
        IdempotencyMiddleware(Counting(), store="memory://", **options)


def test_a_response_limit_past_what_a_ledger_can_keep_is_refused() -> None:
    """max_response_body over 256 MiB is a ConfigError: its completion would fail after the run."""
    IdempotencyMiddleware(Counting(), store="memory://", max_response_body=256 << 20)
    with pytest.raises(ConfigError, match="max_response_body"):
        IdempotencyMiddleware(Counting(), store="memory://", max_response_body=(256 << 20) + 1)
    with pytest.raises(ConfigError, match="max_response_body"):
        IdempotencyMiddleware(
            Counting(), store="memory://", routes=[Route("/big", max_response_body=1 << 31)]
        )


@pytest.mark.parametrize(
    ("option", "value"),
    [("ttl", "5"), ("lease", None), ("wait", True), ("max_request_body", 1.5),
     ("max_response_body", "1")],
)  # fmt: skip
def test_an_option_of_the_wrong_type_is_a_config_error(option: str, value: object) -> None:
    """ttl="5" or max_request_body=1.5 is a ConfigError naming the option, not a TypeError."""
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigError, match=option):
        IdempotencyMiddleware(Counting(), store="memory://", **options)


@pytest.mark.parametrize(
    ("option", "value"),
    [("header", ["Idempotency-Key"]), ("header", ""), ("header", "Idempotency Key"),
     ("namespace", b"shop"), ("namespace", ""), ("problem_base", None)],
)  # fmt: skip
def test_a_bad_header_namespace_or_problem_base_is_a_config_error(
    option: str, value: object
) -> None:
    """header=["a"], a header name with a space or namespace=b"x" is a ConfigError at start."""
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigError, match=option):
        IdempotencyMiddleware(Counting(), store="memory://", **options)


def test_an_infinite_ttl_or_wait_is_allowed() -> None:
    """ttl=inf keeps outcomes for good and wait=inf waits out the original: both are valid."""
    IdempotencyMiddleware(Counting(), store="memory://", ttl=math.inf, wait=math.inf)


async def test_scope_headers_add_to_authorization(store_url: str) -> None:
    """Callers with one API-key header but different Authorization never share a record."""
    app = Counting()
    async with serve(app, store_url, scope_headers=["X-API-Key"]) as (client, _):
        alice = await client.post(
            "/o", headers=key(authorization="Bearer alice", x_api_key="shared"), json={}
        )
        bob = await client.post(
            "/o", headers=key(authorization="Bearer bob", x_api_key="shared"), json={}
        )
    assert_original(alice, 1)
    assert_original(bob, 2)


async def test_a_newline_in_the_path_does_not_escape_a_route() -> None:
    """A path with a newline (%0A) still falls under its route's policy (require_key)."""
    app = Counting()
    middleware = IdempotencyMiddleware(
        app, store="memory://", routes=[Route("/v1/**", require_key=True)]
    )
    status, _, body = await call_raw(middleware, "POST", "/v1/charges\n", [])
    assert status == 400
    assert json.loads(body)["type"].endswith("missing-key")
    assert app.calls == 0


async def test_a_newline_in_the_path_cannot_forge_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A decoded path holding CR/LF is logged on one line, its control characters escaped."""
    caplog.set_level(logging.DEBUG, logger="retrysafe")
    middleware = IdempotencyMiddleware(Counting(), store="memory://")
    path = "/orders\r\nWARNING forged entry"
    status, _, _ = await call_raw(middleware, "POST", path, [(b"idempotency-key", b"k1")])
    assert status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "retrysafe"]
    assert lines
    assert all("\n" not in line and "\r" not in line for line in lines)
    assert any("/orders\\r\\nWARNING forged entry" in line for line in lines)


async def test_scope_callable_may_return_a_user_id_number(store_url: str) -> None:
    """A scope callable returning an int (a user id) works and separates users."""

    def user(request: RequestView) -> int:
        return int(request.header(b"x-user") or 0)

    app = Counting()
    async with serve(app, store_url, scope=user) as (client, _):
        one = await client.post("/o", headers=key(x_user="1"), json={})
        two = await client.post("/o", headers=key(x_user="2"), json={})
        again = await client.post("/o", headers=key(x_user="1"), json={})
    assert_original(one, 1)
    assert_original(two, 2)
    assert_replay_of(again, one)


async def test_a_raising_store_status_releases_the_key(store_url: str) -> None:
    """If the store_status callable raises, the key is released: the retry runs, no stuck 409."""
    calls = 0

    def flaky(status: int) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("policy bug")
        return True

    app = Counting()
    async with serve(app, store_url, store_status=flaky) as (client, _):
        with pytest.raises(RuntimeError, match="policy bug"):
            await client.post("/o", headers=key(), json={})
        retry = await client.post("/o", headers=key(), json={})
    assert_original(retry, 2)


async def test_fail_open_never_applies_to_a_busy_store(tmp_path: Path) -> None:
    """With fail_open, a store that is up but busy still gets 503: contention never duplicates."""
    app = Counting()
    url = sqlite_url(tmp_path, busy_timeout="0.2")
    async with serve(app, url, fail_open=True) as (client, middleware):
        await client.post("/o", headers=key("warm"))
        other = sqlite3.connect(sqlite_path(url), isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            busy = await client.post("/o", headers=key("new"))
        finally:
            other.execute("ROLLBACK")
            other.close()
    assert_problem(busy, "store-unavailable", 503)
    assert app.calls == 1
    assert middleware.engine.counts[Event.FAIL_OPEN] == 0


async def test_file_sends_are_hidden_so_the_body_is_recorded(store_url: str) -> None:
    """An app that would use http.response.pathsend sends its body instead, and is replayed."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if "http.response.pathsend" in scope.get("extensions", {}):
            await send({"type": "http.response.pathsend", "path": "/etc/hostname"})
        else:
            await send({"type": "http.response.body", "body": b"file contents"})

    middleware = IdempotencyMiddleware(app, store=store_url)
    headers = [(b"idempotency-key", b"file-1")]
    extensions: dict[str, Any] = {"http.response.pathsend": {}}
    first = await call_raw(middleware, "POST", "/f", headers, extensions=extensions)
    second = await call_raw(middleware, "POST", "/f", headers, extensions=extensions)
    await middleware.aclose()
    assert first[2] == second[2] == b"file contents"
    assert (b"idempotent-replayed", b"true") in second[1]
    assert calls == 1


async def test_lifespan_shutdown_closes_the_ledger(tmp_path: Path) -> None:
    """When the app's lifespan shuts down, the middleware closes its ledger (no thread left)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        else:
            await Counting()(scope, receive, send)

    middleware = IdempotencyMiddleware(app, store=sqlite_url(tmp_path))
    await call_raw(middleware, "POST", "/o", [(b"idempotency-key", b"k")])
    assert any(t.name == "retrysafe-sqlite-checkpoint" for t in threading.enumerate())
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    for _ in range(100):  # bounded: the thread notices its stop flag within one interval
        if not any(t.name == "retrysafe-sqlite-checkpoint" for t in threading.enumerate()):
            break
        await asyncio.sleep(0.02)
    assert not any(t.name == "retrysafe-sqlite-checkpoint" for t in threading.enumerate())


def test_engine_and_options_together_are_refused() -> None:
    """IdempotencyMiddleware(engine=..., ttl=...) would silently ignore ttl: it is refused."""
    engine = Engine("memory://")
    with pytest.raises(ConfigError):
        IdempotencyMiddleware(Counting(), engine=engine, ttl=5)


async def test_numbers_a_float_cannot_hold_are_not_merged(store_url: str) -> None:
    """10.0000000000000001 and 10.0 are different amounts: same key, 422, not a replay."""
    app = Counting()
    headers = {**key(), "content-type": "application/json"}
    async with serve(app, store_url) as (client, _):
        first = await client.post("/o", headers=headers, content=b'{"amount": 10.0}')
        other = await client.post("/o", headers=headers, content=b'{"amount": 10.0000000000000001}')
    assert_original(first, 1)
    assert_problem(other, "key-reused", 422)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
async def test_numbers_a_float_cannot_hold_are_not_merged_in_utf16_or_32(encoding: str) -> None:
    """The same holds for a JSON body in UTF-16 or UTF-32: 10.0000000000000001 is not 10.0."""
    app = Counting()
    headers = {**key(), "content-type": "application/json"}
    async with serve(app, "memory://") as (client, _):
        first = await client.post(
            "/o", headers=headers, content='{"amount": 10.0}'.encode(encoding)
        )
        same = await client.post("/o", headers=headers, content='{"amount":10.0}'.encode(encoding))
        other = await client.post(
            "/o", headers=headers, content='{"amount": 10.0000000000000001}'.encode(encoding)
        )
    assert_original(first, 1)
    assert_replay_of(same, first)
    assert_problem(other, "key-reused", 422)


async def test_problem_details_name_the_configured_header(store_url: str) -> None:
    """With header="X-Request-Key", refusals speak of X-Request-Key."""
    app = Counting()
    async with serve(app, store_url, header="X-Request-Key", require_key=True) as (client, _):
        response = await client.post("/o", json={})
    assert "X-Request-Key" in assert_problem(response, "missing-key", 400)["detail"]


# -- found in review ------------------------------------------------------------------------------


async def test_headers_given_as_a_generator_reach_the_client_and_the_replay() -> None:
    """Response headers given as a one-shot iterable reach the client, and replay the same."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        pairs = [(b"content-type", b"text/plain"), (b"location", b"/orders/1")]
        headers = ((name, value) for name, value in pairs)  # ASGI allows any iterable
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"created"})

    async with serve(app, "memory://") as (client, _):
        first = await client.post("/o", headers=key(), content=b"x")
        replay = await client.post("/o", headers=key(), content=b"x")
    assert first.headers.get("location") == "/orders/1"
    assert_replay_of(replay, first)
    assert [(n.lower(), v) for n, v in replay.headers.raw][:-1] == [
        (n.lower(), v) for n, v in first.headers.raw
    ]
    assert calls == 1


async def test_a_path_with_a_lone_surrogate_is_no_500() -> None:
    """A decoded path holding a lone surrogate is fingerprinted and replayed, not a 500."""
    app = Counting()
    middleware = IdempotencyMiddleware(app, store="memory://")
    headers = [(b"idempotency-key", b"surrogate-1")]
    try:
        first = await call_raw(middleware, "POST", "/o\ud800", headers, b"{}")
        second = await call_raw(middleware, "POST", "/o\ud800", headers, b"{}")
    finally:
        await middleware.aclose()
    assert first[0] == 200
    assert (second[0], second[2]) == (first[0], first[2])
    assert (REPLAYED.encode(), b"true") in second[1]
    assert app.calls == 1


async def test_a_lone_surrogate_path_and_its_escaped_bytes_are_other_requests() -> None:
    """/o\\ud800 and the path whose escaped bytes spell its UTF-8 form do not share a record."""
    app = Counting()
    middleware = IdempotencyMiddleware(app, store="memory://")
    headers = [(b"idempotency-key", b"surrogate-2")]
    try:
        first = await call_raw(middleware, "POST", "/o\ud800", headers, b"{}")
        other = await call_raw(middleware, "POST", "/o\udced\udca0\udc80", headers, b"{}")
    finally:
        await middleware.aclose()
    assert first[0] == 200
    assert other[0] == 422
    assert json.loads(other[2])["type"].endswith("key-reused")
    assert app.calls == 1


@pytest.mark.parametrize(
    ("status", "headers", "chunks"),
    [
        (201, [("content-type", "text/plain")], [b"created"]),  # str headers (h11 takes them)
        (204, [], [b"x", b""]),  # a body streamed on a 204: the server refuses it
    ],
    ids=["str-headers", "204-with-body"],
)
async def test_a_response_that_cannot_be_kept_whole_is_not_run_again(
    status: int, headers: list[tuple[Any, Any]], chunks: list[bytes]
) -> None:
    """A final answer the layer cannot record as it was sent is kept as not replayable:
    the retry gets 410 replay-unavailable and the handler ran once."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    middleware = IdempotencyMiddleware(app, store="memory://")
    key_header = [(b"idempotency-key", b"unkeepable")]
    try:
        first = await call_raw(middleware, "POST", "/o", key_header, b"{}")
        retry = await call_raw(middleware, "POST", "/o", key_header, b"{}")
    finally:
        await middleware.aclose()
    assert first[0] == status
    assert retry[0] == 410
    assert json.loads(retry[2])["type"].endswith("replay-unavailable")
    assert calls == 1


async def test_an_exception_after_a_disconnect_still_releases_the_key() -> None:
    """A handler that heard of a disconnect and then failed on its own (a rollback) has its
    key released, as rule 14 says: the client's retry runs it again."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        if calls == 1:
            assert (await receive())["type"] == "http.disconnect"
            raise RuntimeError("the commit failed; rolled back")
        await send({"type": "http.response.body", "body": b" two"})

    middleware = IdempotencyMiddleware(app, store="memory://", lease=0.2)
    headers = [(b"idempotency-key", b"rolled-back")]
    try:
        with pytest.raises(RuntimeError):
            await call_raw(middleware, "POST", "/o", headers, b"{}")
        retry = await call_raw(middleware, "POST", "/o", headers, b"{}")
    finally:
        await middleware.aclose()
    assert (retry[0], retry[2]) == (200, b"part two")
    assert calls == 2


async def test_a_stream_stopped_by_the_layer_is_kept_whatever_the_app_raises() -> None:
    """On a server that raises from send once the client is gone, the layer lets the stream run
    one lease and then stops it; the app turning that into an error of its own does not free
    the key: the retry gets 410 and the handler ran once."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:  # an endless stream
                await send({"type": "http.response.body", "body": b"tick", "more_body": True})
                await asyncio.sleep(0.01)
        except OSError as exc:
            raise RuntimeError("client disconnected") from exc  # as Starlette does

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and sent:
            raise OSError("the client is gone")  # ASGI 2.4: send raises once the client left
        sent.append(message)

    middleware = IdempotencyMiddleware(app, store="memory://", lease=0.2)
    scope = http_scope([(b"idempotency-key", b"endless")], client=None, server=None)
    try:
        with pytest.raises(RuntimeError):
            await middleware(scope, receive, send)
        retry = await call_raw(middleware, "POST", "/o", [(b"idempotency-key", b"endless")], b"{}")
    finally:
        await middleware.aclose()
    assert retry[0] == 410
    assert calls == 1


async def test_a_response_that_cannot_be_encoded_never_leaves_its_key_busy() -> None:
    """A final answer with more headers than a record can hold is kept as not replayable at
    once: the retry gets 410, not a 409 for as long as the process lives."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        headers = [(b"x-h", b"1")] * 70_000
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"a"})

    middleware = IdempotencyMiddleware(app, store="memory://", lease=0.2)
    key_header = [(b"idempotency-key", b"many-headers")]
    try:
        await call_raw(middleware, "POST", "/o", key_header, b"{}")
        await asyncio.sleep(0.5)  # past two leases: a claim left running would still be renewed
        retry = await call_raw(middleware, "POST", "/o", key_header, b"{}")
    finally:
        await middleware.aclose()
    assert retry[0] == 410
    assert calls == 1


async def test_a_reused_body_buffer_is_replayed_as_sent() -> None:
    """Chunks sent from one reused bytearray are stored as they were sent, not as it ends."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        buffer = bytearray(4)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"aaaa", b"bbbb", b"cccc"):
            buffer[:] = part  # a server copies each chunk as it writes it (uvicorn does)
            await send({"type": "http.response.body", "body": buffer, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = IdempotencyMiddleware(app, store="memory://")

    async def post() -> tuple[Headers, bytes]:
        scope = http_scope([(b"idempotency-key", b"buffer-1")])
        received: list[bytes] = []
        start: list[Headers] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.append(list(message["headers"]))
            else:
                received.append(bytes(message.get("body", b"")))  # written out now

        await middleware(scope, receive, send)
        return start[0], b"".join(received)

    try:
        _, first = await post()
        replay_headers, replay = await post()
    finally:
        await middleware.aclose()
    assert first == b"aaaabbbbcccc"
    assert (REPLAYED.encode(), b"true") in replay_headers
    assert replay == first
    assert calls == 1


# -- composition: nested layers, mounted apps, failing policy functions ---------------------------


async def test_a_layer_inside_a_layer_of_the_same_namespace_passes_through() -> None:
    """Two middlewares of one namespace around one app (a sub-app and its parent): the outer
    claims, the inner passes through, so the handler runs once instead of 409 forever."""
    app = Counting()
    engine = Engine("memory://")
    outer = IdempotencyMiddleware(IdempotencyMiddleware(app, engine=engine), engine=engine)
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.post("/o", headers=key())
        retry = await client.post("/o", headers=key())
    await engine.aclose()
    assert_original(first, 1)
    assert_replay_of(retry, first)
    assert app.calls == 1


async def test_routes_match_the_path_below_the_root_path() -> None:
    """Under a root_path (uvicorn --root-path, a Starlette Mount) a Route names the path the
    app routes on, as Starlette does: its require_key still applies."""
    app = Counting()
    middleware = IdempotencyMiddleware(
        app, store="memory://", routes=[Route("/charges", require_key=True)]
    )
    transport = httpx.ASGITransport(app=middleware, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.post("/api/charges")
        other = await client.post("/api/other")
    await middleware.aclose()
    assert_problem(refused, "missing-key", 400)
    assert other.status_code == 200
    assert app.calls == 1


@pytest.mark.parametrize("which", ["scope", "fingerprint"])
async def test_a_failing_scope_or_fingerprint_function_is_a_400_problem(
    which: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A scope or fingerprint function that raises on a request gets a 400 malformed-request
    problem (never a 500), nothing runs, and the log names only the exception's type."""
    app = Counting()

    def failing(request: RequestView) -> bytes:
        raise ValueError("bad token sk_live_123")

    caplog.set_level(logging.WARNING, logger="retrysafe")
    async with serve(app, "memory://", **{which: failing}) as (client, middleware):
        response = await client.post("/o", headers=key(authorization="Bearer sk_live_123"))
    assert_problem(response, "malformed-request", 400)
    assert app.calls == 0
    assert middleware.engine.counts[Event.IDENTITY_FAILED] == 1
    assert "ValueError" in caplog.text
    assert "sk_live" not in caplog.text


async def test_what_the_app_writes_into_the_scope_reaches_middleware_outside() -> None:
    """Starlette's router writes its match (path_params, endpoint) into the scope it got:
    middleware outside the layer still reads it for keyed requests (metrics by route), and
    the layer's own marker is gone again."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route as StarletteRoute

    async def charge(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", status_code=201)

    app = Starlette(routes=[StarletteRoute("/c/{cid}", charge, methods=["POST"])])
    layer = IdempotencyMiddleware(app, store="memory://")
    seen: list[tuple[object, bool]] = []

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        await layer(scope, receive, send)
        if scope["type"] == "http":
            seen.append((scope.get("path_params"), "retrysafe.claimed" in scope))

    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/c/7", headers=key())).status_code == 201
    await layer.aclose()
    assert seen == [({"cid": "7"}, False)]


async def test_file_sends_are_hidden_from_the_app_only_while_it_runs() -> None:
    """A server offering http.response.pathsend: the app under a key does not see it (its
    file must pass through the layer to be recorded), and the server's own extensions are
    left untouched."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route as StarletteRoute

    offered: list[bool] = []

    async def charge(request: Request) -> PlainTextResponse:
        offered.append("http.response.pathsend" in request.scope.get("extensions", {}))
        return PlainTextResponse("ok", status_code=201)

    app = Starlette(routes=[StarletteRoute("/c/{cid}", charge, methods=["POST"])])
    layer = IdempotencyMiddleware(app, store="memory://")
    extensions: dict[str, Any] = {"http.response.pathsend": {}, "other": {}}
    status, _, _ = await call_raw(
        layer, "POST", "/c/9", [(b"idempotency-key", b"k")], extensions=extensions
    )
    await layer.aclose()
    assert status == 201
    assert offered == [False]
    assert extensions == {"http.response.pathsend": {}, "other": {}}


async def test_an_abort_after_a_takeover_reports_the_lost_lease_not_a_release() -> None:
    """A handler that failed after its lease ran out and a retry took the key over releases
    nothing (the new holder's claim stands) and says so: lease-lost, not released."""
    events: list[Decision] = []
    engine = Engine("memory://", lease=0.2, hooks=[events.append])
    request = RequestView("POST", "/o", b"", [], b"{}")
    first = await engine.begin(request, "k", engine.policy)
    assert not isinstance(first, Problem | Replay)
    engine.unwatch(first)  # its heartbeat stops, as when its process stalls
    await asyncio.sleep(0.4)
    second = await engine.begin(request, "k", engine.policy)
    assert not isinstance(second, Problem | Replay)
    await first.abort("the handler raised an exception")
    assert events[-1].event is Event.LEASE_LOST
    duplicate = await engine.begin(request, "k", engine.policy)
    assert isinstance(duplicate, Problem)  # the second holder's claim still stands
    await second.abort()
    await engine.aclose()


async def test_a_json_number_no_decimal_can_hold_is_executed_not_refused() -> None:
    """A JSON number whose exponent a Decimal cannot hold (1e-99999999999999999999999) is
    fingerprinted as raw bytes and executed once, not refused as a failing fingerprint."""
    app = Counting()
    headers = {**key(), "content-type": "application/json"}
    body = b'{"amount": 1e-99999999999999999999999}'
    async with serve(app, "memory://") as (client, middleware):
        first = await client.post("/o", headers=headers, content=body)
        second = await client.post("/o", headers=headers, content=body)
    assert_original(first, 1)
    assert_replay_of(second, first)
    assert Event.IDENTITY_FAILED not in middleware.engine.counts


async def test_a_content_length_too_long_for_an_int_is_413_not_a_crash() -> None:
    """A request Content-Length of thousands of digits (past Python's int-conversion limit)
    is a 413 problem, never an exception out of the layer (a 500)."""
    app = Counting()
    layer = IdempotencyMiddleware(app, store="memory://")
    headers = [(b"idempotency-key", b"k"), (b"content-length", b"9" * 5000)]
    status, response_headers, body = await call_raw(layer, "POST", "/o", headers, b"x")
    await layer.aclose()
    assert status == 413
    assert (b"content-type", b"application/problem+json") in response_headers
    assert json.loads(body)["type"].endswith("body-too-large")
    assert app.calls == 0


async def test_a_request_cancelled_while_its_claim_is_written_leaves_no_busy_key() -> None:
    """A request cancelled (a timeout middleware, a shutdown) while the ledger writes its
    claim gives the claim back: a retry executes at once instead of a 409 for a lease."""
    from retrysafe.stores.memory import MemoryStore

    landed = asyncio.Event()

    class SlowAnswer(MemoryStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            record = await super().claim(*args, **kwargs)  # written in the ledger ...
            landed.set()
            await asyncio.sleep(3600)  # ... but its answer is slow to come back
            return record

    store = SlowAnswer()
    app = Counting()
    layer = IdempotencyMiddleware(app, store=store, lease=60)
    request = asyncio.ensure_future(call_raw(layer, "POST", "/o", [(b"idempotency-key", b"k")]))
    await landed.wait()
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    for _ in range(10):
        await asyncio.sleep(0)
    assert list(store._records) == []  # the orphan claim is gone
    await layer.aclose()


async def test_a_response_with_trailers_is_not_replayed_without_them() -> None:
    """A response that announces trailers (ASGI http.response.trailers: a checksum, a gRPC
    status) cannot be kept whole, as the record holds no trailers: its retry gets 410
    replay-unavailable, never a replay missing them, and the handler runs once."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"payload"})
        trailers = [(b"grpc-status", b"13")]
        await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})

    layer = IdempotencyMiddleware(app, store="memory://")
    headers = [(b"idempotency-key", b"k")]
    first = await call_raw(layer, "POST", "/o", headers)
    retry = await call_raw(layer, "POST", "/o", headers)
    await layer.aclose()
    assert first[0] == 200
    assert retry[0] == 410
    assert json.loads(retry[2])["type"].endswith("replay-unavailable")
    assert calls == 1


async def test_a_stream_that_polls_for_the_disconnect_hears_of_it_after_one_lease() -> None:
    """An endless stream that polls ``request.is_disconnected()`` (a receive in a cancelled
    scope, as Starlette does) hears of its client's departure one lease after it, as the
    docs promise: each poll must not start a fresh hold, or the stream never ends, its lease
    is renewed forever and every retry gets 409 for good. Its retry then gets 410."""
    from starlette.requests import Request

    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        request = Request(scope, receive)
        await request.body()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not await request.is_disconnected():
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.02)

    layer = IdempotencyMiddleware(app, store="memory://", lease=0.3)
    gone = asyncio.Event()
    read = False

    async def receive() -> Message:  # as uvicorn: a disconnect on every call once it left
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not gone.is_set():
            gone.set()  # the client leaves after the first chunk; later sends are dropped

    scope = http_scope([(b"idempotency-key", b"k")], spec="2.3")
    try:
        await asyncio.wait_for(layer(scope, receive, send), 5)
        retry = await call_raw(layer, "POST", "/o", [(b"idempotency-key", b"k")])
    finally:
        await layer.aclose()
    assert retry[0] == 410
    assert calls == 1


async def test_a_renewal_the_ledger_refused_is_made_again_before_the_lease_ends() -> None:
    """Renewals failing for a while (a ledger blip) are tried again soon, not a third of a
    lease later each: the lease is renewed long before it ends, and the handler keeps its key
    (a duplicate meanwhile gets 409); the outage is reported once."""
    from retrysafe import StoreUnavailable
    from retrysafe.stores.memory import MemoryStore

    lease = 3.0
    renewed = asyncio.Event()
    attempts: list[float] = []

    class Blip(MemoryStore):
        async def renew(self, rid: bytes, token: int, lease: float) -> bool:
            attempts.append(asyncio.get_running_loop().time())
            if len(attempts) <= 3:
                raise StoreUnavailable("a blip")
            held = await super().renew(rid, token, lease)
            renewed.set()
            return held

    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await gate.wait()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"once"})

    errors: list[Decision] = []
    layer = IdempotencyMiddleware(
        app, store=Blip(), lease=lease,
        hooks=[lambda d: errors.append(d) if d.event is Event.STORE_ERROR else None],
    )  # fmt: skip
    headers = [(b"idempotency-key", b"blip")]
    started = asyncio.get_running_loop().time()
    first = asyncio.ensure_future(call_raw(layer, "POST", "/o", headers))
    await renewed.wait()
    duplicate = await call_raw(layer, "POST", "/o", headers)
    gate.set()
    status, _, body = await first
    await layer.aclose()
    assert attempts[-1] - started < lease * 0.8  # renewed well before the claim's lease ended
    assert duplicate[0] == 409
    assert (status, body) == (201, b"once")
    assert len(errors) == 1


async def test_a_layer_closed_once_still_renews_after_a_refused_renewal() -> None:
    """After one close (a lifespan cycle, a test client used twice) a refused renewal is still
    tried again: the handler keeps its key and a duplicate gets 409, not a second run."""
    from retrysafe import StoreUnavailable
    from retrysafe.engine import current_claim
    from retrysafe.stores.memory import MemoryStore

    lease = 1.5
    failures = 0
    renewed = asyncio.Event()

    class Blip(MemoryStore):
        async def renew(self, rid: bytes, token: int, lease: float) -> bool:
            nonlocal failures
            if rid == blip_rid[0] and failures < 2:
                failures += 1
                raise StoreUnavailable("a blip")
            held = await super().renew(rid, token, lease)
            renewed.set()
            return held

    blip_rid: list[bytes | None] = [None]
    gate = asyncio.Event()
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        claim = current_claim()
        assert claim is not None
        blip_rid[0] = claim.rid
        if scope["path"] == "/slow":
            await gate.wait()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"once"})

    layer = IdempotencyMiddleware(app, store=Blip(), lease=lease)
    await call_raw(layer, "POST", "/warm", [(b"idempotency-key", b"warm")])
    await layer.aclose()  # the first lifespan ends; the layer serves the next one
    headers = [(b"idempotency-key", b"blip")]
    first = asyncio.ensure_future(call_raw(layer, "POST", "/slow", headers))
    try:
        await asyncio.wait_for(renewed.wait(), lease * 1.5)
        duplicate = await call_raw(layer, "POST", "/slow", headers)
    finally:
        gate.set()
        await first
        await layer.aclose()
    assert failures == 2
    assert duplicate[0] == 409
    assert calls == 2  # /warm and /slow, once each


async def test_a_claim_the_ledger_did_not_answer_is_given_back() -> None:
    """A claim that landed although the ledger's answer never came (a timeout): the request
    gets 503, and the orphan claim is released (tried again while the ledger still fails)
    instead of answering 409 for a lease with nothing running."""
    from retrysafe import StoreUnavailable
    from retrysafe.stores.memory import MemoryStore

    releases: list[bool] = []

    class Unanswered(MemoryStore):
        claims = 0

        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            record = await super().claim(*args, **kwargs)  # written in the ledger ...
            Unanswered.claims += 1
            if Unanswered.claims == 1:
                raise StoreUnavailable("no answer within 2 s")  # ... the answer lost
            return record

        async def release(self, rid: bytes, token: int) -> bool:
            if len(releases) < 2:
                releases.append(False)
                raise StoreUnavailable("still down")
            releases.append(True)
            return await super().release(rid, token)

    app = Counting()
    layer = IdempotencyMiddleware(app, store=Unanswered(), lease=60)
    headers = [(b"idempotency-key", b"orphan")]
    first = await call_raw(layer, "POST", "/o", headers, b"{}")
    for _ in range(200):  # the give-back retries with backoff; 409 meanwhile
        retry = await call_raw(layer, "POST", "/o", headers, b"{}")
        if retry[0] != 409:
            break
        await asyncio.sleep(0.01)
    await layer.aclose()
    assert first[0] == 503
    assert retry[0] == 200
    assert app.calls == 1
    assert releases == [False, False, True]


async def test_only_one_renewal_of_a_claim_is_in_flight() -> None:
    """A renewal hanging on a slow ledger gets no twin from the next heartbeats: one renewal
    per execution at a time."""
    from retrysafe.stores.memory import MemoryStore

    in_flight = most = 0

    class Slow(MemoryStore):
        async def renew(self, rid: bytes, token: int, lease: float) -> bool:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.5)  # longer than the heartbeat's 0.2 s
                return await super().renew(rid, token, lease)
            finally:
                in_flight -= 1

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await asyncio.sleep(1.2)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"slow"})

    layer = IdempotencyMiddleware(app, store=Slow(), lease=0.6)
    status, _, _ = await call_raw(layer, "POST", "/o", [(b"idempotency-key", b"slow")])
    await layer.aclose()
    assert status == 201
    assert most == 1


class _LostAnswers:
    """A memory ledger whose claims land but whose answers are lost while ``down``; its
    releases fail for the records in ``stuck`` (their shard down) and take ``slow`` seconds."""

    @staticmethod
    def make() -> Any:
        from retrysafe import StoreUnavailable
        from retrysafe.stores.memory import MemoryStore

        class Store(MemoryStore):
            down = True
            hang = False
            slow = 0.0
            stuck: frozenset[bytes] = frozenset()

            async def claim(self, rid: bytes, *args: Any, **kwargs: Any) -> Any:
                record = await super().claim(rid, *args, **kwargs)
                if self.down:
                    raise StoreUnavailable("no answer")
                if self.hang:
                    await asyncio.sleep(10)  # landed; the answer never comes
                return record

            async def release(self, rid: bytes, token: int) -> bool:
                await asyncio.sleep(self.slow)
                if self.down or rid in self.stuck:
                    raise StoreUnavailable("down")
                return await super().release(rid, token)

        return Store()


async def test_an_orphan_whose_release_keeps_failing_does_not_hold_back_the_others() -> None:
    """An orphan claim whose release keeps failing (its shard down) leaves the other orphan
    claims to be given back: their keys do not answer 409 for a whole lease."""
    store = _LostAnswers.make()
    layer = IdempotencyMiddleware(Counting(), store=store, lease=30)
    assert (await call_raw(layer, "POST", "/o", [(b"idempotency-key", b"a")], b"{}"))[0] == 503
    store.stuck = frozenset(store._records)  # a's shard stays down
    headers = [(b"idempotency-key", b"b")]
    assert (await call_raw(layer, "POST", "/o", headers, b"{}"))[0] == 503
    store.down = False
    for _ in range(100):
        retry = await call_raw(layer, "POST", "/o", headers, b"{}")
        if retry[0] != 409:
            break
        await asyncio.sleep(0.02)
    await layer.aclose()
    assert retry[0] == 200


async def test_orphans_are_given_back_after_a_loop_closed_with_the_task_pending() -> None:
    """An engine whose orphan task was left pending on a closed loop (never cancelled) gives
    orphan claims back on its next loop, and closes there."""
    store = _LostAnswers.make()
    layer = IdempotencyMiddleware(Counting(), store=store, lease=30)

    def first_loop() -> int:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(
                call_raw(layer, "POST", "/o", [(b"idempotency-key", b"a")], b"{}")
            )[0]
        finally:
            loop.close()  # the orphan task, retrying, is left pending on it

    assert await asyncio.to_thread(first_loop) == 503
    headers = [(b"idempotency-key", b"b")]
    assert (await call_raw(layer, "POST", "/o", headers, b"{}"))[0] == 503
    store.down = False
    for _ in range(100):
        retry = await call_raw(layer, "POST", "/o", headers, b"{}")
        if retry[0] != 409:
            break
        await asyncio.sleep(0.02)
    await asyncio.wait_for(layer.aclose(), 5)
    assert retry[0] == 200


async def test_a_claim_cancelled_while_the_layer_closes_is_given_back() -> None:
    """A claim cancelled while aclose() waits for the orphan task's round (a slow ledger) is
    given back too, not dropped unattempted: its key is free after the restart."""
    store = _LostAnswers.make()
    store.slow = 0.3
    layer = IdempotencyMiddleware(Counting(), store=store, lease=30)
    assert (await call_raw(layer, "POST", "/o", [(b"idempotency-key", b"a")], b"{}"))[0] == 503
    store.down, store.hang = False, True
    headers = [(b"idempotency-key", b"b")]
    cancelled = asyncio.ensure_future(call_raw(layer, "POST", "/o", headers, b"{}"))
    await asyncio.sleep(0.05)  # b's claim landed; a's release is under way
    closing = asyncio.ensure_future(layer.aclose())
    await asyncio.sleep(0)
    cancelled.cancel()  # the server's shutdown
    await asyncio.gather(cancelled, return_exceptions=True)
    await closing
    store.hang, store.slow = False, 0.0
    retry = await call_raw(layer, "POST", "/o", headers, b"{}")
    await layer.aclose()
    assert retry[0] == 200


async def test_a_claim_is_given_back_however_long_the_ledger_stays_down() -> None:
    """The give-back of an unanswered claim goes on while the ledger keeps failing, past the
    claim's own lease (the claim may land only when the ledger answers again)."""
    from retrysafe import StoreUnavailable
    from retrysafe.stores.memory import MemoryStore

    down_until = 0.0
    released = asyncio.Event()

    class Down(MemoryStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal down_until
            down_until = asyncio.get_running_loop().time() + 0.8  # four leases
            raise StoreUnavailable("no answer within 2 s")

        async def release(self, rid: bytes, token: int) -> bool:
            if asyncio.get_running_loop().time() < down_until:
                raise StoreUnavailable("still down")
            released.set()
            return await super().release(rid, token)

    layer = IdempotencyMiddleware(Counting(), store=Down(), lease=0.2)
    first = await call_raw(layer, "POST", "/o", [(b"idempotency-key", b"down")], b"{}")
    await asyncio.wait_for(released.wait(), 5)
    await layer.aclose()
    assert first[0] == 503
