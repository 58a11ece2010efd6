"""``retrysafe check`` against real servers on loopback: retrysafe's middleware passes, an
unprotected API fails, and each defect of today's libraries is caught and named by its check.

The checker runs through ``retrysafe.cli.main``; its JSON report is what the tests read.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from check_servers import DEFECTS, Counting, PaymentsApp, StrictApp, ToyLayer
from servers import ASGIApp, Receive, Scope, Send, free_port, serve_in_thread

from retrysafe import IdempotencyMiddleware
from retrysafe.cli import main

DATA = '{"amount": 1000, "currency": "EUR", "customer": {"id": "c1", "email": "a@example.com"}}'
CALLERS = ["-H", "Authorization: Bearer alice", "--second-auth", "Authorization: Bearer bob"]
FAIL_503 = ["--fail-with", "X-Fail: 503"]
PLANNED = re.compile(r"^at most (\d+) requests?, (\d+) at once", re.MULTILINE)


@contextmanager
def serving(app: ASGIApp) -> Iterator[tuple[str, Counting]]:
    """Serve ``app`` on loopback behind a request counter; yield the checked URL and it."""
    counting = Counting(app)
    with serve_in_thread(counting) as base:
        yield base + "/v1/charges", counting


def check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, *options: str
) -> tuple[int, dict[str, Any], str]:
    """Run ``retrysafe check --yes`` with a JSON report; return status, report, stdout."""
    report = tmp_path / "report.json"
    status = main(["check", url, "-d", DATA, "--yes", "--json", str(report), *options])
    out = capsys.readouterr().out
    return status, json.loads(report.read_text()), out


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["result"] for c in report["checks"]}


def reasons(report: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["reason"] for c in report["checks"]}


def failed(report: dict[str, Any]) -> set[str]:
    return {id for id, result in outcomes(report).items() if result == "FAIL"}


def test_retrysafe_middleware_passes_every_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Behind IdempotencyMiddleware every check that applies passes, within the stated bounds."""
    app = PaymentsApp()
    with serving(IdempotencyMiddleware(app, store="memory://")) as (url, counting):
        status, report, out = check(capsys, tmp_path, url, *CALLERS, *FAIL_503)
    assert status == 0, out
    assert outcomes(report) == {
        "baseline": "INFO",
        "replay": "PASS",
        "key-forms": "PASS",
        "json-canonical": "PASS",
        "concurrency": "PASS",
        "other-body": "PASS",
        "other-path": "PASS",
        "malformed-key": "PASS",
        "get-ignored": "PASS",
        "missing-key": "INFO",
        "other-caller": "PASS",
        "5xx-released": "PASS",
        "stuck-key": "PASS",
        "ttl": "SKIP",
        "problem-json": "PASS",
    }
    planned = PLANNED.search(out)
    assert planned is not None, out
    assert counting.requests == report["requests"] <= int(planned[1]) == report["planned_requests"]
    assert all(c["requests"] <= c["planned_requests"] for c in report["checks"]), report
    assert counting.peak <= int(planned[2]) == 5
    assert "422 urn:retrysafe:problem:key-reused" in reasons(report)["other-body"]
    assert "\033[" not in out  # no colour off a terminal
    assert out.rstrip().endswith(": OK")


def test_toy_layer_passes_every_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A correct layer that is not retrysafe passes too: the checker judges behaviour only."""
    with serving(ToyLayer(PaymentsApp())) as (url, _):
        status, report, out = check(capsys, tmp_path, url, *CALLERS, *FAIL_503)
    assert status == 0, out
    assert failed(report) == set()
    assert outcomes(report)["concurrency"] == "PASS"


def test_unprotected_server_fails_replay_and_concurrency(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bare API exits 1, naming replay (executed again) and concurrency (executed N times)."""
    junit = tmp_path / "report.xml"
    with serving(PaymentsApp()) as (url, _):
        status, report, out = check(capsys, tmp_path, url, "--junit", str(junit))
    assert status == 1
    assert {"replay", "concurrency", "other-body", "malformed-key"} <= failed(report)
    assert reasons(report)["replay"].startswith("executed again")
    assert reasons(report)["concurrency"].startswith("executed 5 times")
    assert re.search(r"^replay .* FAIL +executed again", out, re.MULTILINE), out
    assert out.rstrip().endswith(": FAILED")
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("failures", "")) == len(failed(report))
    failures = {
        case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
    }
    assert failures == failed(report)
    assert report["exit_status"] == 1


DEFECT_FINDINGS = {
    # defect: (the check that names it, the words it uses, every check that fails)
    # (this one stores Set-Cookie too: the same caller's replays show it)
    "cross-caller-replay": (
        "other-caller",
        "cross-caller replay",
        {"other-caller", "replay", "concurrency"},
    ),
    "mismatch-replayed": ("other-body", "mismatch replayed", {"other-body", "other-path"}),
    "5xx-cached": ("5xx-released", "5xx cached", {"5xx-released"}),
    "stuck-key": ("stuck-key", "stuck key", {"stuck-key"}),
    "double-execution": ("concurrency", "executed", {"concurrency"}),
    # the truncated replay shows wherever a replay is read
    "truncated-replay": ("replay", "truncated replay", {"replay", "concurrency", "other-caller"}),
    # so do a replayed Set-Cookie (rule 16) and headers left out of the replay (rule 15)
    "cookie-replayed": ("replay", "Set-Cookie", {"replay", "concurrency", "other-caller"}),
    "headers-dropped": (
        "replay",
        "headers not replayed: link",
        {"replay", "concurrency", "other-caller"},
    ),
    # a broken quoted string and a control character taken as literal keys (rule 5)
    "lax-key": (
        "malformed-key",
        "a broken quoted string: 201 (executed); a control character: 201 (executed)",
        {"malformed-key"},
    ),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_caught_and_named(
    defect: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each defect of prior-art.md fails its check, named in the reason, and nothing else."""
    check_id, words, failing = DEFECT_FINDINGS[defect]
    fail_with = ["--fail-with", "X-Fail: raise" if defect == "stuck-key" else "X-Fail: 503"]
    with serving(ToyLayer(PaymentsApp(), defect=defect)) as (url, _):
        status, report, out = check(capsys, tmp_path, url, *CALLERS, *fail_with)
    assert status == 1
    assert failed(report) == failing, out
    assert words in reasons(report)[check_id]
    if defect == "double-execution":  # how many overlapped depends on the machine; 2 is enough
        assert re.match(r"executed [2-5] times", reasons(report)[check_id])


def test_cross_caller_replay_leaking_a_cookie_is_said(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """When caller B also gets caller A's Set-Cookie, the reason says so."""
    with serving(ToyLayer(PaymentsApp(), defect="cross-caller-replay")) as (url, _):
        _, report, _ = check(capsys, tmp_path, url, *CALLERS, "--only", "other-caller")
    assert reasons(report)["other-caller"].endswith("with A's Set-Cookie")


@pytest.mark.parametrize(("layer_ttl", "verdict"), [(1, "PASS"), (3600, "FAIL")])
def test_ttl(
    layer_ttl: float, verdict: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With --ttl (which runs replay first), a key past its retention executes anew, or fails."""
    with serving(IdempotencyMiddleware(PaymentsApp(), store="memory://", ttl=layer_ttl)) as (
        url,
        _,
    ):
        _, report, _ = check(capsys, tmp_path, url, "--ttl", "1", "--only", "ttl")
    assert outcomes(report) == {"baseline": "INFO", "replay": "PASS", "ttl": verdict}


def test_require_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """With --require-key a keyless request must get 400 problem+json, not run."""
    layer = IdempotencyMiddleware(PaymentsApp(), store="memory://", require_key=True)
    with serving(layer) as (url, _):
        status, report, _ = check(
            capsys, tmp_path, url, "--require-key", "--only", "missing-key,problem-json"
        )
    assert status == 0
    assert outcomes(report) == {"baseline": "INFO", "missing-key": "PASS", "problem-json": "PASS"}
    with serving(PaymentsApp()) as (url, _):
        status, report, _ = check(capsys, tmp_path, url, "--require-key", "--only", "missing-key")
    assert status == 1
    assert reasons(report)["missing-key"].startswith("executed without a key")


@pytest.mark.parametrize("protected", [True, False])
def test_identical_bodies_give_skip_not_a_false_pass(
    protected: bool, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """When executions answer identical bodies, checks that must see one skip, never pass."""

    async def constant(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        body = b'{"ok": true}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    app = IdempotencyMiddleware(constant, store="memory://") if protected else constant
    with serving(app) as (url, _):
        status, report, _ = check(capsys, tmp_path, url, *CALLERS)
    assert "identical bodies" in reasons(report)["baseline"]
    if protected:
        assert status == 0
        assert outcomes(report)["concurrency"] == outcomes(report)["other-caller"] == "SKIP"
        assert outcomes(report)["replay"] == "PASS"  # byte-identical and marked: checkable
    else:
        assert status == 1
        assert "not marked" in reasons(report)["replay"]
        assert outcomes(report)["concurrency"] == "FAIL"


def test_dry_run_sends_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run prints the plan with its request count and sends no request."""
    with serving(PaymentsApp()) as (url, counting):
        status = main(["check", url, "-d", DATA, *CALLERS, "--dry-run", "--concurrency", "7"])
    out = capsys.readouterr().out
    assert status == 0
    assert counting.requests == 0
    planned = PLANNED.search(out)
    assert planned is not None, out
    assert (int(planned[1]), int(planned[2])) == (34, 7)
    assert re.search(r"^  concurrency +8 requests", out, re.MULTILINE)


def test_without_yes_off_a_terminal_nothing_is_sent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --yes and without a terminal to ask on, the check refuses (2) and sends nothing."""
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    with serving(PaymentsApp()) as (url, counting):
        status = main(["check", url, "-d", DATA])
    assert status == 2
    assert counting.requests == 0
    assert "--yes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ftp://example.com/x"], "not an http(s) URL"),
        (["http://127.0.0.1:{port}/x"], "cannot connect"),
        (["http://127.0.0.1:{port}/x", "--only", "replay,nope"], "unknown checks nope"),
        (["http://127.0.0.1:{port}/x", "-X", "GET"], "check a method the API protects"),
        (["http://127.0.0.1:{port}/x", "-d", "@/nonexistent/body.json"], "cannot read"),
    ],
)
def test_usage_and_connection_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage and connection errors: one line on stderr, status 2, no traceback."""
    port = free_port()
    status = main(["check", *(a.format(port=port) for a in argv), "--yes"])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_request_that_does_not_succeed_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """If the request itself fails (405 here), the check stops with 2 and says what to fix."""
    with serving(PaymentsApp()) as (url, counting):
        status = main(["check", url, "-X", "PATCH", "--yes"])
    err = capsys.readouterr().err
    assert status == 2
    assert "answered 405" in err
    assert "--data" in err
    assert counting.requests <= 2


class Terminal(io.StringIO):
    """A stdin that says it is a terminal, with the user's answer typed in."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "expected"), [("n\n", 2), ("y\n", 0)])
def test_on_a_terminal_it_asks_first(
    answer: str,
    expected: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal the plan is shown and nothing is sent unless the user says yes."""
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    layer = IdempotencyMiddleware(PaymentsApp(), store="memory://")
    with serving(layer) as (url, counting):
        status = main(["check", url, "-d", DATA, "--only", "replay"])
    out = capsys.readouterr().out
    assert status == expected
    assert "Send these 3 requests" in out
    assert counting.requests == (0 if expected == 2 else 3)


def test_a_request_that_times_out_fails_its_check_and_the_run_goes_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every request has a timeout: one the API never answers fails its check, not the run."""
    app = PaymentsApp()

    async def hangs_on_retries(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and app.executions >= 2:  # after the baseline's two
            await asyncio.sleep(1.5)
        await app(scope, receive, send)

    with serving(hangs_on_retries) as (url, _):
        status, report, _ = check(
            capsys, tmp_path, url, "--timeout", "0.3", "--only", "replay,missing-key"
        )
    assert status == 1
    assert reasons(report)["replay"] == "retry (key A): no answer within 0.3 s (--timeout)"
    assert reasons(report)["missing-key"] == "no key: no answer within 0.3 s (--timeout)"


def test_without_httpx_it_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx is imported only by the command; without it, a one-line hint and status 2."""
    monkeypatch.setitem(sys.modules, "httpx", None)
    assert main(["check", "http://127.0.0.1:9/x", "--yes"]) == 2
    assert "pip install 'retrysafe[client]'" in capsys.readouterr().err


def test_an_unrelated_422_is_not_taken_for_the_keys_refusal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A 422 the API gives the variant whatever its key (validation) is a SKIP, never a PASS."""
    with serving(StrictApp()) as (url, counting):
        status, report, out = check(capsys, tmp_path, url, "--only", "other-body,other-path")
    assert outcomes(report) == {"baseline": "INFO", "other-body": "SKIP", "other-path": "SKIP"}
    assert "refused (422) with a fresh key too" in reasons(report)["other-body"]
    assert "--other-data" in reasons(report)["other-body"]
    assert "--other-path" in reasons(report)["other-path"]
    assert status == 0, out
    assert counting.requests == report["requests"] == 2 + 3 + 3


def test_a_422_of_another_type_counts_when_a_fresh_key_is_not_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A layer naming its 422 otherwise passes by the control: the variant, fresh key, runs."""
    with serving(ToyLayer(PaymentsApp(), reused="fingerprint-mismatch")) as (url, counting):
        status, report, out = check(
            capsys, tmp_path, url, "--only", "other-body,other-path,problem-json"
        )
    assert status == 0, out
    assert failed(report) == set()
    for check_id in ("other-body", "other-path"):
        assert outcomes(report)[check_id] == "PASS"
        assert "with a fresh key it got 201, not 422" in reasons(report)[check_id]
    assert reasons(report)["problem-json"].startswith("2 refusals")
    assert counting.requests == report["requests"] <= report["planned_requests"]


def test_ttl_is_not_judged_where_nothing_is_replayed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Executing anew after --ttl proves nothing on an API that never replays: ttl SKIPs."""
    with serving(PaymentsApp()) as (url, _):
        status, report, _ = check(capsys, tmp_path, url, "--ttl", "0.1", "--only", "ttl")
    assert outcomes(report) == {"baseline": "INFO", "replay": "FAIL", "ttl": "SKIP"}
    assert reasons(report)["ttl"].startswith("needs a working replay")
    assert status == 1  # for replay


def test_only_runs_the_checks_a_chosen_check_builds_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--only key-forms runs replay first (it needs a working replay), so key-forms is judged."""
    with serving(IdempotencyMiddleware(PaymentsApp(), store="memory://")) as (url, _):
        status, report, out = check(capsys, tmp_path, url, "--only", "key-forms")
    assert status == 0, out
    assert outcomes(report) == {"baseline": "INFO", "replay": "PASS", "key-forms": "PASS"}


DOCS = Path(__file__).resolve().parent.parent / "docs" / "check.md"
ROW = re.compile(r"^([a-z0-9-]+) +[-0-9, ]+ +(PASS|FAIL|SKIP|INFO|ERROR) ", re.MULTILINE)


def test_the_docs_figures_are_what_the_checker_says(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/check.md's sample run and plan totals are what the checker prints today."""
    doc = DOCS.read_text()
    sample = doc[doc.index("## A sample report") : doc.index("The same API behind")]
    prose = " ".join(doc.split())
    with serving(PaymentsApp()) as (url, _):
        status = main(["check", url, "-d", '{"amount": 1000}', "--yes"])
    out = capsys.readouterr().out
    assert status == 1
    planned = PLANNED.search(out)
    assert planned is not None
    assert f"at most {planned[1]} requests, 5 at once" in sample
    assert f"at most {planned[1]} requests with a JSON body" in prose
    assert ROW.findall(sample) == ROW.findall(out)
    assert out.rstrip().splitlines()[-1] in sample  # the summary: counts and requests sent
    main(["check", url, "--dry-run"])
    plain = PLANNED.search(capsys.readouterr().out)
    assert plain is not None
    assert f"({plain[1]} otherwise" in prose
    everything = [*CALLERS, *FAIL_503, "--ttl", "2"]
    main(["check", url, "-d", '{"amount": 1000}', *everything, "--dry-run"])
    full = PLANNED.search(capsys.readouterr().out)
    assert full is not None
    assert f": {full[1]} with all of them at their defaults" in prose
    assert f"at most {full[1]} requests, 5 at once" in doc
