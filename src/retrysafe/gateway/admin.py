"""The gateway's operations surface: Prometheus metrics, the health endpoint, the access log.

With several workers, each process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode; the gateway's server sets it to a private temporary
directory) and any worker's ``/metrics`` adds them all up. Without that variable (the app run
in-process), the process's own registry is served.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from ..errors import CorruptRecord, StoreError
from ..hooks import Decision
from ..records import Record, State
from ..stores import Store
from ..stores.base import StoreStats
from .proxy import RouteTable

__all__ = ["Metrics", "TimedStore", "access_logger", "log_access"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

access_logger = logging.getLogger("retrysafe.gateway.access")


class Metrics:
    """The gateway's counters and histograms (label children cached: the hot path)."""

    def __init__(self, routes: RouteTable) -> None:
        # Imported here, not at module level: the multiprocess directory must be set first.
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.routes = routes
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.decisions = Counter(
            "retrysafe_gateway_decisions",
            "Idempotency decisions, by event (executed, stored, replayed, ...) and route.",
            ["event", "route"],
            registry=registry,
        )
        self.responses = Counter(
            "retrysafe_gateway_responses",
            "Responses sent to clients, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "retrysafe_gateway_store_seconds",
            "Time taken by ledger operations, by operation.",
            ["operation"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_seconds = Histogram(
            "retrysafe_gateway_upstream_seconds",
            "Time from forwarding a request to the upstream's response head, by route.",
            ["route"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_errors = Counter(
            "retrysafe_gateway_upstream_errors",
            "Upstream failures, by route and kind (connect, timeout, closed, protocol).",
            ["route", "kind"],
            registry=registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- what the gateway reports ---------------------------------------------------------------

    def decision(self, decision: Decision) -> None:
        """An engine hook: count every decision by event and route."""
        route = self.routes.lookup(decision.path).label
        self._child(self.decisions, decision.event.value, route).inc()

    def response(self, route: str, status: int) -> None:
        self._child(self.responses, route, str(status)).inc()

    def store_call(self, operation: str, seconds: float) -> None:
        self._child(self.store_seconds, operation).observe(seconds)

    def upstream_done(self, route: str, seconds: float) -> None:
        self._child(self.upstream_seconds, route).observe(seconds)

    def upstream_failed(self, route: str, kind: str) -> None:
        self._child(self.upstream_errors, route, kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition document and its content type, every worker's samples summed."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST


class TimedStore(Store):
    """A store that reports how long each request-path operation took."""

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.poll_interval = inner.poll_interval

    async def claim(
        self,
        rid: bytes,
        token: int,
        fingerprint: bytes,
        lease: float,
        ttl: float,
        *,
        scope: bytes = b"",
    ) -> Record | None:
        started = time.perf_counter()
        try:
            return await self.inner.claim(rid, token, fingerprint, lease, ttl, scope=scope)
        finally:
            self.metrics.store_call("claim", time.perf_counter() - started)

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        started = time.perf_counter()
        try:
            return await self.inner.renew(rid, token, lease)
        finally:
            self.metrics.store_call("renew", time.perf_counter() - started)

    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        started = time.perf_counter()
        try:
            return await self.inner.complete(rid, token, state, response, ttl)
        finally:
            self.metrics.store_call("complete", time.perf_counter() - started)

    async def release(self, rid: bytes, token: int) -> bool:
        started = time.perf_counter()
        try:
            return await self.inner.release(rid, token)
        finally:
            self.metrics.store_call("release", time.perf_counter() - started)

    async def get(self, rid: bytes) -> Record | None:
        return await self.inner.get(rid)

    async def delete(self, rid: bytes) -> bool:
        return await self.inner.delete(rid)

    async def purge_expired(self, limit: int = 1000) -> int:
        return await self.inner.purge_expired(limit)

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        return await self.inner.scan(cursor, limit)

    async def stats(self) -> StoreStats:
        return await self.inner.stats()

    async def wait(self, rid: bytes, timeout: float) -> None:  # noqa: ASYNC109
        await self.inner.wait(rid, timeout)

    async def initialize(self) -> None:
        await self.inner.initialize()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def store_health(store: Store) -> str | None:
    """None if the ledger answers a read, else why not."""
    try:
        await store.get(b"\0" * 32)
    except (StoreError, CorruptRecord) as exc:
        return str(exc)
    return None


def log_access(
    client: Iterable[Any] | None,
    method: str,
    path: str,
    status: int,
    seconds: float,
    route: str,
    replayed: bool,
) -> None:
    """One JSON line per request on ``retrysafe.gateway.access`` (no query, key or credentials)."""
    address = list(client) if client else None
    access_logger.info(
        json.dumps(
            {
                "time": round(time.time(), 3),
                "client": f"{address[0]}:{address[1]}" if address else None,
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "replayed": replayed,
                "duration_ms": round(seconds * 1000, 3),
            },
            separators=(",", ":"),
        )
    )
