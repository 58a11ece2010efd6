"""A slow shared ledger degrades latency, never correctness.

The real Redis and PostgreSQL sit behind a relay (tests/servers.py) that holds every chunk
for 20 ms each way, so that each ledger operation takes tens of milliseconds. Concurrent
duplicates must still execute once, and a handler that runs for several leases must keep
its claim through the slow heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import drop_postgres_table, fresh_url
from servers import Receive, Relay, Scope, Send, serve_in_thread

from retrysafe import Event, IdempotencyMiddleware

DELAY = 0.02
LEASE = 1.0
SLOW_HANDLER = 2.5
"""Longer than two leases: only renewals through the slow ledger keep the claim."""


@pytest.fixture(params=["redis", "postgres"])
def slow_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger URL whose server answers through a 20 ms relay."""
    url = fresh_url(request.param, tmp_path)
    parts = urlsplit(url)
    default_port = 5432 if request.param == "postgres" else 6379
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or default_port, delay=DELAY)
    try:
        yield parts._replace(
            netloc=parts.netloc.replace(f":{parts.port}", f":{relay.port}")
        ).geturl()
    finally:
        relay.close()
        if request.param == "postgres":
            drop_postgres_table(url)


class Handler:
    """Counts executions per key; the key ``slow-*`` runs for SLOW_HANDLER seconds."""

    def __init__(self) -> None:
        self.executions: Counter[str] = Counter()
        self.lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        key = dict(scope["headers"])[b"idempotency-key"].decode()
        with self.lock:
            self.executions[key] += 1
        await asyncio.sleep(SLOW_HANDLER if key.startswith("slow-") else 0.05)
        body = json.dumps({"key": key, "nonce": uuid.uuid4().hex}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_a_slow_ledger_still_executes_each_key_once(slow_ledger: str) -> None:
    """Through a slow ledger, 10 keys x 6 concurrent duplicates and a handler outliving two
    leases execute once per key; every retry gets that one answer."""
    handler = Handler()
    keys = [f"key-{i}" for i in range(10)] + [f"slow-{uuid.uuid4().hex[:8]}"]
    layer = IdempotencyMiddleware(handler, store=slow_ledger, lease=LEASE)
    bodies: dict[str, set[bytes]] = defaultdict(set)
    with serve_in_thread(layer) as base, httpx.Client(base_url=base, timeout=60) as client:

        def post(key: str) -> tuple[str, httpx.Response]:
            return key, client.post("/orders", headers={"Idempotency-Key": key}, json={})

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(post, [key for _ in range(6) for key in keys]))
            # Duplicates of the slow key while it runs, across its lease renewals.
            slow = keys[-1]
            answers += list(pool.map(post, [slow] * 6))
        for key, response in answers:
            assert response.status_code in {201, 409}, (key, response.status_code, response.text)
            if response.status_code == 409:
                assert response.json()["type"].endswith("in-progress")
            else:
                bodies[key].add(response.content)
        for key in keys:
            for _ in range(100):
                _, response = post(key)
                if response.status_code != 409:
                    break
                threading.Event().wait(0.1)
            assert response.status_code == 201, (key, response.text)
            bodies[key].add(response.content)
            assert len(bodies[key]) == 1, f"{key} got {len(bodies[key])} different answers"
    assert handler.executions == Counter(dict.fromkeys(keys, 1))
    assert layer.engine.counts[Event.LEASE_LOST] == 0
    assert layer.engine.counts[Event.STORE_ERROR] == 0
