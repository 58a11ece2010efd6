"""``retrysafe check`` through the gateway: a bare upstream behind ``retrysafe gateway`` passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from check_servers import Counting, PaymentsApp
from servers import serve_in_thread

from retrysafe.cli import main
from retrysafe.gateway import load_settings
from retrysafe.gateway.app import Gateway


def test_gateway_in_front_of_an_unprotected_api_passes_every_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The checker, aimed at the gateway over a bare API, finds every applicable rule kept."""
    upstream_app = Counting(PaymentsApp())
    report = tmp_path / "report.json"
    with serve_in_thread(upstream_app) as upstream:
        gateway = Gateway(load_settings(upstream=upstream, store="memory://"))
        with serve_in_thread(gateway) as url:
            status = main(
                [
                    "check", url + "/v1/charges", "-d", '{"amount": 1000}', "--yes",
                    "-H", "Authorization: Bearer alice",
                    "--second-auth", "Authorization: Bearer bob",
                    "--fail-with", "X-Fail: 503",
                    "--json", str(report),
                ]
            )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    results = {c["id"]: c["result"] for c in json.loads(report.read_text())["checks"]}
    assert {id for id, result in results.items() if result != "PASS"} == {
        "baseline", "missing-key", "ttl"
    }  # fmt: skip
    assert upstream_app.peak <= 5
