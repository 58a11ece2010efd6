"""The requests face over real HTTP: the same policy as the httpx client, driven by a transport
adapter, against the retrysafe middleware and the faulty proxy in front of it."""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from client_servers import (
    IN_PROGRESS_BODY,
    Answer,
    FakeClock,
    Fault,
    Stack,
    faulty_proxy,
    refused_url,
    serve_protected,
    serve_tls,
    serve_trickling,
    tls_front,
)

from retrysafe import RetryAdapter, RetryInfo, RetryPolicy, RetrySession, retry_info

CHARGE = {"amount": 4200, "currency": "eur"}
PROBLEM = (("content-type", "application/problem+json"),)


@pytest.fixture(scope="module")
def server() -> Iterator[Stack]:
    with serve_protected() as stack:
        yield stack


@pytest.fixture
def stack(server: Stack) -> Stack:
    server.app.reset()
    return server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def policy(clock: FakeClock, **options: object) -> RetryPolicy:
    return RetryPolicy(clock=clock, jitter=lambda: 0.5, **options)  # type: ignore[arg-type]


def info_of(response: requests.Response) -> RetryInfo:
    info = retry_info(response)
    assert info is not None
    return info


def test_lost_and_late_responses_are_retried_with_one_key(stack: Stack, clock: FakeClock) -> None:
    """No answer, half a body, an answer later than the timeout, a 503 with Retry-After: all
    retried with the same key; the handler ran once and the last attempt is its replay."""
    faults: list[Fault] = ["lose", "lose-body", "stall", Answer(503, (("retry-after", "3"),))]
    with faulty_proxy(stack.url, faults) as proxy, RetrySession(retry=policy(clock)) as session:
        response = session.post(proxy.url + "/charge", json=CHARGE, timeout=0.5)
    info = info_of(response)
    assert response.status_code == 201
    assert response.json() == {"charge": 1}
    assert info.outcomes == ("ConnectionError", "ChunkedEncodingError", "ReadTimeout",
                             "503", "201")  # fmt: skip
    assert info.replayed
    assert clock.sleeps == [0.25, 0.5, 1.0, 3.0]
    assert proxy.keys() == [info.key] * 5
    assert stack.app.keys() == [info.key]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_final_statuses_are_not_retried(stack: Stack, clock: FakeClock, status: int) -> None:
    """A 4xx other than 408/409-in-progress/425/429 is returned after one attempt."""
    with (
        faulty_proxy(stack.url, [Answer(status)]) as proxy,
        RetrySession(retry=policy(clock)) as session,
    ):
        response = session.post(proxy.url + "/charge", json=CHARGE)
    assert (response.status_code, info_of(response).attempts) == (status, 1)
    assert len(proxy.seen) == 1
    assert stack.app.executions == []


def test_each_call_mints_its_own_key(stack: Stack, clock: FakeClock) -> None:
    """Two calls, two keys; the first call's retry reuses the first key."""
    with faulty_proxy(stack.url, ["lose"]) as proxy, RetrySession(retry=policy(clock)) as session:
        first = session.post(proxy.url + "/charge", json=CHARGE, timeout=5)
        second = session.post(proxy.url + "/charge", json=CHARGE, timeout=5)
    k1, k2 = info_of(first).key, info_of(second).key
    assert k1 != k2
    assert proxy.keys() == [k1, k1, k2]
    assert stack.app.keys() == [k1, k2]


def test_unsafe_calls_are_not_retried_but_connect_errors_are(
    stack: Stack, clock: FakeClock
) -> None:
    """Without a key a POST is not sent again once it may have arrived, nor a generator body
    even with a key; a refused connection is retried either way."""
    unkeyed = policy(clock, key_methods=(), attempts=3)
    with faulty_proxy(stack.url, ["lose", "lose"]) as proxy:
        with RetrySession(retry=unkeyed) as session, pytest.raises(requests.ConnectionError):
            session.post(proxy.url + "/charge", json=CHARGE, timeout=5)
        with RetrySession(retry=policy(clock)) as session, pytest.raises(requests.ConnectionError):
            session.post(proxy.url + "/charge", data=iter([b"{}"]), timeout=5)
        assert [seen.key is None for seen in proxy.seen] == [True, False]
    assert len(stack.app.executions) == 2
    assert clock.sleeps == []
    with (
        refused_url() as url,
        RetrySession(retry=unkeyed) as session,
        pytest.raises(requests.ConnectionError) as caught,
    ):
        session.post(url + "/charge", json=CHARGE)
    assert "gave up after 3 attempt(s) (attempts)" in "".join(caught.value.__notes__)
    assert clock.sleeps == [0.25, 0.5]


def test_adapter_on_a_plain_session_and_streamed_responses(stack: Stack, clock: FakeClock) -> None:
    """``RetryAdapter`` mounted on any ``requests.Session`` retries the same way, and a
    ``stream=True`` call still streams its final response."""
    session = requests.Session()
    session.mount("http://", RetryAdapter(policy=policy(clock)))
    with faulty_proxy(stack.url, [Answer(502)]) as proxy, session:
        response = session.post(proxy.url + "/charge", json=CHARGE, stream=True)
        chunks = list(response.iter_content(4))
    info = info_of(response)
    assert (response.status_code, info.attempts) == (201, 2)
    assert b"".join(chunks) == b'{"charge": 1}'
    assert proxy.keys() == [info.key, info.key]


def test_a_followed_redirect_gets_its_own_key(stack: Stack, clock: FakeClock) -> None:
    """A 307 requests follows is another operation: the redirected POST gets a fresh key, on
    a ``RetrySession`` and on a plain session with the adapter alike (the minted key is set
    on the adapter's copy of the request, which the session never copies); a key the caller
    set is sent on, as requests sends every header."""
    moved = Answer(307, (("location", "/charge"),))
    mine = f"mine-{uuid.uuid4()}"
    plain = requests.Session()
    plain.mount("http://", RetryAdapter(policy=policy(clock)))
    with (
        faulty_proxy(stack.url, [moved, "pass", moved, "pass", moved]) as proxy,
        RetrySession(retry=policy(clock)) as session,
        plain,
    ):
        first = session.post(proxy.url + "/old", json=CHARGE, timeout=5)
        second = plain.post(proxy.url + "/old", json=CHARGE, timeout=5)
        kept = session.post(proxy.url + "/old", json=CHARGE, headers={"Idempotency-Key": mine})
    keys = [info_of(r).key for r in (first.history[0], first, second.history[0], second)]
    assert None not in keys
    assert len(set(keys)) == 4
    assert [seen.path for seen in proxy.seen] == ["/old", "/charge"] * 3
    assert proxy.keys() == [*keys, mine, mine]
    assert first.request.headers["Idempotency-Key"] == keys[1]
    assert (first.status_code, second.status_code, kept.status_code) == (201, 201, 201)
    assert stack.app.keys() == [keys[1], keys[3], mine]


def test_sending_one_prepared_request_twice_is_two_calls_with_two_keys(
    stack: Stack, clock: FakeClock
) -> None:
    """A ``PreparedRequest`` sent twice mints a key per call: the second call is executed,
    not replayed under the first call's key."""
    with RetrySession(retry=policy(clock)) as session:
        prepared = session.prepare_request(
            requests.Request("POST", stack.url + "/charge", json=CHARGE)
        )
        first, second = session.send(prepared), session.send(prepared)
    k1, k2 = info_of(first).key, info_of(second).key
    assert k1 is not None
    assert k2 is not None
    assert k1 != k2
    assert "Idempotency-Key" not in prepared.headers  # the caller's request is left as it was
    assert (info_of(first).replayed, info_of(second).replayed) == (False, False)
    assert stack.app.keys() == [k1, k2]


def test_a_certificate_that_does_not_verify_is_not_retried(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A server certificate the session does not trust: ``SSLError`` after one attempt, no
    waiting; trusting the authority, the same call goes through."""
    with serve_tls(tmp_path) as tls, RetrySession(retry=policy(clock)) as session:
        with pytest.raises(requests.exceptions.SSLError) as caught:
            session.post(tls.url + "/charge", json=CHARGE)
        response = session.post(tls.url + "/charge", json=CHARGE, verify=str(tls.ca))
    assert "gave up after 1 attempt(s) (final)" in "".join(caught.value.__notes__)
    assert clock.sleeps == []
    assert (response.status_code, info_of(response).attempts) == (201, 1)
    assert len(tls.app.executions) == 1


def test_a_409_too_deep_or_too_long_to_be_the_in_progress_problem_is_final(
    stack: Stack, clock: FakeClock
) -> None:
    """A 409 JSON body nested deeper than the parser's recursion limit, or longer than 64 KiB
    (the in-progress problem padded with blanks), is a final 409 returned whole, streamed or
    not; a streamed in-progress problem is still recognised and retried."""
    deep = b"[" * 20000 + b"]" * 20000
    padded = IN_PROGRESS_BODY + b" " * (100 * 1024)
    script: list[Fault] = [Answer(409, PROBLEM, deep), Answer(409, PROBLEM, padded)]
    script += [Answer(409, PROBLEM, padded), Answer(409, PROBLEM, IN_PROGRESS_BODY)]
    with faulty_proxy(stack.url, script) as proxy, RetrySession(retry=policy(clock)) as session:
        nested = session.post(proxy.url + "/charge", json=CHARGE)
        long = session.post(proxy.url + "/charge", json=CHARGE)
        streamed = session.post(proxy.url + "/charge", json=CHARGE, stream=True)
        streamed_body = b"".join(streamed.iter_content(1000))
        waited = session.post(proxy.url + "/charge", json=CHARGE, stream=True)
        waited_body = waited.content
    for response in (nested, long, streamed):
        info = info_of(response)
        assert (response.status_code, info.attempts, info.stopped) == (409, 1, "final")
    assert (nested.content, long.content, streamed_body) == (deep, padded, padded)
    assert info_of(waited).outcomes == ("409", "201")
    assert waited_body == b'{"charge": 1}'
    assert len(stack.app.executions) == 1


def test_deadline_stops_a_body_that_trickles_in() -> None:
    """A body arriving a byte at a time (no read ever times out) is given up on at the
    deadline with a ReadTimeout, not read for as long as the server likes."""
    with serve_trickling(40, 0.1) as url, RetrySession(retry=RetryPolicy(deadline=1.0)) as s:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout) as caught:
            s.post(url + "/charge", json=CHARGE)
        took = time.monotonic() - started
    assert took < 3.0, took  # the whole body takes 4 s
    assert "gave up after 1 attempt(s) (deadline)" in "".join(caught.value.__notes__)


def test_a_tls_handshake_cut_short_is_retried(tmp_path: Path, clock: FakeClock) -> None:
    """A connection closed mid TLS handshake (a load balancer draining) is transient: the
    keyed call is retried, unlike a certificate that does not verify; the handler runs once."""
    with (
        serve_tls(tmp_path) as tls,
        tls_front(tls.url, drops=1) as front,
        RetrySession(retry=policy(clock)) as session,
    ):
        response = session.post(front.url + "/charge", json=CHARGE, verify=str(tls.ca))
    info = info_of(response)
    assert (response.status_code, info.outcomes) == (201, ("SSLError", "201"))
    assert front.connections == 2
    assert len(tls.app.executions) == 1


def test_a_proxy_that_refuses_the_connection_is_retried(clock: FakeClock) -> None:
    """A forward proxy refusing the connection (restarting) got nothing: retried, even
    without a key, as a refused connection to the server is (and as the httpx face does)."""
    unkeyed = policy(clock, key_methods=(), attempts=3)
    with (
        refused_url() as proxy,
        RetrySession(retry=unkeyed) as session,
        pytest.raises(requests.exceptions.ProxyError) as caught,
    ):
        session.post("http://api.invalid/charge", json=CHARGE, proxies={"http": proxy})
    assert "gave up after 3 attempt(s) (attempts)" in "".join(caught.value.__notes__)
    assert clock.sleeps == [0.25, 0.5]


def test_a_pickled_session_keeps_its_policy_and_journal(
    stack: Stack, clock: FakeClock, tmp_path: Path
) -> None:
    """A ``RetrySession`` survives pickling (requests sessions do): the copy still retries
    with one key per call and names operations in the same journal."""
    original = RetrySession(retry=RetryPolicy(attempts=3), journal=tmp_path / "keys.db")
    with faulty_proxy(stack.url, [Answer(503)]) as proxy, pickle.loads(pickle.dumps(original)) as s:
        response = s.post(proxy.url + "/charge", json=CHARGE, operation="order-1/charge")
    info = info_of(response)
    assert (response.status_code, info.attempts) == (201, 2)
    assert original.journal is not None
    assert info.key == original.journal.get("order-1/charge")
    assert proxy.keys() == [info.key, info.key]


def test_a_call_that_ends_in_an_error_tells_its_attempts_and_key(
    stack: Stack, clock: FakeClock
) -> None:
    """``retry_info(error)`` of a call that gave up: its attempts, why it stopped, its key."""
    with (
        faulty_proxy(stack.url, ["lose", "lose"]) as proxy,
        RetrySession(retry=policy(clock, attempts=2)) as session,
        pytest.raises(requests.ConnectionError) as caught,
    ):
        session.post(proxy.url + "/charge", json=CHARGE, timeout=5)
    info = retry_info(caught.value)
    assert info is not None
    assert (info.attempts, info.stopped) == (2, "attempts")
    assert proxy.keys() == [info.key, info.key]
    assert stack.app.keys() == [info.key]
