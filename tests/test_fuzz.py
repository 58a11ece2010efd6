"""Property tests: the key parser on arbitrary bytes, the middleware on arbitrary request shapes."""

from __future__ import annotations

import asyncio
import json
import string
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from servers import Message, Scope

from retrysafe import IdempotencyMiddleware, MemoryStore, SQLiteStore, Store
from retrysafe.keys import MAX_KEY_LENGTH, MalformedKey, find_key, parse_key

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
KEY_NAME = b"idempotency-key"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def is_valid_key(key: object) -> bool:
    return (
        isinstance(key, str)
        and 1 <= len(key) <= MAX_KEY_LENGTH
        and all(" " <= ch <= "~" for ch in key)
    )


def quote(key: str) -> bytes:
    """The RFC 9651 sf-string form of ``key``."""
    return b'"' + key.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


# Header values that look like keys: mostly printable, with quotes, escapes, commas, controls.
key_like = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=PRINTABLE + '"\\,;\t\x00\x7f\xe9', max_size=40).map(
        lambda s: s.encode("latin-1")
    ),
    st.text(alphabet=PRINTABLE, min_size=1, max_size=260).map(quote),
)


# -- the parser -----------------------------------------------------------------------------


@FUZZ
@given(key_like)
def test_parse_key_returns_valid_key_or_malformed(raw: bytes) -> None:
    """parse_key on any bytes returns a 1-255 char printable ASCII key or raises MalformedKey."""
    try:
        key = parse_key(raw)
    except MalformedKey:
        return
    assert is_valid_key(key), key


@FUZZ
@given(st.text(alphabet=PRINTABLE, min_size=1, max_size=MAX_KEY_LENGTH))
def test_quoted_and_bare_forms_agree(key: str) -> None:
    """A key sent quoted parses to itself; sent bare (where it can be) it parses the same."""
    assert parse_key(quote(key)) == key
    bare_possible = "," not in key and not key.startswith('"') and key.strip(" \t") == key
    if bare_possible:
        assert parse_key(key.encode()) == key
        assert parse_key(b" " + key.encode() + b"\t") == key


@FUZZ
@given(st.text(alphabet=PRINTABLE, min_size=MAX_KEY_LENGTH + 1, max_size=MAX_KEY_LENGTH + 40))
def test_too_long_key_is_malformed_in_both_forms(key: str) -> None:
    """A key longer than 255 characters is refused, quoted or bare."""
    with pytest.raises(MalformedKey):
        parse_key(quote(key))
    if "," not in key and not key.startswith('"') and key.strip(" \t"):
        with pytest.raises(MalformedKey):
            parse_key(key.encode())


header_name = st.one_of(
    st.sampled_from(
        [b"idempotency-key", b"Idempotency-Key", b"IDEMPOTENCY-KEY", b"idempotency_key"]
    ),
    st.binary(min_size=1, max_size=20),
)


@FUZZ
@given(st.lists(st.tuples(header_name, key_like), max_size=5))
def test_find_key_on_header_lists(headers: list[tuple[bytes, bytes]]) -> None:
    """find_key: None without the header, MalformedKey when repeated, else parse_key's answer."""
    matching = [value for name, value in headers if name.lower() == KEY_NAME]
    try:
        key = find_key(headers, KEY_NAME)
    except MalformedKey:
        if len(matching) == 1:
            with pytest.raises(MalformedKey):
                parse_key(matching[0])
        else:
            assert len(matching) > 1
        return
    if not matching:
        assert key is None
    else:
        assert len(matching) == 1
        assert key == parse_key(matching[0])
        assert is_valid_key(key)


# -- the middleware on raw ASGI requests ----------------------------------------------------


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[bytes]
    """What the client sends: ``body`` cut into pieces, or a prefix of them if truncated."""
    truncated: bool
    """The body stops short and the client disconnects."""


ODD_KEYS = [
    b"k1", b'"k1"', b' k1 ', b"k2", b'"k2"', b"", b"  ", b"a,b", b'"a", "b"', b'"k1";p=1',
    b"\xe9t\xe9", b"x" * 256, b"y" * 70_000, b'"open', b'"bad\\q"', b"ok\x00", b"tab\tin",
]  # fmt: skip
GOOD_KEYS = [b"k1", b'"k1"', b" k1 ", b"k2", b'"k2"', b"K1", b'"a\\"b"']

key_headers = st.one_of(
    # mostly one well-formed key from a small pool, so that requests share keys
    st.tuples(st.just(b"idempotency-key"), st.sampled_from(GOOD_KEYS)).map(lambda h: [h]),
    st.tuples(header_name, st.sampled_from(GOOD_KEYS)).map(lambda h: [h]),
    st.lists(st.tuples(header_name, st.sampled_from(ODD_KEYS) | key_like), max_size=3),
)


def cut(draw: st.DrawFn, body: bytes, truncated: bool) -> list[bytes]:
    """``body`` in random pieces; a strict prefix of them if ``truncated``."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    if truncated:
        chunks = chunks[: draw(st.integers(0, len(chunks) - 1))]
    return chunks


@st.composite
def fuzz_requests(draw: st.DrawFn) -> FuzzRequest:
    method = draw(
        st.one_of(
            st.sampled_from(["POST", "PATCH"]),
            st.sampled_from(["POST", "PATCH", "GET", "PUT", "DELETE", "post", "OPTIONS"]),
            st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=8),
        )
    )
    path = draw(
        st.one_of(st.sampled_from(["/", "/a", "/a/b"]), st.text(max_size=20).map("/".__add__))
    )
    query = draw(st.sampled_from([b"", b"x=1", b"x=2"]) | st.binary(max_size=10))
    headers: list[tuple[bytes, bytes]] = list(draw(key_headers))
    auth = draw(st.sampled_from([None, b"Bearer alice", b"Bearer bob"]))
    if auth is not None:
        headers.append((b"authorization", auth))
    content_type = draw(st.sampled_from([None, b"application/json", b"text/plain", b"x+json"]))
    if content_type is not None:
        headers.append((b"content-type", content_type))
    body = draw(
        st.sampled_from([b"", b'{"a":1,"b":2}', b'{"b": 2, "a": 1}', b"not json", b"[1,2]"])
        | st.binary(max_size=300)
    )
    length = draw(st.sampled_from([None, "right", b"abc", b"-1", b"99999999999", b" 3 "]))
    if length == "right":
        headers.append((b"content-length", str(len(body)).encode()))
    elif isinstance(length, bytes):
        headers.append((b"content-length", length))
    if draw(st.booleans()):
        headers.append((b"x-huge", b"h" * draw(st.sampled_from([10, 9_000, 100_000]))))
    headers = draw(st.permutations(headers))
    truncated = draw(st.sampled_from([False, False, True]))
    return FuzzRequest(method, path, query, headers, body, cut(draw, body, truncated), truncated)


def with_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[Any]:
    return [(n, value if n.lower() == name else v) for n, v in headers]


@st.composite
def batches(draw: st.DrawFn) -> list[FuzzRequest]:
    """A few requests plus variants of them: exact duplicates, the key re-quoted, the body
    re-chunked, cut short or changed, other credentials; in any order."""
    base = draw(st.lists(fuzz_requests(), min_size=1, max_size=4))
    out = list(base)
    for index, how in draw(
        st.lists(
            st.tuples(
                st.integers(0, len(base) - 1),
                st.sampled_from(["same", "rechunk", "quote", "body", "cut", "auth"]),
            ),
            max_size=5,
        )
    ):
        r = base[index]
        if how == "rechunk":
            r = replace(r, chunks=cut(draw, r.body, False), truncated=False)
        elif how == "cut":
            r = replace(r, chunks=cut(draw, r.body, True), truncated=True)
        elif how == "body":
            body = r.body + b"!"
            headers = with_header(r.headers, b"content-length", str(len(body)).encode())
            r = replace(r, headers=headers, body=body, chunks=[body], truncated=False)
        elif how == "quote":
            value = next((v for n, v in r.headers if n.lower() == KEY_NAME), None)
            try:
                key = parse_key(value) if value is not None else None
            except MalformedKey:
                key = None
            if key is not None:
                r = replace(r, headers=with_header(r.headers, KEY_NAME, quote(key)))
        elif how == "auth":
            others = [(n, v) for n, v in r.headers if n != b"authorization"]
            r = replace(r, headers=[*others, (b"authorization", b"Bearer carol")])
        out.append(r)
    return draw(st.permutations(out))


class InnerApp:
    """Never fails: reads the body, answers 201 with a body unique to the execution."""

    def __init__(self) -> None:
        self.executions: dict[int, bytes] = {}
        """Request number -> the response body of its execution (complete bodies only)."""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left; nobody to answer
            if not message.get("more_body", False):
                break
        await asyncio.sleep(0)  # let concurrent duplicates interleave
        body = json.dumps({"request": scope["test_request"], "run": uuid.uuid4().hex}).encode()
        self.executions[scope["test_request"]] = body
        await asyncio.sleep(0)
        headers = [(b"content-type", b"application/json"), (b"set-cookie", b"s=1")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:], "more_body": False})


async def drive(
    layer: IdempotencyMiddleware, number: int, request: FuzzRequest
) -> tuple[list[Message], BaseException | None]:
    """Send one request through ``layer``; return the messages it sent and what it raised."""
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in request.chunks
    ]
    if not request.truncated:
        if messages:
            messages[-1]["more_body"] = False
        else:
            messages.append({"type": "http.request", "body": b"", "more_body": False})
    incoming = iter(messages)

    async def receive() -> Message:
        await asyncio.sleep(0)
        return next(incoming, {"type": "http.disconnect"})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8", "surrogateescape"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "test_request": number,
    }
    try:
        await layer(scope, receive, send)
    except BaseException as exc:
        return sent, exc
    return sent, None


def identity(request: FuzzRequest) -> tuple[str, bytes | None] | None:
    """(key, credentials) of a request the layer protects with a valid key; else None."""
    if request.method not in {"POST", "PATCH"}:
        return None
    try:
        key = find_key(request.headers, KEY_NAME)
    except MalformedKey:
        return None
    if key is None:
        return None
    auth = next((v for n, v in request.headers if n == b"authorization"), None)
    return key, auth


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    """One SQLite ledger for the module; each example uses a namespace of its own."""
    store = SQLiteStore(str(tmp_path_factory.mktemp("fuzz") / "ledger.db"))
    yield store
    asyncio.run(store.aclose())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@FUZZ
@given(batch=batches(), concurrent=st.booleans())
def test_middleware_survives_any_request_shape(
    kind: str, sqlite_store: SQLiteStore, batch: list[FuzzRequest], concurrent: bool
) -> None:
    """Any request shapes, together or in turn: no 500, no raise, one run per key and scope."""
    store: Store = MemoryStore() if kind == "memory" else sqlite_store
    inner = InnerApp()
    # A fresh namespace per example: records of earlier examples in the shared file never match.
    layer = IdempotencyMiddleware(inner, store=store, namespace=uuid.uuid4().hex, hooks=())

    async def run_all() -> list[tuple[list[Message], BaseException | None]]:
        if concurrent:
            return await asyncio.gather(*(drive(layer, i, r) for i, r in enumerate(batch)))
        return [await drive(layer, i, r) for i, r in enumerate(batch)]

    results = asyncio.run(run_all())

    answers: dict[tuple[str, bytes | None], set[bytes]] = defaultdict(set)
    runs: dict[tuple[str, bytes | None], int] = defaultdict(int)
    for number, (request, (sent, raised)) in enumerate(zip(batch, results, strict=True)):
        assert raised is None, f"the layer raised {raised!r}"
        who = identity(request)
        if number in inner.executions and who is not None:
            runs[who] += 1
        if not sent:
            # Only a client that left (or an app that saw it leave) goes unanswered.
            assert request.truncated, request
            assert number not in inner.executions
            continue
        assert sent[0]["type"] == "http.response.start"
        assert all(m["type"] == "http.response.body" for m in sent[1:])
        assert [m.get("more_body", False) for m in sent[1:]][-1:] == [False]
        status: int = sent[0]["status"]
        event(f"status {status}")
        body = b"".join(m.get("body", b"") for m in sent[1:])
        headers = dict(sent[0]["headers"])
        assert status != 500
        if 200 <= status < 300:
            assert status == 201  # the inner app's answer, first or replayed
            if who is not None:
                answers[who].add(body)
            if headers.get(b"idempotent-replayed") == b"true":
                event("replayed")
                assert b"set-cookie" not in headers
        else:
            # Every refusal from the layer is an RFC 9457 problem.
            assert headers[b"content-type"] == b"application/problem+json", (status, body)
            document = json.loads(body)
            assert document["status"] == status
            assert {"type", "title", "detail"} <= document.keys()
            assert status in {400, 409, 410, 413, 422, 503}
            assert number not in inner.executions
    protected = [who for who in map(identity, batch) if who is not None]
    event(f"protected requests sharing a key: {len(protected) - len(set(protected)) > 0}")
    for who, count in runs.items():
        assert count <= 1, f"{who} executed {count} times"
    for who, bodies in answers.items():
        assert len(bodies) == 1, f"{who} got {len(bodies)} different answers"
