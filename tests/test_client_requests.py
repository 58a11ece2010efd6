"""The requests face over real HTTP: the same policy as the httpx client, driven by a transport
adapter, against the retrysafe middleware and the faulty proxy in front of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from client_servers import (
    Answer,
    FakeClock,
    Fault,
    Stack,
    faulty_proxy,
    refused_url,
    serve_protected,
)

from retrysafe import RetryAdapter, RetryInfo, RetryPolicy, RetrySession, retry_info

CHARGE = {"amount": 4200, "currency": "eur"}


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
