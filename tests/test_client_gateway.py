"""The retrying client through the retrysafe gateway (issue 4): a plain, unprotected app behind
the gateway, the faulty proxy in front of it; the gateway's ledger makes the retries safe."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_servers import Answer, CountingApp, FakeClock, Fault, faulty_proxy
from servers import serve_in_thread

from retrysafe import Client, RetryPolicy, retry_info

gateway = pytest.importorskip("retrysafe.gateway.app", reason="the gateway is not built yet")


@pytest.fixture
def through_gateway() -> Iterator[tuple[CountingApp, str]]:
    """(the app, the gateway's URL): uvicorn runs the bare app and, in front, the gateway."""
    app = CountingApp()
    with serve_in_thread(app) as upstream:
        settings = gateway.load_settings(upstream=upstream, store="memory://")
        with serve_in_thread(gateway.Gateway(settings)) as url:
            yield app, url


def test_lost_responses_through_the_gateway_are_replayed(
    through_gateway: tuple[CountingApp, str],
) -> None:
    """A lost response, a timeout and a 503 between client and gateway: the client retries
    with one key, the gateway executes the upstream once and replays its answer."""
    app, url = through_gateway
    clock = FakeClock()
    policy = RetryPolicy(clock=clock, jitter=lambda: 0.5)
    faults: list[Fault] = ["lose", "stall", Answer(503, (("retry-after", "2"),))]
    with faulty_proxy(url, faults) as proxy, Client(retry=policy, timeout=0.5) as client:
        response = client.post(proxy.url + "/charge", json={"amount": 4200})
    info = retry_info(response)
    assert info is not None
    assert response.status_code == 201
    assert response.json() == {"charge": 1}
    assert info.outcomes == ("RemoteProtocolError", "ReadTimeout", "503", "201")
    assert info.replayed
    assert clock.sleeps == [0.25, 0.5, 2.0]
    assert proxy.keys() == [info.key] * 4
    assert app.keys() == [info.key]


def test_two_operations_through_the_gateway_execute_twice(
    through_gateway: tuple[CountingApp, str],
) -> None:
    """Each call has its own key: two charges are two executions, none replayed."""
    app, url = through_gateway
    with Client(retry=RetryPolicy(clock=FakeClock())) as client:
        first = client.post(url + "/charge", json={"amount": 1})
        second = client.post(url + "/charge", json={"amount": 1})
    one, two = retry_info(first), retry_info(second)
    assert one is not None
    assert two is not None
    assert one.key != two.key
    assert (one.replayed, two.replayed) == (False, False)
    assert app.keys() == [one.key, two.key]
