"""Real clients through the gateway on a network that loses answers, and several gateways on
one ledger: every logical operation executes once upstream.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import stripe
from conftest import fresh_url
from gateway_support import DropRelay, Process, Upstream, run_gateway, run_upstream

REPLAYED = "idempotent-replayed"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with run_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    directory = tmp_path_factory.mktemp("gateway")
    store = fresh_url("sqlite", directory)
    with run_gateway(upstream.url, directory, "--store", store) as process:
        yield process


@pytest.fixture
def lossy(gateway: Process) -> Iterator[DropRelay]:
    """The gateway behind a network that loses the first answer to each keyed request."""
    relay = DropRelay(gateway.port, drops=1)
    yield relay
    relay.close()


def test_stripe_sdk_retries_through_lost_answers_and_charges_once(
    lossy: DropRelay, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official Stripe SDK (its own keys, its own retries) against a fake Stripe behind the
    gateway: each answer lost once, every charge made exactly once, each caller gets its own."""
    monkeypatch.setattr(stripe._http_client.HTTPClient, "INITIAL_DELAY", 0.05)
    monkeypatch.setattr(stripe._http_client.HTTPClient, "MAX_DELAY", 0.2)
    client = stripe.StripeClient(
        "sk_test_gateway", base_addresses={"api": lossy.url}, max_network_retries=4
    )
    orders = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    charges = [
        client.v1.charges.create(
            params={"amount": 100 + i, "currency": "usd", "metadata": {"order": order}}
        )
        for i, order in enumerate(orders)
    ]
    assert [c.amount for c in charges] == [100 + i for i in range(6)]
    assert len({c.id for c in charges}) == 6
    assert len(lossy.dropped) == 6  # every operation lost an answer and was retried
    executions = upstream.executions(path="/v1/charges")
    by_key = Counter(row[2] for row in executions)
    assert sorted(by_key) == sorted(k.decode() for k in lossy.dropped)
    assert set(by_key.values()) == {1}


def test_curl_retries_through_lost_answers_and_executes_once(
    lossy: DropRelay, upstream: Upstream
) -> None:
    """curl --retry with a fixed key: the lost answer is retried, the retry is a replay."""
    keys = [f"curl-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    commands = [
        [
            "curl", "-sS", "-i", "--retry", "3", "--retry-all-errors", "--retry-delay", "1",
            "-X", "POST", "-H", f"Idempotency-Key: {key}", "-d", "amount=250",
            f"{lossy.url}/v1/charges",
        ]
        for key in keys
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands
    ]
    outputs = [p.communicate(timeout=60) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        head, _, body = out.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200")
        assert "idempotent-replayed: true" in head.lower()
        assert json.loads(body)["amount"] == 250
    for key in keys:
        assert len(upstream.executions(key=key)) == 1


@pytest.fixture
def two_gateways(upstream: Upstream, tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    """Two gateway instances (one of them with two workers) sharing one Redis ledger."""
    store = fresh_url("redis", tmp_path)
    with (
        run_gateway(upstream.url, tmp_path / "a", "--store", store, "--workers", "2") as a,
        run_gateway(upstream.url, tmp_path / "b", "--store", store) as b,
    ):
        yield a, b


def test_two_gateways_on_one_redis_act_as_one(
    two_gateways: tuple[Process, Process], upstream: Upstream
) -> None:
    """Duplicates sprayed at both instances at once: executions == keys, and afterwards every
    duplicate on either instance replays the one answer."""
    a, b = two_gateways
    keys = [f"spray-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    shots = [(key, (a, b)[i % 2]) for key in keys for i in range(6)]
    barrier = threading.Barrier(len(shots))

    def shoot(shot: tuple[str, Process]) -> httpx.Response:
        key, gateway = shot
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            return client.post(
                f"{gateway.url}/spray", headers={"Idempotency-Key": key, "x-delay": "0.3"}
            )

    with ThreadPoolExecutor(len(shots)) as pool:
        responses = list(pool.map(shoot, shots))
    assert {r.status_code for r in responses} <= {200, 409}
    executions = Counter(row[2] for row in upstream.executions(path="/spray"))
    assert {key: executions[key] for key in keys} == dict.fromkeys(keys, 1)
    originals = {
        key: r for (key, _), r in zip(shots, responses, strict=True)
        if r.status_code == 200 and REPLAYED not in r.headers
    }  # fmt: skip
    assert sorted(originals) == sorted(keys)
    for key in keys:
        for gateway in (a, b):
            again = httpx.post(f"{gateway.url}/spray", headers={"Idempotency-Key": key})
            assert again.headers[REPLAYED] == "true"
            assert again.content == originals[key].content
