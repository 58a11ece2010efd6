"""The retrying httpx client over real HTTP: uvicorn running a counting app behind the retrysafe
middleware, and a faulty proxy in front of it that loses responses, stalls and answers errors.

Every test asserts the attempts the client made, the keys the server side saw and how many
times the handler ran. No test sleeps for backoff: the policy's clock is a fake one.
"""

from __future__ import annotations

import email.utils
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from client_servers import (
    IN_PROGRESS_BODY,
    Answer,
    FakeClock,
    Fault,
    SlowTransport,
    Stack,
    faulty_proxy,
    refused_url,
    serve_protected,
    serve_tls,
    serve_trickling,
    tls_front,
)
from servers import poll_until

from retrysafe import (
    AsyncClient,
    AsyncRetryTransport,
    Client,
    RetryInfo,
    RetryPolicy,
    RetryTransport,
    retry_info,
)
from retrysafe.client.policy import Answered, Attempt, Call, Failed, Reach, Wait, advance

CHARGE = {"amount": 4200, "currency": "eur"}
PROBLEM = (("content-type", "application/problem+json"),)
IN_PROGRESS = Answer(409, PROBLEM, IN_PROGRESS_BODY)


@pytest.fixture(scope="module")
def server() -> Iterator[Stack]:
    with serve_protected() as stack:
        yield stack


@pytest.fixture
def stack(server: Stack) -> Stack:
    server.app.reset()
    server.recorder.statuses.clear()
    return server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def policy(clock: FakeClock, **options: object) -> RetryPolicy:
    """A policy on the fake clock whose jitter always picks half the backoff ceiling."""
    return RetryPolicy(clock=clock, jitter=lambda: 0.5, **options)  # type: ignore[arg-type]


def info_of(response: httpx.Response) -> RetryInfo:
    info = retry_info(response)
    assert info is not None
    assert response.extensions["retrysafe"] == info  # where httpx users find it too
    return info


def causes(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


# --- lost responses, timeouts ------------------------------------------------------------------


def test_lost_responses_are_retried_with_one_key_and_executed_once(
    stack: Stack, clock: FakeClock
) -> None:
    """Responses lost after the handler ran (no answer; half a body) are retried with the same
    key; the third attempt gets the one execution's response, replayed."""
    with (
        faulty_proxy(stack.url, ["lose", "lose-body"]) as proxy,
        Client(retry=policy(clock), timeout=5) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert response.status_code == 201
    assert response.json() == {"charge": 1}
    assert info.attempts == 3
    assert info.outcomes == ("RemoteProtocolError", "RemoteProtocolError", "201")
    assert info.replayed
    assert response.headers["idempotent-replayed"] == "true"
    assert info.key is not None
    assert proxy.keys() == [info.key] * 3
    assert response.request.headers["idempotency-key"] == info.key
    assert stack.app.keys() == [info.key]
    assert clock.sleeps == [0.25, 0.5]  # full jitter at 0.5: half of 0.5, then of 1.0


def test_timeout_after_the_handler_ran_is_retried_and_replayed(
    stack: Stack, clock: FakeClock
) -> None:
    """A server slower than the client's timeout: the retry carries the same key and gets the
    first execution's response instead of a second charge."""
    with (
        faulty_proxy(stack.url, ["stall"]) as proxy,
        Client(retry=policy(clock), timeout=0.3) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.replayed) == (201, 2, True)
    assert info.outcomes == ("ReadTimeout", "201")
    assert proxy.keys() == [info.key, info.key]
    assert stack.app.keys() == [info.key]


def test_each_call_gets_its_own_key_and_a_callers_key_is_kept(
    stack: Stack, clock: FakeClock
) -> None:
    """A key lives for one call: its retries share it, the next call mints another; a key the
    caller sends is used as it is."""
    with (
        faulty_proxy(stack.url, ["lose"]) as proxy,
        Client(retry=policy(clock), timeout=5) as client,
    ):
        first = client.post(proxy.url + "/charge", json=CHARGE)
        second = client.post(proxy.url + "/charge", json=CHARGE)
        mine = client.post(proxy.url + "/charge", json=CHARGE, headers={"Idempotency-Key": "m-1"})
    k1, k2 = info_of(first).key, info_of(second).key
    assert k1 is not None
    assert k2 is not None
    assert k1 != k2
    assert uuid.UUID(k1).version in (4, 7)
    assert info_of(mine).key == "m-1"
    assert proxy.keys() == [k1, k1, k2, "m-1"]
    assert stack.app.keys() == [k1, k2, "m-1"]
    assert [info_of(r).attempts for r in (first, second, mine)] == [2, 1, 1]


def test_a_followed_redirect_gets_its_own_key_and_a_callers_key_is_kept(
    stack: Stack, clock: FakeClock
) -> None:
    """A redirect httpx follows is a request to another URL, another operation for the server:
    the 307's POST gets a fresh key (a minted key is never carried over), a 303's GET gets none,
    and a key the caller set is sent on as httpx sends every header."""
    mine = f"mine-{uuid.uuid4()}"
    moved, see_other = (
        Answer(307, (("location", "/charge"),)),
        Answer(303, (("location", "/item"),)),
    )
    with (
        faulty_proxy(stack.url, [moved, "pass", see_other, "pass", moved]) as proxy,
        Client(retry=policy(clock), follow_redirects=True, timeout=5) as client,
    ):
        followed = client.post(proxy.url + "/old", json=CHARGE)
        to_get = client.post(proxy.url + "/old", json=CHARGE)
        kept = client.post(proxy.url + "/old", json=CHARGE, headers={"Idempotency-Key": mine})
    first = info_of(followed.history[0]).key
    second = info_of(followed).key
    third = info_of(to_get.history[0]).key
    assert None not in (first, second, third)
    assert len({first, second, third}) == 3
    assert (followed.status_code, to_get.status_code, kept.status_code) == (201, 200, 201)
    assert info_of(to_get).key is None
    assert [(seen.method, seen.path, seen.key) for seen in proxy.seen] == [
        ("POST", "/old", first),
        ("POST", "/charge", second),
        ("POST", "/old", third),
        ("GET", "/item", None),
        ("POST", "/old", mine),
        ("POST", "/charge", mine),
    ]
    assert stack.app.keys() == [second, None, mine]


def test_sending_one_request_object_twice_is_two_calls_with_two_keys(
    stack: Stack, clock: FakeClock
) -> None:
    """A built ``httpx.Request`` sent twice mints a key per call: the second call is executed,
    not replayed under the first call's key; a key the caller set on the request is kept."""
    mine = f"mine-{uuid.uuid4()}"
    with Client(retry=policy(clock)) as client:
        request = client.build_request("POST", stack.url + "/charge", json=CHARGE)
        first, second = client.send(request), client.send(request)
        keyed = client.build_request(
            "POST", stack.url + "/charge", json=CHARGE, headers={"Idempotency-Key": mine}
        )
        third, fourth = client.send(keyed), client.send(keyed)
    k1, k2 = info_of(first).key, info_of(second).key
    assert k1 is not None
    assert k2 is not None
    assert k1 != k2
    assert request.headers["idempotency-key"] == k2  # the request shows its last call's key
    assert [info_of(r).replayed for r in (first, second, third, fourth)] == [0, 0, 0, 1]
    assert (info_of(third).key, info_of(fourth).key) == (mine, mine)
    assert stack.app.keys() == [k1, k2, mine]


@pytest.mark.anyio
async def test_async_client_mints_a_key_per_call_on_redirects_and_resends(
    stack: Stack, clock: FakeClock
) -> None:
    """``AsyncClient`` as ``Client``: a followed 307 and a resent request object each get a
    key of their own."""
    moved = Answer(307, (("location", "/charge"),))
    with faulty_proxy(stack.url, [moved]) as proxy:
        async with AsyncClient(retry=policy(clock), follow_redirects=True, timeout=5) as client:
            followed = await client.post(proxy.url + "/old", json=CHARGE)
            request = client.build_request("POST", proxy.url + "/charge", json=CHARGE)
            first, second = await client.send(request), await client.send(request)
    keys = [info_of(r).key for r in (followed.history[0], followed, first, second)]
    assert None not in keys
    assert len(set(keys)) == 4
    assert proxy.keys() == keys
    assert stack.app.keys() == keys[1:]


def test_a_request_sent_again_after_its_call_gave_up_keeps_its_key(
    stack: Stack, clock: FakeClock
) -> None:
    """A call that ended in an exception (outcome unknown) left its key on the request: sending
    ``exc.request`` again continues that operation (replayed, one charge); after an answer the
    next send is a new call with a new key."""
    with (
        faulty_proxy(stack.url, ["lose", "lose"]) as proxy,
        Client(retry=policy(clock, attempts=2), timeout=5) as client,
    ):
        request = client.build_request("POST", proxy.url + "/charge", json=CHARGE)
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            client.send(request)
        again = client.send(caught.value.request)
        after = client.send(request)
    gave_up = retry_info(caught.value)
    assert gave_up is not None
    lost = gave_up.key
    assert lost is not None
    assert (again.status_code, again.json(), info_of(again).replayed) == (201, {"charge": 1}, 1)
    assert info_of(again).key == lost
    assert info_of(after).key not in (None, lost)
    assert stack.app.keys() == [lost, info_of(after).key]


@pytest.mark.anyio
async def test_async_client_keeps_the_key_of_a_call_that_gave_up(
    stack: Stack, clock: FakeClock
) -> None:
    """``AsyncClient`` as ``Client``: the request of a call that ended unanswered is sent again
    under its key, and replayed."""
    with faulty_proxy(stack.url, ["lose"]) as proxy:
        async with AsyncClient(retry=policy(clock, attempts=1), timeout=5) as client:
            request = client.build_request("POST", proxy.url + "/charge", json=CHARGE)
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await client.send(request)
            again = await client.send(request)
    gave_up = retry_info(caught.value)
    assert gave_up is not None
    assert gave_up.key is not None
    assert info_of(again).key == gave_up.key
    assert info_of(again).replayed
    assert stack.app.keys() == [info_of(again).key]


# --- the retry table -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(stack: Stack, clock: FakeClock, status: int) -> None:
    """Each status of contract rule 26 is retried with the same key; the retry executes once."""
    with (
        faulty_proxy(stack.url, [Answer(status)]) as proxy,
        Client(retry=policy(clock)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.replayed) == (201, 2, False)
    assert info.outcomes == (str(status), "201")
    assert proxy.keys() == [info.key, info.key]
    assert stack.app.keys() == [info.key]


PLAIN_CONFLICT = Answer(
    409,
    (("content-type", "application/problem+json"),),
    b'{"type": "https://api.example/problems/conflict", "status": 409}',
)


@pytest.mark.parametrize(
    "answer",
    [Answer(400), Answer(401), Answer(403), Answer(404), Answer(410), Answer(422), PLAIN_CONFLICT],
    ids=lambda answer: str(answer.status),
)
def test_final_statuses_are_not_retried(stack: Stack, clock: FakeClock, answer: Answer) -> None:
    """400, 401, 403, 404, 422, any other 4xx, and a 409 that is not ``in-progress``, are
    answers retrying cannot change: one attempt, returned as it is."""
    with (
        faulty_proxy(stack.url, [answer]) as proxy,
        Client(retry=policy(clock)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.stopped) == (answer.status, 1, "final")
    assert response.content == answer.body
    assert len(proxy.seen) == 1
    assert stack.app.executions == []
    assert clock.sleeps == []


def test_key_reused_422_from_the_middleware_is_not_retried(stack: Stack, clock: FakeClock) -> None:
    """The same key with another body: the middleware's 422 ``key-reused`` is final."""
    headers = {"Idempotency-Key": f"reuse-{uuid.uuid4()}"}
    with Client(retry=policy(clock)) as client:
        client.post(stack.url + "/charge", json=CHARGE, headers=headers)
        response = client.post(stack.url + "/charge", json={"amount": 1}, headers=headers)
    info = info_of(response)
    assert (response.status_code, info.attempts) == (422, 1)
    assert response.json()["type"].endswith("key-reused")
    assert len(stack.app.executions) == 1


def test_in_progress_409_is_waited_out_then_replayed(stack: Stack, clock: FakeClock) -> None:
    """A duplicate arriving while the original runs gets 409 ``in-progress``: the client waits
    (at least ``Retry-After``), retries, and gets the original's response once it is done."""
    key = f"order-{uuid.uuid4()}"
    headers = {"Idempotency-Key": key}
    original: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: original.append(
            httpx.post(stack.url + "/gated", json=CHARGE, headers=headers, timeout=20)
        )
    )
    thread.start()
    poll_until(lambda: stack.app.started == [key], what="the original to start")

    def finish_original(sleeps: int) -> None:
        if sleeps == 2:
            stack.app.gate.set()
            thread.join(20)

    clock.on_sleep = finish_original
    with Client(retry=policy(clock)) as client:
        response = client.post(stack.url + "/gated", json=CHARGE, headers=headers)
    info = info_of(response)
    assert info.outcomes == ("409", "409", "201")
    assert info.replayed
    assert clock.sleeps == [1.0, 1.0]  # Retry-After: 1 outweighs the backoff
    assert response.content == original[0].content
    assert stack.app.keys() == [key]
    assert stack.recorder.statuses.count(409) == 2


def test_in_progress_problem_is_recognised_under_any_type_base(
    stack: Stack, clock: FakeClock
) -> None:
    """A 409 whose problem type ends in ``in-progress`` (any base URI) is retried."""
    answer = Answer(409, (("content-type", "application/problem+json"),), IN_PROGRESS_BODY)
    with (
        faulty_proxy(stack.url, [answer]) as proxy,
        Client(retry=policy(clock)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    assert (response.status_code, info_of(response).outcomes) == (201, ("409", "201"))
    assert len(stack.app.executions) == 1


def test_a_409_too_deep_or_too_long_to_be_the_in_progress_problem_is_final(
    stack: Stack, clock: FakeClock
) -> None:
    """A 409 JSON body nested deeper than the parser's recursion limit, or longer than 64 KiB
    (here the in-progress problem padded with blanks), is no in-progress problem: a final 409,
    returned whole, streamed or not, instead of a RecursionError or a retry."""
    deep = b"[" * 20000 + b"]" * 20000
    padded = IN_PROGRESS_BODY + b" " * (64 * 1024)
    script = [
        Answer(409, PROBLEM, deep),
        Answer(409, PROBLEM, padded),
        Answer(409, PROBLEM, padded),
    ]
    with (
        faulty_proxy(stack.url, list(script)) as proxy,
        Client(retry=policy(clock)) as client,
    ):
        nested = client.post(proxy.url + "/charge", json=CHARGE)
        long = client.post(proxy.url + "/charge", json=CHARGE)
        with client.stream("POST", proxy.url + "/charge", json=CHARGE) as streamed:
            streamed_body = streamed.read()
    for response, body in ((nested, deep), (long, padded), (streamed, padded)):
        info = info_of(response)
        assert (response.status_code, info.attempts, info.stopped) == (409, 1, "final")
        assert response.content == body
    assert streamed_body == padded
    assert stack.app.executions == []


# --- Retry-After -----------------------------------------------------------------------------


def _retry_after_cases(clock: FakeClock) -> list[tuple[str, float]]:
    in_five = email.utils.formatdate(clock.time() + 5, usegmt=True)
    return [("7", 7.0), (in_five, 5.0), ("3600", 20.0), ("soon", 0.25)]


@pytest.mark.parametrize("case", range(4), ids=["seconds", "http-date", "capped", "unreadable"])
def test_retry_after_is_honoured_up_to_its_cap(stack: Stack, clock: FakeClock, case: int) -> None:
    """``Retry-After`` in seconds or as an HTTP date sets the wait, cut to ``max_retry_after``;
    an unreadable one leaves the backoff."""
    value, expected = _retry_after_cases(clock)[case]
    answer = Answer(503, (("retry-after", value),))
    with (
        faulty_proxy(stack.url, [answer]) as proxy,
        Client(retry=policy(clock, max_retry_after=20)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    assert (response.status_code, info_of(response).attempts) == (201, 2)
    assert clock.sleeps == [expected]
    assert info_of(response).delays == (expected,)
    assert len(stack.app.executions) == 1


@pytest.mark.parametrize("value", ["1e9", "+5", "-5", "1.5", "1_0", "0x10", "3 4", "inf", "Soon"])
def test_retry_after_that_is_not_digits_or_a_date_is_ignored(
    stack: Stack, clock: FakeClock, value: str
) -> None:
    """``Retry-After`` is delta-seconds (ASCII digits only) or an HTTP date: a number with a
    sign, a fraction, an exponent, an inner blank or another base is ignored, and the wait
    is the backoff's (a quarter second here), not 20 s for ``1e9``."""
    answer = Answer(503, (("retry-after", value),))
    with (
        faulty_proxy(stack.url, [answer]) as proxy,
        Client(retry=policy(clock, max_retry_after=20)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    assert (response.status_code, info_of(response).attempts) == (201, 2)
    assert clock.sleeps == [0.25]


def test_retry_after_forms_and_cap() -> None:
    """The policy reads the three HTTP-date forms and digits of any length (capped), and
    rejects the rest (None: the backoff decides)."""
    clock = FakeClock()
    policy_ = RetryPolicy(clock=clock, max_retry_after=30)
    later = time.gmtime(clock.time() + 5)
    for form in ("%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %d %H:%M:%S %Y"):
        assert policy_.retry_after(time.strftime(form, later)) == 5.0, form
    assert policy_.retry_after(" 7 ") == 7.0
    assert policy_.retry_after("0") == 0.0
    assert policy_.retry_after("9" * 5000) == 30.0
    assert policy_.retry_after("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0  # past: no wait
    for bad in ("-5", "+5", "1e9", "1.5", "3 4", "", "nan", "Sun, 06 Nov 1994", "06 Nov 1994"):
        assert policy_.retry_after(bad) is None, bad


# --- bounds: attempts and deadline ------------------------------------------------------------


def test_attempts_bound_the_retries(stack: Stack, clock: FakeClock) -> None:
    """A server that keeps answering 503: ``attempts`` sends in all, then the last 503 is
    returned, with why the client stopped."""
    with (
        faulty_proxy(stack.url, [Answer(503)] * 10) as proxy,
        Client(retry=policy(clock, attempts=4)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.stopped) == (503, 4, "attempts")
    assert clock.sleeps == [0.25, 0.5, 1.0]
    assert len(set(proxy.keys())) == 1
    assert len(proxy.seen) == 4


def test_deadline_bounds_the_waits(stack: Stack, clock: FakeClock) -> None:
    """No wait runs past the deadline: with ``Retry-After: 4`` and a 10 s deadline the client
    sends three times and stops, whatever ``attempts`` allows."""
    answer = Answer(503, (("retry-after", "4"),))
    with (
        faulty_proxy(stack.url, [answer] * 10) as proxy,
        Client(retry=policy(clock, attempts=10, deadline=10)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.stopped) == (503, 3, "deadline")
    assert clock.sleeps == [4.0, 4.0]
    assert len(proxy.seen) == 3


def test_deadline_cuts_an_attempts_timeout(stack: Stack) -> None:
    """The time left before the deadline caps each attempt's timeouts: a stalled server is
    given up on at the deadline (0.3 s), not at the client's 10 s timeout."""
    with (
        faulty_proxy(stack.url, ["stall"]) as proxy,
        Client(retry=RetryPolicy(attempts=1, deadline=0.3), timeout=10) as client,
        pytest.raises(httpx.ReadTimeout) as caught,
    ):
        client.post(proxy.url + "/charge", json=CHARGE)
    assert "gave up after 1 attempt(s)" in "".join(caught.value.__notes__)
    assert len(proxy.seen) == 1


def test_deadline_counts_the_time_spent_in_attempts(stack: Stack, clock: FakeClock) -> None:
    """The deadline runs on the clock from the first attempt, time inside attempts included,
    not on the waits alone: attempts of 4 s each against a server answering 503 stop at the
    10 s deadline after the third, whose timeouts are cut to the 1.25 s then left."""
    transport = SlowTransport(clock, 4.0)
    with (
        faulty_proxy(stack.url, [Answer(503)] * 10) as proxy,
        Client(
            retry=policy(clock, attempts=10, deadline=10), transport=transport, timeout=5
        ) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.stopped) == (503, 3, "deadline")
    assert info.delays == (0.25, 0.5)
    assert [timeouts["read"] for timeouts in transport.timeouts] == [5.0, 5.0, 1.25]
    assert len(proxy.seen) == 3


def test_a_call_starts_from_its_own_timeouts_not_those_cut_for_the_last_call(
    stack: Stack, clock: FakeClock
) -> None:
    """Timeouts cut to the deadline belong to one call: the same request object sent again
    starts from the client's 5 s, not from the 1.25 s its previous call's last attempt got."""
    transport = SlowTransport(clock, 4.0)
    with (
        faulty_proxy(stack.url, [Answer(503)] * 3) as proxy,
        Client(
            retry=policy(clock, attempts=10, deadline=10), transport=transport, timeout=5
        ) as client,
    ):
        request = client.build_request("POST", proxy.url + "/charge", json=CHARGE)
        first, second = client.send(request), client.send(request)
    assert (first.status_code, info_of(first).stopped, second.status_code) == (503, "deadline", 201)
    assert [timeouts["read"] for timeouts in transport.timeouts] == [5.0, 5.0, 1.25, 5.0]


def test_deadline_stops_a_body_that_trickles_in() -> None:
    """A body arriving a byte at a time (no read ever times out) is given up on at the
    deadline with a ReadTimeout, not read for as long as the server likes."""
    with serve_trickling(40, 0.1) as url, Client(retry=RetryPolicy(deadline=1.0)) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout) as caught:
            client.post(url + "/charge", json=CHARGE)
        took = time.monotonic() - started
    assert took < 3.0, took  # the whole body takes 4 s
    assert "gave up after 1 attempt(s) (deadline)" in "".join(caught.value.__notes__)


@pytest.mark.anyio
async def test_async_deadline_stops_a_body_that_trickles_in() -> None:
    """``AsyncClient`` gives up on a trickling body at the deadline as ``Client`` does."""
    with serve_trickling(40, 0.1) as url:
        async with AsyncClient(retry=RetryPolicy(deadline=1.0)) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.post(url + "/charge", json=CHARGE)
            took = time.monotonic() - started
    assert took < 3.0, took
    assert "gave up after 1 attempt(s) (deadline)" in "".join(caught.value.__notes__)


def test_no_retry_is_started_with_almost_no_time_left(stack: Stack, clock: FakeClock) -> None:
    """A wait that would leave less than ``min_budget`` (0.5 s by default) before the deadline
    is not waited: the call stops with ``deadline`` at once instead of sleeping 9 s to send an
    attempt with 0.25 s left; with a smaller ``min_budget`` that attempt is made."""
    answer = Answer(503, (("retry-after", "9"),))
    with faulty_proxy(stack.url, [answer, answer]) as proxy:
        with Client(retry=policy(clock, deadline=9.25)) as client:
            stopped = client.post(proxy.url + "/charge", json=CHARGE)
        assert clock.sleeps == []
        with Client(retry=policy(clock, deadline=9.25, min_budget=0.2)) as client:
            retried = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(stopped)
    assert (stopped.status_code, info.attempts, info.stopped) == (503, 1, "deadline")
    assert (retried.status_code, info_of(retried).attempts) == (201, 2)
    assert clock.sleeps == [9.0]
    assert len(proxy.seen) == 3


# --- what is safe to retry --------------------------------------------------------------------


def test_unkeyed_post_is_not_retried_once_it_may_have_arrived(
    stack: Stack, clock: FakeClock
) -> None:
    """Without a key (minting turned off) a POST that may have reached the server is never sent
    again: not after a lost response, not after a 503."""
    unkeyed = policy(clock, key_methods=())
    with (
        faulty_proxy(stack.url, ["lose", Answer(503)]) as proxy,
        Client(retry=unkeyed, timeout=5) as client,
    ):
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            client.post(proxy.url + "/charge", json=CHARGE)
        response = client.post(proxy.url + "/charge", json=CHARGE)
    assert "(unsafe)" in "".join(caught.value.__notes__)
    info = info_of(response)
    assert (response.status_code, info.attempts, info.stopped, info.key) == (503, 1, "unsafe", None)
    assert proxy.keys() == [None, None]
    assert len(stack.app.executions) == 1
    assert clock.sleeps == []


def test_idempotent_methods_are_retried_without_a_key(stack: Stack, clock: FakeClock) -> None:
    """A GET carries no key and is retried after a lost response: sending it twice is safe."""
    with (
        faulty_proxy(stack.url, ["lose"]) as proxy,
        Client(retry=policy(clock), timeout=5) as client,
    ):
        response = client.get(proxy.url + "/item")
    info = info_of(response)
    assert (response.status_code, info.attempts, info.key) == (200, 2, None)
    assert proxy.keys() == [None, None]


def test_a_call_that_ends_in_an_error_tells_its_attempts_and_key(
    stack: Stack, clock: FakeClock
) -> None:
    """``retry_info(error)`` of a call that gave up says what ``retry_info(response)`` says of
    one that got an answer: its attempts, outcomes, why it stopped, and the key to send again."""
    with (
        faulty_proxy(stack.url, ["lose", "lose"]) as proxy,
        Client(retry=policy(clock, attempts=2), timeout=5) as client,
        pytest.raises(httpx.RemoteProtocolError) as caught,
    ):
        client.post(proxy.url + "/charge", json=CHARGE)
    info = retry_info(caught.value)
    assert info is not None
    assert (info.attempts, info.stopped, info.outcomes) == (
        2,
        "attempts",
        ("RemoteProtocolError",) * 2,
    )
    assert proxy.keys() == [info.key, info.key]
    assert stack.app.keys() == [info.key]


def test_connect_errors_are_retried_even_without_a_key(clock: FakeClock) -> None:
    """A request that never reached a server (connection refused) is always safe to send again,
    keyed or not; the last error is raised once the attempts are spent."""
    with (
        refused_url() as url,
        Client(retry=policy(clock, attempts=3, key_methods=())) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.post(url + "/charge", json=CHARGE)
    assert clock.sleeps == [0.25, 0.5]
    assert "gave up after 3 attempt(s) (attempts)" in "".join(caught.value.__notes__)


def test_a_certificate_that_does_not_verify_is_not_retried(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A server certificate the client does not trust fails the same way every time: the
    ConnectError it causes is raised after one attempt, without waiting; trusting the
    authority, the same call goes through."""
    with serve_tls(tmp_path) as tls:
        with Client(retry=policy(clock)) as client, pytest.raises(httpx.ConnectError) as caught:
            client.post(tls.url + "/charge", json=CHARGE)
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        with Client(retry=policy(clock), verify=trusted) as client:
            response = client.post(tls.url + "/charge", json=CHARGE)
    assert any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes(caught.value))
    assert "gave up after 1 attempt(s) (final)" in "".join(caught.value.__notes__)
    assert clock.sleeps == []
    assert (response.status_code, info_of(response).attempts) == (201, 1)
    assert len(tls.app.executions) == 1


@pytest.mark.anyio
async def test_async_client_does_not_retry_a_certificate_that_does_not_verify(
    tmp_path: Path, clock: FakeClock
) -> None:
    """``AsyncClient`` (anyio's TLS) classifies the failed verification as fatal too."""
    with serve_tls(tmp_path) as tls:
        async with AsyncClient(retry=policy(clock)) as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await client.post(tls.url + "/charge", json=CHARGE)
    assert any(isinstance(cause, ssl.SSLError) for cause in causes(caught.value))
    assert "gave up after 1 attempt(s) (final)" in "".join(caught.value.__notes__)
    assert clock.sleeps == []
    assert tls.app.executions == []


def test_a_tls_handshake_cut_short_is_retried(tmp_path: Path, clock: FakeClock) -> None:
    """A connection closed mid TLS handshake (a load balancer draining) sent nothing and is
    transient: retried, unlike a certificate that does not verify; the handler runs once."""
    with serve_tls(tmp_path) as tls, tls_front(tls.url, drops=1) as front:
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        with Client(retry=policy(clock), verify=trusted) as client:
            response = client.post(front.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.attempts) == (201, 2)
    assert info.outcomes == ("ConnectError", "201")
    assert front.connections == 2
    assert len(tls.app.executions) == 1


@pytest.mark.anyio
async def test_async_client_retries_a_tls_handshake_cut_short(
    tmp_path: Path, clock: FakeClock
) -> None:
    """``AsyncClient`` (anyio's TLS) retries a handshake cut short as ``Client`` does."""
    with serve_tls(tmp_path) as tls, tls_front(tls.url, drops=1) as front:
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        async with AsyncClient(retry=policy(clock), verify=trusted) as client:
            response = await client.post(front.url + "/charge", json=CHARGE)
    assert (response.status_code, info_of(response).outcomes) == (201, ("ConnectError", "201"))
    assert len(tls.app.executions) == 1


def test_one_shot_body_is_not_sent_twice(stack: Stack, clock: FakeClock) -> None:
    """A body from a generator cannot be sent again: after a lost response the call fails
    instead of retrying with an empty or partial body, even though it carries a key."""
    with (
        faulty_proxy(stack.url, ["lose"]) as proxy,
        Client(retry=policy(clock), timeout=5) as client,
        pytest.raises(httpx.RemoteProtocolError) as caught,
    ):
        client.post(proxy.url + "/charge", content=iter([b'{"amount":', b" 1}"]))
    assert "(unsafe)" in "".join(caught.value.__notes__)
    assert len(proxy.seen) == 1
    assert proxy.seen[0].key is not None
    assert [e.body for e in stack.app.executions] == [b'{"amount": 1}']


# --- transports and the async client -----------------------------------------------------------


def test_retry_transport_works_in_a_plain_httpx_client(stack: Stack, clock: FakeClock) -> None:
    """``RetryTransport`` alone gives any ``httpx.Client`` the same behaviour, and ``stream()``
    keeps streaming the final response."""
    transport = RetryTransport(httpx.HTTPTransport(), policy=policy(clock))
    with (
        faulty_proxy(stack.url, ["lose", Answer(502)]) as proxy,
        httpx.Client(transport=transport, timeout=5) as client,
        client.stream("POST", proxy.url + "/charge", json=CHARGE) as response,
    ):
        body = response.read()
    info = info_of(response)
    assert (response.status_code, info.attempts, info.replayed) == (201, 3, True)
    assert body == b'{"charge": 1}'
    assert proxy.keys() == [info.key] * 3
    assert stack.app.keys() == [info.key]


@pytest.mark.anyio
async def test_async_client_retries_the_same_way(stack: Stack, clock: FakeClock) -> None:
    """``AsyncClient``: a lost response, a stall and a 503 are retried with one key; the handler
    runs once; the waits go through the clock's ``asleep``."""
    with faulty_proxy(stack.url, ["lose", "stall", Answer(503, (("retry-after", "2"),))]) as proxy:
        async with AsyncClient(retry=policy(clock), timeout=0.5) as client:
            response = await client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert info.outcomes == ("RemoteProtocolError", "ReadTimeout", "503", "201")
    assert info.replayed
    assert clock.sleeps == [0.25, 0.5, 2.0]
    assert proxy.keys() == [info.key] * 4
    assert stack.app.keys() == [info.key]


@pytest.mark.anyio
async def test_async_retry_transport_in_a_plain_async_client(
    stack: Stack, clock: FakeClock
) -> None:
    """``AsyncRetryTransport`` wraps any async transport; each call mints its own key."""
    transport = AsyncRetryTransport(httpx.AsyncHTTPTransport(), policy=policy(clock))
    with faulty_proxy(stack.url, ["lose"]) as proxy:
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            first = await client.post(proxy.url + "/charge", json=CHARGE)
            second = await client.post(proxy.url + "/charge", json=CHARGE)
    assert [info_of(first).attempts, info_of(second).attempts] == [2, 1]
    k1, k2 = info_of(first).key, info_of(second).key
    assert proxy.keys() == [k1, k1, k2]
    assert stack.app.keys() == [k1, k2]


def test_an_inner_transport_returning_read_responses_works(stack: Stack, clock: FakeClock) -> None:
    """A transport that hands back responses already read (``httpx.MockTransport``, here
    relaying to the real server) works under ``Client``: a 503 and a 409 in-progress are
    retried with one key and the final body is intact, not ``StreamConsumed``."""
    with (
        faulty_proxy(stack.url, [Answer(503), IN_PROGRESS]) as proxy,
        httpx.Client(timeout=5) as relay,
        Client(retry=policy(clock), transport=httpx.MockTransport(relay.send)) as client,
    ):
        response = client.post(proxy.url + "/charge", json=CHARGE)
    info = info_of(response)
    assert (response.status_code, info.outcomes) == (201, ("503", "409", "201"))
    assert response.json() == {"charge": 1}
    assert proxy.keys() == [info.key] * 3


def test_elapsed_is_set_as_in_plain_httpx(stack: Stack, clock: FakeClock) -> None:
    """``response.elapsed`` works on what ``Client`` returns, as on plain httpx responses:
    read in the loop, retried, checked for the in-progress problem, or streamed."""
    with (
        faulty_proxy(stack.url, [Answer(503), IN_PROGRESS, "pass", IN_PROGRESS]) as proxy,
        Client(retry=policy(clock)) as client,
    ):
        retried = client.post(proxy.url + "/charge", json=CHARGE)
        plain = client.get(stack.url + "/item")
        with client.stream("POST", proxy.url + "/charge", json=CHARGE) as streamed:
            streamed.read()
    assert info_of(retried).outcomes == ("503", "409", "201")
    assert info_of(streamed).outcomes == ("409", "201")
    for response in (retried, plain, streamed):
        assert response.elapsed.total_seconds() > 0


@pytest.mark.anyio
async def test_async_client_reads_responses_as_httpx_does(stack: Stack, clock: FakeClock) -> None:
    """``AsyncClient``: ``elapsed`` is set, an inner transport's already read responses are
    handed on, and a streamed 409 over 64 KiB streams whole (the bytes read to check it,
    then the rest)."""
    padded = IN_PROGRESS_BODY + b" " * (100 * 1024)
    script: list[Fault] = [Answer(503), IN_PROGRESS, "pass", Answer(409, PROBLEM, padded)]
    with faulty_proxy(stack.url, script) as proxy:
        async with AsyncClient(retry=policy(clock)) as client:
            retried = await client.post(proxy.url + "/charge", json=CHARGE)
            async with client.stream("POST", proxy.url + "/charge", json=CHARGE) as streamed:
                chunks = [chunk async for chunk in streamed.aiter_bytes()]
        async with httpx.AsyncClient(timeout=5) as relay:

            async def send(request: httpx.Request) -> httpx.Response:
                return await relay.send(request)

            transport = httpx.MockTransport(send)
            async with AsyncClient(retry=policy(clock), transport=transport) as client:
                relayed = await client.post(proxy.url + "/charge", json=CHARGE)
    assert info_of(retried).outcomes == ("503", "409", "201")
    assert retried.elapsed.total_seconds() > 0
    assert (streamed.status_code, info_of(streamed).attempts) == (409, 1)
    assert b"".join(chunks) == padded
    assert streamed.elapsed.total_seconds() > 0
    assert (relayed.status_code, relayed.json()) == (201, {"charge": 2})


# --- the policy alone (sans I/O) ---------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter_and_a_cap() -> None:
    """The n-th retry waits ``jitter() * min(max_backoff, backoff * 2**(n-1))``."""
    top = RetryPolicy(jitter=lambda: 1.0, backoff=0.5, max_backoff=6)
    assert [top.backoff_for(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    assert RetryPolicy(jitter=lambda: 0.0).backoff_for(5) == 0.0
    spread = RetryPolicy()
    assert all(0 <= spread.backoff_for(3) <= 2.0 for _ in range(200))
    assert len({spread.backoff_for(3) for _ in range(50)}) > 1


def test_plan_drives_any_transport() -> None:
    """The loop is a generator of steps: a driver sends, reports outcomes and sleeps; the plan
    alone decides (here: a reset, then a 503 with Retry-After, then a 201)."""
    clock = FakeClock()
    plan = RetryPolicy(clock=clock, jitter=lambda: 0.5).plan(Call("POST", "k"))
    step = advance(plan, None)
    assert step == Attempt(1, 60.0)
    step = advance(plan, Failed(Reach.MAYBE_SENT, "ReadError"))
    assert step == Wait(0.25)
    clock.now += 0.25
    assert advance(plan, None) == Attempt(2, 59.75)
    assert advance(plan, Answered(503, retry_after="3")) == Wait(3.0)
    assert isinstance(advance(plan, None), Attempt)
    info = advance(plan, Answered(201, replayed=True))
    assert info == RetryInfo(3, "k", True, (0.25, 3.0), ("ReadError", "503", "201"), "final")


def test_fatal_errors_and_unsafe_calls_stop_at_once() -> None:
    """A fatal error is never retried; a maybe-sent failure of an unkeyed POST is not either,
    while the same failure of a not-sent request is."""
    policy_ = RetryPolicy()
    fatal = Failed(Reach.FATAL, "UnsupportedProtocol")
    maybe = Failed(Reach.MAYBE_SENT, "ReadError")
    not_sent = Failed(Reach.NOT_SENT, "ConnectError")
    assert not policy_.is_retryable(fatal)
    assert not policy_.is_safe(Call("POST", None), maybe)
    assert policy_.is_safe(Call("POST", None), not_sent)
    assert policy_.is_safe(Call("PUT", None), maybe)
    assert not policy_.is_safe(Call("POST", "k", replayable=False), maybe)
    assert policy_.is_safe(Call("POST", "k", replayable=False), not_sent)
