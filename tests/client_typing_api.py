"""Typing checks of the client's public API: mypy --strict must accept this file (pytest never
runs it). It pins the shapes users write against."""

from __future__ import annotations

from pathlib import Path

import httpx
import requests

from retrysafe import (
    AsyncClient,
    AsyncRetryTransport,
    Client,
    KeyJournal,
    RetryAdapter,
    RetryInfo,
    RetryPolicy,
    RetrySession,
    RetryTransport,
    retry_info,
)

policy = RetryPolicy(attempts=3, deadline=10.0, max_retry_after=5, key_methods={"POST"})
journal = KeyJournal(Path("keys.db"), retention=3600, synchronous="NORMAL")


def sync_call() -> RetryInfo | None:
    with Client(base_url="https://api.example", timeout=5, retry=policy, journal=journal) as c:
        response: httpx.Response = c.post("/v1/charges", json={"a": 1}, operation="o/charge")
        c.patch("/v1/charges/1", json={"a": 2}, headers={"X-Trace": "1"})
        c.request("POST", "/v1/refunds", content=b"{}", timeout=3.0)
        c.get("/v1/charges")
    return retry_info(response)


async def async_call() -> int:
    async with AsyncClient(retry=policy, journal="keys.db") as client:
        response = await client.post("https://api.example/v1", json={}, operation="o/charge")
    info = retry_info(response)
    return 0 if info is None else info.attempts


transports = (
    httpx.Client(transport=RetryTransport(httpx.HTTPTransport(retries=0), policy=policy)),
    httpx.AsyncClient(transport=AsyncRetryTransport(read_body=True)),
)


def requests_call() -> bool:
    session = requests.Session()
    session.mount("https://", RetryAdapter(policy=policy))
    with RetrySession(retry=policy, journal=journal) as retrying:
        response: requests.Response = retrying.post("https://api.example", json={}, operation="x")
    info = retry_info(response)
    return info is not None and info.replayed
