"""The checker's pure parts: the plan's request counts, body diffs, problem judging, reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from retrysafe.check import CHECKS, Outcome, Result, Target, make_plan
from retrysafe.check.exchange import Exchange, body_diff, problem_defects
from retrysafe.check.report import exit_status, json_text, summary, table, to_junit

URL = "http://127.0.0.1:9/v1/charges?x=1"


def exchange(status: int, body: bytes, content_type: str = "application/problem+json") -> Exchange:
    return Exchange(
        "refusal", "POST", "/v1/charges", status, (("content-type", content_type),), body
    )


def test_plan_counts_every_request_before_sending() -> None:
    """The plan's total is the sum of its checks; options add checks, --only keeps baseline."""
    plain = make_plan(Target(URL))
    assert plain.requests == sum(p.requests for p in plain.checks) == 28
    assert {p.check.id for p in plain.checks if p.skip} == {
        "other-caller", "5xx-released", "stuck-key", "ttl", "json-canonical"
    }  # fmt: skip
    full = make_plan(
        Target(
            URL,
            body=b'{"a": 1}',
            headers=(("Content-Type", "application/json"),),
            second_auth=("Authorization", "b"),
            fail_with=("X-Fail", "1"),
            ttl=1,
            concurrency=10,
        )
    )
    assert not any(p.skip for p in full.checks)
    assert full.requests == 2 + 1 + 1 + 1 + 11 + 3 + 3 + 7 + 4 + 1 + 3 + 2 + 6 + 2
    only = make_plan(Target(URL, only=frozenset({"replay"})))
    assert [p.check.id for p in only.checks] == ["baseline", "replay"]
    assert [c.id for c in CHECKS][-1] == "problem-json"  # judges what the others saw


def test_derived_variants_differ_from_the_request() -> None:
    """other-body and other-path send something other than the checked request."""
    target = Target(URL, body=b'{"a": 1}', headers=(("content-type", "application/json"),))
    assert json.loads(target.reused_body()) == {"a": 1, "retrysafe_check": "another body"}
    assert target.reused_path() == "/v1/charges/retrysafe-check?x=1"
    assert Target(URL, body=b"a=1").reused_body() != b"a=1"
    assert Target(URL, other_path="/v1/refunds").reused_path() == "/v1/refunds"


def test_body_diff() -> None:
    """A diff names truncation, extra bytes, or the first differing byte."""
    assert body_diff(b"abc", b"abc") == ""
    assert body_diff(b"abcdef", b"abc") == "truncated: 3 of 6 bytes"
    assert body_diff(b"abc", b"abcde") == "2 bytes more than the original (3 B)"
    assert body_diff(b'{"id": "1234"}', b'{"id": "5678"}').startswith("differ at byte 8: ")


def test_problem_defects() -> None:
    """A refusal must be application/problem+json with type, title, status and detail."""
    good = {"type": "urn:x:key-reused", "title": "t", "status": 422, "detail": "d"}
    assert problem_defects(exchange(422, json.dumps(good).encode())) == []
    assert problem_defects(exchange(422, b"{}", "application/json")) == [
        "Content-Type application/json, not application/problem+json"
    ]
    assert problem_defects(exchange(400, json.dumps(good).encode())) == [
        "'status' is 422, the response 400"
    ]
    assert "no 'detail' string" in problem_defects(exchange(422, b'{"status": 422}'))


def test_reports() -> None:
    """Table, summary, JSON and JUnit agree; odd bytes in evidence still make valid XML."""
    results = [
        Result("replay", "t", "15", Outcome.FAIL, "executed again", ("a\x01b <&>",), 1),
        Result("ttl", "t", "19", Outcome.SKIP, "give --ttl", (), 0),
        Result("baseline", "t", "-", Outcome.INFO, "distinct", (), 2),
    ]
    plan = make_plan(Target(URL))
    assert exit_status(results) == 1
    assert exit_status(results[1:]) == 0
    assert summary(results) == "0 passed, 1 failed, 1 skipped, 1 info; 3 requests sent: FAILED"
    assert "\033[" in table(results, colour=True)
    assert "a\x01b" in table(results)  # evidence under a failure
    assert json.loads(json_text(plan, results))["summary"]["fail"] == 1
    suite = ET.fromstring(to_junit(plan, results)).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
