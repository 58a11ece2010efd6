"""The gateway against an upstream that misbehaves byte by byte (:class:`RawUpstream`): every
malformed, ambiguous or oversized answer is a clean 502 problem with the key released, never a
500, a hang or a pooled connection left out of step for the next request. Also requests whose
Host is ambiguous: refused before the upstream sees them.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from gateway_support import RawUpstream, run_gateway

REPLAYED = "idempotent-replayed"
OK = RawUpstream.OK


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def gateway(raw: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway in front of the raw upstream: 2 s read timeout, idle connections kept 60 s;
    paths starting with /keep keep the key when the upstream fails."""
    directory = tmp_path_factory.mktemp("framing")
    config = (
        "[upstream]\nread_timeout = 2\nidle_timeout = 60\n"
        '[[routes]]\npath = "/keep*"\nupstream_failure = "keep"\n'
    )
    store = f"sqlite:///{directory / 'ledger.db'}"
    with run_gateway(raw.url, directory, "--store", store, config=config) as process:
        yield process.url


def script(raw: RawUpstream, *steps: bytes | str) -> str:
    """Give the raw upstream a script under a fresh name; return the path that plays it."""
    name = uuid.uuid4().hex[:12]
    raw.answers[name] = list(steps)
    return f"/{name}"


def assert_502_and_released(url: str, raw: RawUpstream, path: str) -> None:
    """A keyed POST gets 502 upstream-unavailable, and so does its retry: the key was released
    (the upstream is asked again, nothing is replayed); the next request is answered normally."""
    key = uuid.uuid4().hex
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):
            response = client.post(path, headers={"Idempotency-Key": key}, content=b"x")
            assert response.status_code == 502, (response.status_code, response.content[:200])
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"].endswith("upstream-unavailable")
            assert REPLAYED not in response.headers
        assert client.get("/after").content == b"ok"
    assert sum(1 for _, line in raw.requests if line.split(b" ")[1] == path.encode()) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhi",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"SPDY/3 200 OK\r\n\r\n",
    ],
    ids=["cl-and-te", "cl-twice", "cl-conflict", "cl-list", "cl-negative", "chunk-size-bad",
         "chunk-size-overflow", "obs-fold", "nul", "bare-cr", "bare-lf", "not-http"],
)  # fmt: skip
def test_malformed_framing_is_a_502(gateway: str, raw: RawUpstream, answer: bytes) -> None:
    """Ambiguous or malformed response framing is refused whole: 502, key released."""
    assert_502_and_released(gateway, raw, script(raw, answer))


@pytest.mark.parametrize("status", [b"999", b"600", b"099", b"000", b"101"])
def test_a_status_outside_200_to_599_is_a_502(
    gateway: str, raw: RawUpstream, status: bytes
) -> None:
    """A final status the gateway cannot forward (or an unasked-for 101) is a 502, not a
    dropped connection."""
    answer = b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok"
    assert_502_and_released(gateway, raw, script(raw, answer))


@pytest.mark.parametrize(
    "steps",
    [
        [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 100_000 + b"Content-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 " + b"O" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 50_000, "hang"],
        # Just over the limit and whole in one write: it may arrive in a single read.
        [b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 8_400 + b"Content-Length: 2\r\n\r\nok"],
        [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (66 << 10) + b"\r\nContent-Length: 2\r\n\r\nok"],
    ],
    ids=[
        "one-huge-header",
        "many-headers",
        "huge-reason",
        "endless-103",
        "70k-headers",
        "66k-header",
    ],
)
def test_an_oversized_response_head_is_a_502(
    gateway: str, raw: RawUpstream, steps: list[bytes | str]
) -> None:
    """Over 64 KiB before the final head is complete (interim responses count) is a 502."""
    assert_502_and_released(gateway, raw, script(raw, *steps))


def test_interim_responses_are_skipped(gateway: str, raw: RawUpstream) -> None:
    """100 Continue and 103 Early Hints before the real answer are not forwarded; the final
    response is, and the connection stays usable."""
    path = script(
        raw,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi",
    )
    with httpx.Client(base_url=gateway, timeout=30) as client:
        response = client.post(path, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert (response.status_code, response.content) == (201, b"hi")
        assert "link" not in response.headers
        assert client.get("/after").content == b"ok"


def test_a_transfer_coding_other_than_chunked_is_a_502(gateway: str, raw: RawUpstream) -> None:
    """``Transfer-Encoding: gzip`` (body until close, still encoded) is refused rather than
    forwarded with its coding stripped."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08garbage"
    assert_502_and_released(gateway, raw, script(raw, answer, "close"))


def test_trailers_never_become_response_headers(gateway: str, raw: RawUpstream) -> None:
    """Trailers of a chunked answer are dropped, even when they arrive with the head."""
    path = script(
        raw,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        b"X-Trailer: 1\r\nSet-Cookie: sid=evil\r\n\r\n",
    )
    with httpx.Client(base_url=gateway, timeout=30) as client:
        response = client.get(path)
        assert (response.status_code, response.content) == (200, b"hello")
        assert "x-trailer" not in response.headers
        assert "set-cookie" not in response.headers
        assert client.get("/after").content == b"ok"


def test_a_second_response_in_the_same_packet_is_not_forwarded(
    gateway: str, raw: RawUpstream
) -> None:
    """A 204 followed at once by another response: the client gets the 204 and the
    connection is dropped, not reused out of step."""
    path = script(
        raw, b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
    )
    with httpx.Client(base_url=gateway, timeout=30) as client:
        response = client.get(path)
        assert (response.status_code, response.content) == (204, b"")
        assert client.get("/after").content == b"ok"


def test_bytes_on_an_idle_connection_never_reach_the_next_request(
    gateway: str, raw: RawUpstream
) -> None:
    """Bytes the upstream sends after a complete response (here, the start of a stray answer)
    retire the pooled connection: the next request gets its own answer, not the stray one."""
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nEVIL"
    path = script(raw, b"HTTP/1.1 204 No Content\r\n\r\n", "wait", stray)
    with httpx.Client(base_url=gateway, timeout=30) as client:
        assert client.get(path).status_code == 204
        raw.played.clear()
        raw.proceed()
        assert raw.played.wait(10)
        response = client.get("/after")
    assert (response.status_code, response.content) == (200, b"ok")


def test_an_early_answer_to_a_streamed_upload_retires_the_connection(
    gateway: str, raw: RawUpstream
) -> None:
    """The upstream answers before the body is all sent: the half-sent request's connection
    is never reused, so the next request cannot be read as the rest of that body."""
    path = script(raw, "early", b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")

    def upload() -> Iterator[bytes]:
        for _ in range(256):  # 16 MiB: more than the sockets between can hold
            yield b"u" * (64 << 10)

    with httpx.Client(base_url=gateway, timeout=60) as client:
        first = client.post(path, content=upload())
        assert (first.status_code, first.content) == (413, b"big")
        after = client.post("/after", content=b"next")
    assert (after.status_code, after.content) == (200, b"ok")
    connections = {line.split(b" ")[1]: number for number, line in raw.requests}
    assert connections[b"/after"] != connections[path.encode()]


def test_a_body_cut_short_drops_the_client_connection(gateway: str, raw: RawUpstream) -> None:
    """The upstream closes before its declared length: the client's response is cut too (it
    never looks complete), and the next request is answered normally."""
    path = script(raw, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "close")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(gateway + path, timeout=30)
    assert httpx.get(gateway + "/after", timeout=30).content == b"ok"


def test_no_answer_after_the_head_is_bounded_by_the_read_timeout(
    gateway: str, raw: RawUpstream
) -> None:
    """An upstream that sends its head and then nothing never holds the client forever."""
    path = script(raw, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "hang")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(gateway + path, timeout=60)


def test_close_delimited_bodies_are_forwarded(gateway: str, raw: RawUpstream) -> None:
    """An HTTP/1.0-style answer whose body ends with the connection arrives whole."""
    path = script(raw, b"HTTP/1.0 200 OK\r\n\r\nuntil the end", "close")
    response = httpx.get(gateway + path, timeout=30)
    assert (response.status_code, response.content) == (200, b"until the end")


def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes to the gateway; return status, headers and body of its answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize(
    "head",
    [
        b"POST /{path} HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n",
        b"POST /{path} HTTP/1.1\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a.example/evil\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: user@a.example\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a.example,b.example\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a:b:c\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: ][\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a.example:abc\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: [::1\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a.example:123456\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a.example:65536\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: a%2Cb.example\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: :80\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: [1.2.3.4]\r\n",
        b"POST /{path} HTTP/1.1\r\nHost: [:]\r\n",
    ],
    ids=[
        "two-hosts", "no-host", "slash", "userinfo", "comma-list", "colons", "brackets",
        "port-not-digits", "unclosed-literal", "port-too-long", "port-over-65535",
        "escape-in-name", "port-without-name", "ipv4-in-brackets", "not-ipv6",
    ],
)  # fmt: skip
def test_an_ambiguous_host_is_refused_before_the_upstream(
    gateway: str, raw: RawUpstream, head: bytes
) -> None:
    """Two Hosts, none (HTTP/1.1) or one that is no host[:port]: 400 problem, nothing forwarded."""
    path = uuid.uuid4().hex
    request = head.replace(b"{path}", path.encode()) + (
        b"Idempotency-Key: k\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    )
    status, headers, body = exchange(gateway, request)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["type"].endswith("malformed-request")
    assert not [line for _, line in raw.requests if path.encode() in line]


def test_an_http_1_0_request_without_host_is_forwarded(gateway: str, raw: RawUpstream) -> None:
    """HTTP/1.0 has no Host requirement: such a request is forwarded as before."""
    path = uuid.uuid4().hex
    status, _, body = exchange(gateway, f"GET /{path} HTTP/1.0\r\n\r\n".encode())
    assert (status, body) == (200, b"ok")
    assert [line for _, line in raw.requests if path.encode() in line]


@pytest.mark.parametrize(
    "host",
    [
        b"a.example", b"a.example:8080", b"127.0.0.1:80", b"[::1]:8080", b"[fe80::1%25eth0]",
        b"xn--bcher-kva.example", b"a.example:", b"a.example:00080", b"", b"a.example \t",
        b"[::ffff:1.2.3.4]:443",
    ],
)  # fmt: skip
def test_a_well_formed_host_is_forwarded(gateway: str, raw: RawUpstream, host: bytes) -> None:
    """Names, addresses, IPv6 literals (with a zone), ports and an empty Host all pass."""
    path = uuid.uuid4().hex
    status, _, body = exchange(
        gateway,
        b"GET /%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path.encode(), host),
    )
    assert (status, body) == (200, b"ok")
    assert [line for _, line in raw.requests if path.encode() in line]


@pytest.mark.parametrize(
    ("prefix", "status", "runs"),
    [("", b"201", 2), ("keep", b"201", 1), ("keep", b"503", 2), ("keep", b"429", 2)],
    ids=["release", "keep", "keep-but-5xx", "keep-but-429"],
)
def test_an_upstream_cut_off_mid_body_follows_the_failure_policy(
    gateway: str, raw: RawUpstream, prefix: str, status: bytes, runs: int
) -> None:
    """The upstream sent its status and part of its body, then closed: by default the key is
    released (the retry reaches the upstream again); with upstream_failure = "keep" a final
    status is kept as not replayable (the retry gets 410, the upstream ran once), while a
    status rule 14 releases is still released."""
    name = prefix + uuid.uuid4().hex[:12]
    head = b"HTTP/1.1 %b Cut\r\nContent-Length: 100\r\n\r\n" % status
    raw.answers[name] = [head + b"0123456789", "close"]
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with httpx.Client(base_url=gateway, timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(f"/{name}", headers=headers, content=b"x")
        if runs == 1:
            retry = client.post(f"/{name}", headers=headers, content=b"x")
            assert retry.status_code == 410
            assert retry.json()["type"].endswith("replay-unavailable")
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                client.post(f"/{name}", headers=headers, content=b"x")
    assert sum(1 for _, line in raw.requests if f"/{name} ".encode() in line) == runs


def test_a_keep_route_never_sends_a_request_twice_on_a_stale_connection(
    gateway: str, raw: RawUpstream
) -> None:
    """On a reused connection the upstream read the keyed POST and closed without a word (ran
    it and died?): a keep route answers 502 and keeps it, never sending it again itself."""
    name = "keep" + uuid.uuid4().hex[:12]
    raw.answers[name] = ["close"]
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with httpx.Client(base_url=gateway, timeout=30) as client:
        assert client.get("/warm").content == b"ok"  # an idle pooled connection to reuse
        first = client.post(f"/{name}", headers=headers, content=b"x")
        retry = client.post(f"/{name}", headers=headers, content=b"x")
    assert first.status_code == 502
    assert (retry.status_code, retry.headers.get(REPLAYED)) == (502, "true")
    assert sum(1 for _, line in raw.requests if f"/{name} ".encode() in line) == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET ?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["lowercase-method", "signed-length", "length-and-chunked", "no-path"],
)
def test_a_request_the_server_cannot_parse_gets_a_problem(
    gateway: str, request_bytes: bytes
) -> None:
    """What the HTTP parser refuses is answered with a 400 malformed-request problem document,
    not uvicorn's plain text."""
    status, headers, body = exchange(gateway, request_bytes)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    document = json.loads(body)
    assert document["type"].endswith("malformed-request")
    assert document["status"] == 400
