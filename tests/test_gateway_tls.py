"""The gateway in front of an https:// upstream: certificates checked against the configured
authority, refused when they do not verify (502, key released), settings checked at start.
Real processes: uvicorn serving TLS with a certificate from a throwaway test authority.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from gateway_support import Upstream, run_gateway, run_upstream

from retrysafe.errors import ConfigError
from retrysafe.gateway.config import UpstreamSettings, load_settings

REPLAYED = "idempotent-replayed"


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A test authority's certificate for 127.0.0.1: (certificate, key, authority's PEM)."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_pem = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return cert, key, ca_pem


@pytest.fixture(scope="module")
def upstream(
    authority: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    with run_upstream(tmp_path_factory.mktemp("upstream"), tls=authority) as server:
        yield server


def test_https_upstream_is_verified_and_the_contract_holds(
    upstream: Upstream, authority: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """With the authority as ca_file, a keyed POST runs once over TLS and its retry replays."""
    config = f'[upstream]\nca_file = "{authority[2]}"\n'
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    with run_gateway(upstream.url, tmp_path, "--store", store, config=config) as gateway:
        path, key = f"/things/{uuid.uuid4().hex}", uuid.uuid4().hex
        first = httpx.post(gateway.url + path, headers={"Idempotency-Key": key}, content=b"x")
        again = httpx.post(gateway.url + path, headers={"Idempotency-Key": key}, content=b"x")
    assert first.status_code == 200, first.text
    seen = dict(first.json()["headers"])
    assert seen["host"] == f"127.0.0.1:{upstream.port}"
    assert seen["idempotency-key"] == key
    assert again.headers[REPLAYED] == "true"
    assert again.content == first.content
    assert len(upstream.executions(path=path)) == 1


def test_an_unverified_certificate_is_refused_with_502_and_the_key_released(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Without the authority the handshake fails: 502 "not sent", nothing ran, key released."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    with run_gateway(upstream.url, tmp_path, "--store", store) as gateway:
        path = f"/things/{uuid.uuid4().hex}"
        for _ in range(2):
            response = httpx.post(gateway.url + path, headers={"Idempotency-Key": "k"})
            assert response.status_code == 502
            problem = response.json()
            assert problem["type"].endswith("upstream-unavailable")
            assert "was not sent" in problem["detail"]
            assert "certificate" in problem["detail"].lower()
            assert REPLAYED not in response.headers
    assert upstream.executions(path=path) == []


def test_verify_false_accepts_any_certificate(upstream: Upstream, tmp_path: Path) -> None:
    """verify = false (for test rigs) forwards to an upstream whose certificate is unknown."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = "[upstream]\nverify = false\n"
    with run_gateway(upstream.url, tmp_path, "--store", store, config=config) as gateway:
        response = httpx.post(gateway.url + "/things/plain")
    assert response.status_code == 200, response.text


def test_default_https_port_is_left_out_of_the_host_header() -> None:
    """https://host (port 443) sends ``Host: host``; another port is named."""
    assert UpstreamSettings("https://api.example").host_header == b"api.example"
    assert UpstreamSettings("https://api.example").port == 443
    assert UpstreamSettings("https://api.example:8443").host_header == b"api.example:8443"
    assert UpstreamSettings("http://api.example:443").host_header == b"api.example:443"


@pytest.mark.parametrize(
    ("upstream", "text", "words"),
    [
        ("http://127.0.0.1:9", 'ca_file = "ca.pem"', "need an https:// upstream"),
        ("https://127.0.0.1:9", 'ca_file = "/nonexistent/ca.pem"', "cannot load"),
        ("https://127.0.0.1:9", 'key_file = "key.pem"', "key_file needs cert_file"),
        ("ftp://127.0.0.1:9", "", "http:// or https://"),
    ],
)
def test_tls_settings_are_checked_at_start(
    tmp_path: Path, upstream: str, text: str, words: str
) -> None:
    """TLS options on http://, unreadable files, a key without a certificate: refused at start."""
    path = tmp_path / "gateway.toml"
    path.write_text(f"[upstream]\n{text}\n")
    with pytest.raises(ConfigError, match=words):
        load_settings(path, upstream=upstream)


def test_mutual_tls_presents_the_client_certificate(
    authority: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """An upstream demanding client certificates is reached with cert_file/key_file; without
    them the handshake fails and the gateway answers 502."""
    cert, key, ca = authority
    with run_upstream(tmp_path / "upstream", tls=authority, client_certs=True) as upstream:
        store = f"sqlite:///{tmp_path / 'ledger.db'}"
        mutual = f'[upstream]\nca_file = "{ca}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        with run_gateway(upstream.url, tmp_path / "a", "--store", store, config=mutual) as gw:
            assert httpx.post(gw.url + "/things/mutual").status_code == 200
        plain = f'[upstream]\nca_file = "{ca}"\n'
        with run_gateway(upstream.url, tmp_path / "b", "--store", store, config=plain) as gw:
            assert httpx.post(gw.url + "/things/anonymous").status_code == 502
        assert len(upstream.executions(path="/things/mutual")) == 1
        assert upstream.executions(path="/things/anonymous") == []
