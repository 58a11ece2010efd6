"""The gateway as a reverse proxy: faithful forwarding, upstream failures, configuration errors,
operations (health, metrics, access log) and graceful shutdown. Real processes throughout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import Upstream, gateway_command, run_gateway, run_upstream, stop
from servers import Relay, free_port, poll_until

from retrysafe.errors import ConfigError
from retrysafe.gateway.config import load_settings

REPLAYED = "idempotent-replayed"


def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with run_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def relay(upstream: Upstream) -> Iterator[Relay]:
    """A switchable relay between the gateway and the upstream."""
    relay = Relay("127.0.0.1", upstream.port)
    yield relay
    relay.close()


CONFIG = """
[gateway]
admin_prefix = "/_ops"

[upstream]
read_timeout = 1
connect_timeout = 1

[[routes]]
path = "/keep/**"
upstream_failure = "keep"

[[routes]]
path = "/patient/**"
read_timeout = 5
"""


@pytest.fixture(scope="module")
def gateway(relay: Relay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A gateway reaching the upstream through the relay (read timeout 1 s, admin at /_ops)."""
    directory = tmp_path_factory.mktemp("gateway")
    store = f"sqlite:///{directory / 'ledger.db'}"
    with run_gateway(
        f"http://127.0.0.1:{relay.port}", directory, "--store", store,
        config=CONFIG, health="/_ops/health",
    ) as process:  # fmt: skip
        yield process.url, process.log_path


def echo(response: httpx.Response) -> dict[str, object]:
    document: dict[str, object] = response.json()
    return document


# -- forwarding ------------------------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_set(
    gateway: tuple[str, Path], upstream: Upstream
) -> None:
    """Connection-named, hop-by-hop and proxy headers stop at the gateway; Host, X-Forwarded-*,
    Forwarded and Via are set; the key and end-to-end headers reach the upstream."""
    url, _ = gateway
    headers = [
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Proxy-Authorization", "Basic eA=="), ("X-End", "a"),
        ("X-End", "b"), ("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7"),
        ("Idempotency-Key", uid()), ("Authorization", "Bearer t"),
    ]  # fmt: skip
    response = httpx.post(url + "/echo?a=1&b=%20", headers=headers, content=b"payload")
    seen = [(n, v) for n, v in echo(response)["headers"]]  # type: ignore[attr-defined]
    names = [n for n, _ in seen]
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "connection"):
        assert hop not in names, hop
    assert [v for n, v in seen if n == "x-end"] == ["a", "b"]
    got = dict(seen)
    assert got["host"].startswith("127.0.0.1:")  # the upstream's own name, by default
    assert got["host"] != url.removeprefix("http://")
    assert got["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == url.removeprefix("http://")
    assert got["forwarded"].startswith("for=203.0.113.7, for=127.0.0.1;proto=http;host=")
    assert got["via"] == "1.1 retrysafe"
    assert "idempotency-key" in got
    assert got["authorization"] == "Bearer t"
    assert echo(response)["body"] == "payload"
    assert echo(response)["query"] == "a=1&b=%20"
    assert response.headers["via"] == "1.1 retrysafe"


def test_the_key_reaches_the_upstream_even_when_connection_names_it(
    gateway: tuple[str, Path],
) -> None:
    """``Connection: Idempotency-Key`` cannot strip the key on its way to the upstream."""
    url, _ = gateway
    key = uid()
    headers = [("Connection", "keep-alive, Idempotency-Key"), ("Idempotency-Key", key)]
    response = httpx.post(url + "/echo", headers=headers, content=b"payload")
    assert dict(echo(response)["headers"]).get("idempotency-key") == key  # type: ignore[call-overload]


def test_client_forwarding_claims_never_reach_the_upstream(gateway: tuple[str, Path]) -> None:
    """X-Real-IP and X-Forwarded-Port/-Prefix/-Server/-Host/-Proto from the client are dropped
    (an upstream trusting its proxy would believe them); only the gateway's own are sent."""
    url, _ = gateway
    headers = [
        ("X-Real-IP", "203.0.113.9"), ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Prefix", "/admin"), ("X-Forwarded-Server", "evil"),
        ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "203.0.113.9"),
    ]  # fmt: skip
    received = echo(httpx.get(url + "/claims", headers=headers))["headers"]
    assert isinstance(received, list)
    seen = {name: value for name, value in received}
    for name in ("x-real-ip", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server"):
        assert name not in seen, name
    assert seen["x-forwarded-host"] == url.removeprefix("http://")
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


def test_raw_path_and_query_are_forwarded_unchanged(gateway: tuple[str, Path]) -> None:
    """Percent-encoding in the path and query reaches the upstream as the client wrote it."""
    url, _ = gateway
    response = httpx.get(url + "/a%2Fb/c%20d?x=%2F&y=1&y=2")
    assert echo(response)["raw_path"] == "/a%2Fb/c%20d"
    assert echo(response)["query"] == "x=%2F&y=1&y=2"


def test_request_and_response_bodies_stream_both_ways(gateway: tuple[str, Path]) -> None:
    """A chunked upload of unknown length arrives whole; a 5 MB answer streams back whole."""
    url, _ = gateway

    def upload() -> Iterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * 10_000

    response = httpx.post(url + "/upload", content=upload(), timeout=30)
    body = echo(response)["body"]
    assert isinstance(body, str)
    assert len(body) == 500_000
    with httpx.stream("POST", url + "/big", headers={"x-size": "5000000"}, timeout=30) as big:
        received = sum(len(chunk) for chunk in big.iter_raw())
    assert received == 5_000_000


def test_head_and_empty_responses_keep_the_connection_usable(gateway: tuple[str, Path]) -> None:
    """HEAD, 204 and 304 answers carry no body and do not upset the next exchange."""
    url, _ = gateway
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            assert client.head("/anything").status_code == 200
            assert client.get("/x", headers={"x-status": "204"}).status_code == 204
            assert client.get("/x", headers={"x-status": "304"}).status_code == 304
            assert client.get("/x").json()["path"] == "/x"


# -- upstream failures -------------------------------------------------------------------------


def assert_problem(response: httpx.Response, slug: str, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(slug)
    assert response.json()["status"] == status


def test_unreachable_upstream_gives_502_and_releases_the_key(
    gateway: tuple[str, Path], relay: Relay, upstream: Upstream
) -> None:
    """Upstream down: 502 upstream-unavailable (not executed); the retry runs once it is back."""
    url, _ = gateway
    path, key = f"/things/{uid()}", uid()
    relay.cut("down")
    try:
        response = httpx.post(url + path, headers={"Idempotency-Key": key})
        assert_problem(response, "upstream-unavailable", 502)
    finally:
        relay.restore()
    retry = httpx.post(url + path, headers={"Idempotency-Key": key})
    assert retry.status_code == 200
    assert REPLAYED not in retry.headers
    assert len(upstream.executions(path=path)) == 1


def test_upstream_timeout_gives_504_and_releases_the_key(
    gateway: tuple[str, Path], upstream: Upstream
) -> None:
    """No answer within the read timeout: 504 upstream-timeout; by default the key is released
    and the retry executes again (the documented window: the upstream may have run twice)."""
    url, _ = gateway
    path, key = f"/things/{uid()}", uid()
    response = httpx.post(url + path, headers={"Idempotency-Key": key, "x-delay": "3"})
    assert_problem(response, "upstream-timeout", 504)
    assert "may have executed" in response.json()["detail"]
    retry = httpx.post(url + path, headers={"Idempotency-Key": key})
    assert retry.status_code == 200
    assert REPLAYED not in retry.headers


def test_keep_policy_stores_the_timeout_so_the_upstream_never_runs_twice(
    gateway: tuple[str, Path], upstream: Upstream
) -> None:
    """With upstream_failure = "keep", the 504 is the key's outcome: retries replay it and
    the upstream is not called again."""
    url, _ = gateway
    path, key = f"/keep/{uid()}", uid()
    first = httpx.post(url + path, headers={"Idempotency-Key": key, "x-delay": "3"})
    assert_problem(first, "upstream-timeout", 504)
    again = httpx.post(url + path, headers={"Idempotency-Key": key, "x-delay": "3"})
    assert again.status_code == 504
    assert again.headers[REPLAYED] == "true"
    assert again.content == first.content
    assert len(upstream.executions(path=path)) == 1


def test_keep_policy_still_releases_when_the_request_was_never_sent(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A refused connection cannot have executed anything: even "keep" releases the key."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = '[idempotency]\nupstream_failure = "keep"\n'
    closed = f"http://127.0.0.1:{free_port()}"
    with run_gateway(closed, tmp_path, "--store", store, config=config) as process:
        for _ in range(2):
            response = httpx.post(process.url + "/things", headers={"Idempotency-Key": "k"})
            assert_problem(response, "upstream-unavailable", 502)
            assert "was not sent" in response.json()["detail"]
            assert REPLAYED not in response.headers


def test_read_timeout_is_per_route(gateway: tuple[str, Path]) -> None:
    """A route with a longer read timeout waits for a slow upstream the default would drop."""
    url, _ = gateway
    response = httpx.post(url + f"/patient/{uid()}", headers={"x-delay": "1.5"}, timeout=10)
    assert response.status_code == 200


# -- operations -----------------------------------------------------------------------------------


def test_admin_endpoints_live_under_their_prefix_only(
    gateway: tuple[str, Path], upstream: Upstream
) -> None:
    """/_ops/health and /_ops/metrics are the gateway's; /health and /metrics are the
    upstream's, forwarded as any other path."""
    url, _ = gateway
    health = httpx.get(url + "/_ops/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert httpx.get(url + "/_ops/ready").json() == {
        "status": "ok", "ledger": "ok", "upstream": "ok",
    }  # fmt: skip
    assert httpx.get(url + "/health").text == "upstream ok"
    path = f"/metrics-{uid()}"
    assert httpx.get(url + "/metrics").json()["path"] == "/metrics"
    assert httpx.get(url + "/_retrysafe/metrics").json()["path"] == "/_retrysafe/metrics"
    key = uid()
    httpx.post(url + path, headers={"Idempotency-Key": key})
    httpx.post(url + path, headers={"Idempotency-Key": key})
    metrics = httpx.get(url + "/_ops/metrics").text
    assert 'retrysafe_gateway_decisions_total{event="replayed",route="default"}' in metrics
    assert "retrysafe_gateway_store_seconds_count" in metrics
    assert "retrysafe_gateway_upstream_seconds_count" in metrics
    assert 'retrysafe_gateway_upstream_errors_total{kind="timeout"' in metrics or (
        'retrysafe_gateway_upstream_errors_total{route="default",kind="timeout"}' in metrics
    )


def test_access_log_is_json_without_query_key_or_credentials(gateway: tuple[str, Path]) -> None:
    """One JSON line per request: method, path, status, replayed; no query, key or token."""
    url, log_path = gateway
    key, secret, path = "k-" + uid(), "s-" + uid(), f"/logged/{uid()}"
    for _ in range(2):
        httpx.post(
            url + path + "?token=" + secret,
            headers={"Idempotency-Key": key, "Authorization": secret},
        )
    lines: list[str] = []

    def logged() -> bool:
        lines[:] = [ln for ln in log_path.read_text().splitlines() if path in ln]
        return len(lines) == 2

    poll_until(logged, timeout=10, what="two access log lines")
    entries = [json.loads(line) for line in lines]
    assert [e["replayed"] for e in entries] == [False, True]
    assert all(e["method"] == "POST" and e["status"] == 200 and e["path"] == path for e in entries)
    text = log_path.read_text()
    assert key not in text
    assert secret not in text


def test_metrics_add_up_across_workers(upstream: Upstream, tmp_path: Path) -> None:
    """With --workers 2, any worker's /metrics counts every worker's requests."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    with run_gateway(upstream.url, tmp_path, "--store", store, "--workers", "2") as process:
        pids = set()
        for _ in range(40):
            with httpx.Client() as client:  # a new connection each time: spread over workers
                pids.add(client.get(process.url + "/_retrysafe/health").json()["pid"])
                client.post(process.url + f"/count/{uid()}", headers={"Idempotency-Key": uid()})
        assert len(pids) == 2
        metrics = httpx.get(process.url + "/_retrysafe/metrics").text
    line = next(
        ln for ln in metrics.splitlines()
        if ln.startswith('retrysafe_gateway_decisions_total{event="stored"')
    )  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) == 40


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[gateway]\nupstream = "http://x:1"\nport = "eighty"\n', 3, "gateway.port"),
        ("[idempotency]\nttl = 10\nlease = -1\n", 3, "idempotency.lease"),
        ('[[routes]]\npath = "/a"\n\n[[routes]]\npath = "/b"\noutcome = "sometimes"\n', 6,
         "routes[2].outcome"),
        ('[[routes]]\npath = "/a"\nretries = 3\n', 3, "unknown setting 'retries'"),
        ('[[routes]]\npath = "a/b"\n', 2, "must start with '/'"),
        ('[[routes]]\nmethods = ["POST"]\n', 1, "needs a path"),
        ("[upstream]\nread_timeout = 0\n", 2, "upstream.read_timeout"),
        ('[limits]\nmax_request_body = 1.5\n', 2, "limits.max_request_body"),
        ("[idempotency\nttl = 1\n", 1, "not valid TOML"),
        ('[[routes]]\npath = "/x"\nstore_statuses = ["5xx"]\n', 3, "routes[1].store_statuses"),
        ("[gatway]\n", 1, "unknown section"),
        ('[gateway]\nport = 65536\n', 2, "gateway.port: must be <= 65535"),
        ('[gateway]\n\nstore = "sqlite:///x.db?foo=1"\n', 3, "gateway.store: "),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    """Every bad setting is refused at start with the file, the line and what is wrong."""
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, upstream="http://127.0.0.1:9")
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message


def test_the_command_refuses_a_bad_config_with_status_2(tmp_path: Path) -> None:
    """``retrysafe gateway --config bad.toml`` prints the error and exits 2 without serving."""
    path = tmp_path / "bad.toml"
    path.write_text('[[routes]]\npath = "/v1/**"\nwait = "long"\n')
    done = subprocess.run(
        gateway_command("http://127.0.0.1:9", free_port(), "--config", str(path)),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{path}:3: routes[1].wait: expected a number" in done.stderr


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ({"store": "mysql://x"}, "--store: unknown store URL"),
        ({"admin_prefix": "foo"}, "--admin-prefix: expected"),
        ({"port": 99999}, "--port: must be <= 65535"),
    ],
)
def test_flags_are_checked_as_the_files_settings_are(flag: dict[str, Any], words: str) -> None:
    """A bad --store, --admin-prefix or --port is refused at start, named by its flag."""
    with pytest.raises(ConfigError, match=words):
        load_settings(None, upstream="http://127.0.0.1:9", **flag)


def test_flags_override_the_file(tmp_path: Path) -> None:
    """--ttl, --lease and --require-key beat the file's [idempotency] values."""
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nupstream = "http://a:1"\n[idempotency]\nttl = 5\nlease = 5\n')
    settings = load_settings(path, ttl=60.0, require_key=True)
    assert settings.defaults["ttl"] == 60.0
    assert settings.defaults["lease"] == 5
    assert settings.defaults["require_key"] is True
    assert settings.upstream.host == "a"
    assert settings.upstream.port == 1


# -- shutdown -----------------------------------------------------------------------------------


def test_sigterm_lets_an_in_flight_request_finish(upstream: Upstream, tmp_path: Path) -> None:
    """SIGTERM during a request: it completes (and is recorded), then the gateway exits 0."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    path, key = f"/slow/{uid()}", uid()
    with run_gateway(upstream.url, tmp_path, "--store", store) as process:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, process.url + path,
                headers={"Idempotency-Key": key, "x-delay": "1"}, timeout=30,
            )  # fmt: skip
            poll_until(lambda: len(upstream.executions(path=path)) == 1, timeout=10)
            process.process.send_signal(signal.SIGTERM)
            response = pending.result()
        assert process.process.wait(timeout=20) == 0
    assert response.status_code == 200
    with run_gateway(upstream.url, tmp_path, "--store", store, name="again") as again:
        replay = httpx.post(again.url + path, headers={"Idempotency-Key": key, "x-delay": "1"})
    assert replay.headers[REPLAYED] == "true"
    assert replay.content == response.content


SHUTDOWN_ROUTES = (
    '[[routes]]\npath = "/keep/**"\nupstream_failure = "keep"\n'
    '[[routes]]\npath = "/stream/keep/**"\nupstream_failure = "keep"\n'
)


@pytest.mark.parametrize("prefix", ["/slow", "/keep"])
def test_shutdown_timeout_cuts_off_a_request_the_upstream_holds(
    upstream: Upstream, tmp_path: Path, prefix: str
) -> None:
    """A request still running when the shutdown timeout ends is cut off. By default with 503
    shutting-down and its key released: the retry on the next gateway executes instead of
    waiting out the lease. Under upstream_failure = "keep" the upstream may have run it: a
    502 that is kept and replayed, never sent a second time."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    path, key = f"{prefix}/{uid()}", uid()
    headers = {"Idempotency-Key": key, "x-delay": "30"}
    args = ("--store", store, "--shutdown-timeout", "0.5")
    config = SHUTDOWN_ROUTES
    with (
        run_gateway(upstream.url, tmp_path, *args, config=config) as process,
        ThreadPoolExecutor(1) as pool,
    ):
        pending = pool.submit(httpx.post, process.url + path, headers=headers, timeout=30)
        poll_until(lambda: len(upstream.executions(path=path)) == 1, timeout=10)
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=20) == 0
        cut = pending.result()
    with run_gateway(
        upstream.url, tmp_path, "--store", store, config=config, name="again"
    ) as again:
        retry = httpx.post(again.url + path, headers={**headers, "x-delay": "0"}, timeout=30)
    if prefix == "/slow":
        assert cut.status_code == 503
        assert cut.json()["type"].endswith("shutting-down")
        assert retry.status_code == 200
        assert REPLAYED not in retry.headers
        assert len(upstream.executions(path=path)) == 2
    else:
        assert cut.status_code == 502
        assert "may have executed" in cut.json()["detail"]
        assert retry.status_code == 502
        assert retry.headers[REPLAYED] == "true"
        assert len(upstream.executions(path=path)) == 1


@pytest.mark.parametrize(("prefix", "executions"), [("/stream/keep", 1), ("/stream", 2)])
def test_shutdown_timeout_mid_body_follows_the_route_upstream_failure(
    upstream: Upstream, tmp_path: Path, prefix: str, executions: int
) -> None:
    """A response still streaming when the shutdown timeout ends is cut short like an upstream
    breaking off: a keep route keeps it (the retry gets 410), a release route releases it."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    path, key = f"{prefix}/{uid()}", uid()
    args = ("--store", store, "--shutdown-timeout", "0.5")
    config = SHUTDOWN_ROUTES
    with run_gateway(upstream.url, tmp_path, *args, config=config) as process:
        headers = {"Idempotency-Key": key}
        with httpx.stream("POST", process.url + path, headers=headers, timeout=30) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            assert next(chunks).startswith(b"first-")
            process.process.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):
                b"".join(chunks)  # cut off: never a body that looks whole
        assert process.process.wait(timeout=20) == 0
    upstream.go(key)
    with run_gateway(
        upstream.url, tmp_path, "--store", store, config=config, name="again"
    ) as again:
        retry = httpx.post(again.url + path, headers=headers, timeout=30)
    if executions == 1:
        assert retry.status_code == 410
        assert retry.json()["type"].endswith("replay-unavailable")
    else:
        assert retry.status_code == 200
        assert REPLAYED not in retry.headers
    assert len(upstream.executions(path=path)) == executions


def test_gateway_needs_an_upstream(tmp_path: Path) -> None:
    """Without --upstream (nor one in the file) the command explains and exits 2."""
    done = subprocess.run(
        [sys.executable, "-m", "retrysafe", "gateway", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no upstream" in done.stderr


def test_stop_helper_reports_exit_status(upstream: Upstream, tmp_path: Path) -> None:
    """(helper) a gateway stopped with SIGINT exits 0 too."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    with run_gateway(upstream.url, tmp_path, "--store", store) as process:
        assert stop(process.process, signal.SIGINT) == 0
