"""``retrysafe check`` when things go wrong: bad input, an endpoint that does not answer or
goes away, an answer that cannot be read, a check that would break its plan. Never a
traceback: a one-line message, status 2, and the report of the checks that did finish.

As in ``test_check.py``, the checker runs through ``retrysafe.cli.main`` against real servers
on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from check_servers import Counting, PaymentsApp, header, read_body, respond
from servers import ASGIApp, Receive, Scope, Send, free_port, serve_in_thread

from retrysafe import IdempotencyMiddleware
from retrysafe.check import plan as check_plan
from retrysafe.cli import main

DATA = '{"amount": 1000, "currency": "EUR"}'


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``retrysafe check ARGV``; return the status, stdout and stderr."""
    status = main(["check", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line(err: str, words: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert words in err, err


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["result"] for c in report["checks"]}


async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
    """Never answers (within the tests' timeouts); gone with the client."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receive(), 3)  # http.disconnect


async def bad_gzip(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers a body its Content-Encoding belies: the client cannot decode it."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    await respond(send, 201, b"this is not gzip", headers)


def test_a_baseline_request_that_times_out_stops_with_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A baseline request with no answer within --timeout: status 2, one line, no traceback."""
    with serve_in_thread(hangs) as base:
        status, _, err = run([base + "/x", "-d", DATA, "--yes", "--timeout", "0.3"], capsys)
    assert status == 2
    assert_one_line(err, "first request (key A): no answer within 0.3 s (--timeout)")


def test_an_answer_that_cannot_be_decoded_stops_with_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An undecodable answer (bad gzip) is a target error: status 2, one line, no traceback."""
    with serve_in_thread(bad_gzip) as base:
        status, _, err = run([base + "/x", "-d", DATA, "--yes"], capsys)
    assert status == 2
    assert_one_line(err, "the answer cannot be read: DecodingError")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["http://127.0.0.1:99999/x"], "Port out of range"),
        (["http://127.0.0.1:0/x"], "port 0"),
        (["http://127.0.0.1:http/x"], "not a valid URL"),
        (["http://[::1/x"], "Invalid IPv6 URL"),
        (["http://127.0.0.1:{port}/a b"], "spaces or control characters"),
        (["http://127.0.0.1:{port}/\udcff"], "not a valid URL"),
        (["http://127.0.0.1:{port}/x", "--other-path", "/\udcff"], "--other-path"),
        (["http://127.0.0.1:{port}/x", "--key-header", "Idempotency-Schlüssel"], "--key-header"),
        (["http://127.0.0.1:{port}/x", "--key-header", "Key Header"], "--key-header"),
        (["http://127.0.0.1:{port}/x", "-X", "PÖST"], "-X: not a method"),
        (["http://127.0.0.1:{port}/x", "-X", "PO ST"], "-X: not a method"),
        (["http://127.0.0.1:{port}/x", "-H", "X-Trace: a\x01b"], "control characters"),
        (["http://127.0.0.1:{port}/x", "-H", "X(Trace): 1"], "write 'Name: value'"),
        (["http://127.0.0.1:{port}/x", "-d", "\ud800"], "--data: not text that can be sent"),
    ],
    ids=[
        "port-too-big", "port-0", "port-not-a-number", "broken-ipv6", "space-in-url",
        "undecodable-url", "undecodable-other-path", "non-ascii-key-header",
        "space-in-key-header", "non-ascii-method", "space-in-method", "control-char-in-header",
        "header-name-not-a-token", "unencodable-data",
    ],
)  # fmt: skip
def test_bad_input_is_a_usage_error_not_a_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each malformed input is refused before anything is sent: status 2, one line."""
    with serve_in_thread(Counting(PaymentsApp())) as base:
        port = base.rsplit(":", 1)[1]
        status, _, err = run([*(a.replace("{port}", port) for a in argv), "--yes"], capsys)
    assert status == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse's own errors come after its usage lines
    assert last.startswith("retrysafe check: "), err
    assert message in last, err


def test_a_body_given_as_non_utf8_bytes_is_sent_as_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A -d argument that was not UTF-8 (b'\\xff' decoded by Python as '\\udcff') is sent."""
    bodies: list[bytes] = []

    async def notes(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            bodies.append(await read_body(receive))
            await respond(send, 201, b"ok", [(b"content-type", b"text/plain")])

    with serve_in_thread(notes) as base:
        status, out, err = run([base + "/x", "-d", "\udcff", "--yes", "--only", "replay"], capsys)
    assert "Traceback" not in err
    assert status == 1, out + err  # no layer: replay fails, but the check ran
    assert bodies[0] == b"\xff"


@pytest.mark.parametrize(
    "options",
    [
        ["-H", "Idempotency-Key: mine"],
        ["-H", "idempotency-KEY: mine"],
        ["--key-header", "X-Request-Id", "-H", "x-request-id: mine"],
        ["--fail-with", "Idempotency-Key: 1"],
        ["--second-auth", "Idempotency-Key: 1"],
    ],
    ids=["-H", "-H-other-case", "-H-configured-name", "--fail-with", "--second-auth"],
)
def test_the_key_header_cannot_be_given_by_hand(
    options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The key header (any case, configured name) in -H and co is refused, nothing is sent."""
    with serve_in_thread(counting := Counting(PaymentsApp())) as base:
        status, _, err = run([base + "/x", "-d", DATA, "--yes", *options], capsys)
    assert status == 2
    assert_one_line(err, "the checker sends its own keys")
    assert counting.requests == 0


def test_a_check_going_past_its_plan_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A check that would send more than its planned requests: ERROR, status 2, no traceback."""
    understated = tuple(
        dataclasses.replace(c, requests=lambda target: 0) if c.id == "replay" else c
        for c in check_plan.CHECKS
    )
    monkeypatch.setattr(check_plan, "CHECKS", understated)
    report = tmp_path / "report.json"
    layer = IdempotencyMiddleware(PaymentsApp(), store="memory://")
    with serve_in_thread(counting := Counting(layer)) as base:
        status, _, err = run(
            [base + "/x", "-d", DATA, "--yes", "--only", "replay,missing-key", "--json",
             str(report)],
            capsys,
        )  # fmt: skip
    assert status == 2
    assert_one_line(err, "replay: a bug of the checker: replay would send more than the 0")
    document = json.loads(report.read_text())
    assert outcomes(document) == {"baseline": "INFO", "replay": "ERROR", "missing-key": "SKIP"}
    assert counting.requests == document["requests"] == 2 <= document["planned_requests"]


def test_a_connection_lost_mid_run_keeps_the_checks_already_done(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """When the endpoint goes away mid-run, the finished checks are reported, then ERROR, 2."""
    app = PaymentsApp()
    seen = 0

    async def last_answer_is_slow(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal seen
        if scope["type"] == "http":
            seen += 1
            if seen == 4:  # the server stops listening meanwhile (limit_max_requests)
                await asyncio.sleep(0.5)
        await app(scope, receive, send)

    report, junit = tmp_path / "report.json", tmp_path / "report.xml"
    argv = ["-d", DATA, "--yes", "--only", "replay,malformed-key,get-ignored"]
    argv += ["--json", str(report), "--junit", str(junit)]
    with serve_in_thread(last_answer_is_slow, limit_max_requests=4) as base:
        status, out, err = run([base + "/v1/charges", *argv], capsys)
    assert status == 2
    document = json.loads(report.read_text())
    results = outcomes(document)
    assert list(results) == ["baseline", "replay", "malformed-key", "get-ignored"]
    assert (results["baseline"], results["replay"]) == ("INFO", "FAIL")
    errors = [c for c in document["checks"] if c["result"] == "ERROR"]
    assert len(errors) == 1, document
    stopped = errors[0]["id"]
    assert "cannot connect" in errors[0]["reason"]
    after = list(results)[list(results).index(stopped) + 1 :]
    assert all(document["checks"][list(results).index(id)]["reason"] ==
               f"not run: the run stopped at {stopped}" for id in after)  # fmt: skip
    assert document["exit_status"] == 2
    assert_one_line(err, f"{stopped}: ")
    assert "cannot connect" in err
    assert out.rstrip().endswith(": INCOMPLETE")
    assert 'errors="1"' in junit.read_text()


def test_a_failed_duplicate_cancels_the_others_before_the_run_goes_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """When one concurrent duplicate fails, the others are cancelled, not left in flight."""
    app = PaymentsApp()
    state = {"cut": False, "held": 0}
    held_when_next_check_started: list[int] = []

    async def cuts_one_duplicate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        key = header(scope, b"idempotency-key") or b""
        if b"-concurrency-" in key:
            await read_body(receive)
            if not state["cut"]:  # the first duplicate: cut off mid-answer
                state["cut"] = True
                start = [(b"content-length", b"100")]
                await send({"type": "http.response.start", "status": 201, "headers": start})
                await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
                raise RuntimeError("connection cut on purpose")
            state["held"] += 1  # the others: held until the client goes away (or 2 s)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(receive(), 2)
            finally:
                state["held"] -= 1
            return
        if b"-other-body-" in key and not held_when_next_check_started:
            await asyncio.sleep(0.1)  # time for the server to see cancelled requests go
            held_when_next_check_started.append(state["held"])
        await app(scope, receive, send)

    report = tmp_path / "report.json"
    argv = ["-d", DATA, "--yes", "--only", "concurrency,other-body", "--json", str(report)]
    with serve_in_thread(cuts_one_duplicate) as base:
        status, out, err = run([base + "/v1/charges", *argv], capsys)
    document = json.loads(report.read_text())
    assert "Traceback" not in err
    assert status == 1, out + err
    concurrency = document["checks"][1]
    assert concurrency["result"] == "FAIL"
    assert "the connection failed" in concurrency["reason"]
    assert held_when_next_check_started == [0]


def test_the_key_header_any_case_is_refused_even_on_dry_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The refusal of a hand-given key header is a usage error, found before the plan."""
    status, out, err = run(
        [f"http://127.0.0.1:{free_port()}/x", "-H", "IDEMPOTENCY-KEY: k", "--dry-run"], capsys
    )
    assert status == 2
    assert out == ""
    assert_one_line(err, "drop this header")


def test_ctrl_c_mid_run_keeps_the_report_of_the_checks_done(tmp_path: Path) -> None:
    """Ctrl-C mid-run prints and writes the checks done, the interrupted one as ERROR, status 2."""
    app = IdempotencyMiddleware(PaymentsApp(), store="memory://")
    seen = 0
    stalled = threading.Event()

    async def stalls_at_the_fourth(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal seen
        if scope["type"] == "http":
            seen += 1
            if seen == 4:
                stalled.set()
                await hangs(scope, receive, send)
                return
        await app(scope, receive, send)

    report = tmp_path / "report.json"
    with serve_in_thread(stalls_at_the_fourth) as base:
        checker = subprocess.Popen(
            [sys.executable, "-m", "retrysafe", "check", base + "/v1/charges", "-d", DATA,
             "--yes", "--only", "replay,malformed-key", "--json", str(report)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert stalled.wait(30), "the checker never sent its fourth request"
            checker.send_signal(signal.SIGINT)
            out, err = checker.communicate(timeout=30)
        finally:
            checker.kill()
    assert checker.returncode == 2, (out, err)
    assert "Traceback" not in err
    document = json.loads(report.read_text())
    results = outcomes(document)
    assert results["baseline"] == "INFO"
    assert results["replay"] == "PASS"
    interrupted = [c for c in document["checks"] if c["result"] == "ERROR"]
    assert [c["reason"] for c in interrupted] == ["interrupted before it finished"]
    assert interrupted[0]["requests"] >= 1  # what it had sent is counted
    assert out.rstrip().endswith(": INCOMPLETE")
    assert_one_line(err, f"{interrupted[0]['id']}: interrupted before it finished")


async def trickles(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers at once, then sends its body a byte every 50 ms for 3 s: each read is quick,
    the answer is not."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    await send({"type": "http.response.start", "status": 201, "headers": []})
    with contextlib.suppress(OSError):
        for _ in range(60):
            await send({"type": "http.response.body", "body": b" ", "more_body": True})
            await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b""})


def test_an_answer_trickled_past_the_timeout_is_cut_there(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--timeout bounds the whole answer, not each read: a trickled body is cut at 0.5 s."""
    started = time.monotonic()
    with serve_in_thread(trickles) as base:
        status, _, err = run(
            [base + "/x", "-d", DATA, "--yes", "--only", "replay", "--timeout", "0.5"], capsys
        )
        took = time.monotonic() - started
    assert status == 2
    assert_one_line(err, "first request (key A): no answer within 0.5 s (--timeout)")
    assert took < 2.5, took


async def endless(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 40 MiB, a MiB at a time (an endless stream, as far as the checker cares)."""
    if scope["type"] != "http":
        return
    await read_body(receive)
    await send({"type": "http.response.start", "status": 201, "headers": []})
    with contextlib.suppress(OSError):
        for _ in range(40):
            await send({"type": "http.response.body", "body": b"x" * (1 << 20), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_an_answer_past_16_mib_is_not_read_further(capsys: pytest.CaptureFixture[str]) -> None:
    """The checker reads at most 16 MiB of an answer: a bigger one fails, memory stays bounded."""
    with serve_in_thread(endless) as base:
        status, _, err = run([base + "/x", "-d", DATA, "--yes", "--only", "replay"], capsys)
    assert status == 2
    assert_one_line(err, "the answer is larger than 16 MiB")


def deeply_nested(refusal: int) -> ASGIApp:
    """Answers 201 to the request under a well-formed key (``...-A``), else ``refusal`` with a
    problem+json body of 100 000 nested arrays, deeper than Python's JSON reader goes."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        key = header(scope, b"idempotency-key") or b""
        if re.search(rb"-[A-Z]$", key) and body == DATA.encode():
            answer = json.dumps({"id": uuid.uuid4().hex}).encode()
            await respond(send, 201, answer, [(b"content-type", b"application/json")])
            return
        problem = [(b"content-type", b"application/problem+json")]
        await respond(send, refusal, b"[" * 100_000, problem)

    return app


@pytest.mark.parametrize(("refusal", "checks"), [(400, "malformed-key"), (422, "other-body")])
def test_a_refusal_nested_too_deep_is_judged_not_a_traceback(
    refusal: int, checks: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A refusal whose JSON nests deeper than Python reads is judged (not JSON), no traceback."""
    report = tmp_path / "report.json"
    with serve_in_thread(deeply_nested(refusal)) as base:
        status, _, err = run(
            [base + "/x", "-d", DATA, "--yes", "--only", f"{checks},problem-json",
             "--json", str(report)],
            capsys,
        )  # fmt: skip
    assert "Traceback" not in err
    results = outcomes(json.loads(report.read_text()))
    if refusal == 400:
        assert status == 1
        assert results["problem-json"] == "FAIL"
    else:  # the 422 cannot be told from a refusal of the other body itself
        assert status == 0
        assert results["other-body"] == "SKIP"


def test_a_password_in_the_url_is_masked_in_every_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """user:password@ in the URL is sent (Basic auth) but never printed nor written."""
    seen: list[bytes | None] = []
    layer = IdempotencyMiddleware(PaymentsApp(), store="memory://")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(header(scope, b"authorization"))
        await layer(scope, receive, send)

    report, junit = tmp_path / "report.json", tmp_path / "report.xml"
    with serve_in_thread(app) as base:
        url = base.replace("http://", "http://alice:s3cr3t@") + "/v1/charges"
        status, out, err = run(
            [url, "-d", DATA, "--yes", "--only", "replay", "-v",
             "--json", str(report), "--junit", str(junit)],
            capsys,
        )  # fmt: skip
    assert status == 0, out + err
    assert seen
    assert all(value is not None and value.startswith(b"Basic ") for value in seen)
    for text in (out, err, report.read_text(), junit.read_text()):
        assert "s3cr3t" not in text
    assert "http://alice:***@127.0.0.1" in out


@pytest.mark.parametrize(
    "given",
    [
        "Authorization: Bearer sk_live_secret\x01",
        "Authorization: Bearer sk_live_secret\u20ac",
        "Authorization Bearer sk_live_secret",
        "Bearer sk_live_secret: x",
    ],
    ids=["control-char", "not-latin-1", "no-colon", "space-in-name"],
)
def test_a_refused_header_is_not_echoed(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed -H or --second-auth is refused without printing its value (a credential)."""
    for option in ("-H", "--second-auth"):
        status, _, err = run([f"http://127.0.0.1:{free_port()}/x", option, given, "--yes"], capsys)
        assert status == 2
        assert "sk_live_secret" not in err, err
        assert err.strip().splitlines()[-1].startswith("retrysafe check: "), err


async def escapes_in_its_problem_type(scope: Scope, receive: Receive, send: Send) -> None:
    """A layer whose 422 is right but whose problem type carries a terminal escape sequence."""
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if body == DATA.encode():
        answer = json.dumps({"id": uuid.uuid4().hex}).encode()
        await respond(send, 201, answer, [(b"content-type", b"application/json")])
        return
    problem = {"type": "\x1b]0;owned\x07\x1b[2Jurn:x:key-reused", "title": "reused",
               "status": 422, "detail": "reused"}  # fmt: skip
    headers = [(b"content-type", b"application/problem+json")]
    await respond(send, 422, json.dumps(problem).encode(), headers)


def test_the_servers_text_cannot_drive_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A problem type from the server is quoted in the report when it holds control characters."""
    with serve_in_thread(escapes_in_its_problem_type) as base:
        status, out, err = run([base + "/x", "-d", DATA, "--yes", "--only", "other-body"], capsys)
    assert status == 0, out + err
    assert "\x1b" not in out
    assert "key-reused" in out
