"""The checker's output: the plan stated before it starts, a table (coloured on a terminal), a
summary line, a JSON document and JUnit XML for CI.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .plan import Outcome, Plan, Result

__all__ = ["exit_status", "plan_text", "summary", "table", "to_json", "to_junit"]

_COLOURS = {
    Outcome.PASS: "\033[32m",
    Outcome.FAIL: "\033[1;31m",
    Outcome.SKIP: "\033[33m",
    Outcome.INFO: "\033[36m",
    Outcome.ERROR: "\033[1;35m",
}
_RESET = "\033[0m"
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd]")


def _xml(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (a header may hold any byte)."""
    return _NOT_XML.sub("?", text)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def plan_text(plan: Plan, *, key_prefix: str) -> str:
    """What the run will send, stated before anything is sent."""
    target = plan.target
    lines = [
        f"retrysafe check: {target.method} {target.shown_url}",
        f"at most {_plural(plan.requests, 'request')}, {target.concurrency} at once, each with a"
        f" {target.timeout:g} s timeout; about {plan.executions} of them run the operation on a"
        " conforming API (a broken one runs more)",
        f"every key starts with {key_prefix}",
    ]
    if target.ttl is not None:
        lines.append(f"the ttl check waits {target.ttl_wait():g} s")
    width = max(len(p.check.id) for p in plan.checks)
    for planned in plan.checks:
        check = planned.check
        if planned.skip is not None:
            count = f"skipped: {planned.skip}"
        else:
            count = f"{_plural(planned.requests, 'request')}: {check.title}"
        lines.append(f"  {check.id:<{width}}  {count}")
    return "\n".join(lines)


def table(results: Sequence[Result], *, colour: bool = False, verbose: bool = False) -> str:
    """One row per check; under each failure (every check with ``verbose``) its evidence."""
    width = max([len("CHECK"), *(len(r.id) for r in results)])
    rules = max([len("RULES"), *(len(r.rules) for r in results)])
    lines = [f"{'CHECK':<{width}}  {'RULES':<{rules}}  RESULT  REASON"]
    for result in results:
        label = f"{result.outcome.value:<6}"
        if colour:
            label = f"{_COLOURS[result.outcome]}{label}{_RESET}"
        lines.append(f"{result.id:<{width}}  {result.rules:<{rules}}  {label}  {result.reason}")
        if verbose or result.outcome in {Outcome.FAIL, Outcome.ERROR}:
            lines.extend(f"{'':<{width}}    {line}" for line in result.evidence)
    return "\n".join(lines)


def _counts(results: Sequence[Result]) -> Counter[Outcome]:
    return Counter(result.outcome for result in results)


def exit_status(results: Sequence[Result]) -> int:
    """0 when every check that applied passed, 1 when one failed, 2 when the run could not
    finish (a check in ERROR)."""
    counts = _counts(results)
    if counts[Outcome.ERROR]:
        return 2
    return 1 if counts[Outcome.FAIL] else 0


def summary(results: Sequence[Result], *, colour: bool = False) -> str:
    """``10 passed, 2 failed, 3 skipped, 2 info; 27 requests sent: FAILED``; a run that could
    not finish adds ``1 error`` and ends ``INCOMPLETE``."""
    counts = _counts(results)
    sent = sum(result.requests for result in results)
    status = exit_status(results)
    verdict, shade = {
        0: ("OK", Outcome.PASS),
        1: ("FAILED", Outcome.FAIL),
        2: ("INCOMPLETE", Outcome.ERROR),
    }[status]
    if colour:
        verdict = f"{_COLOURS[shade]}{verdict}{_RESET}"
    errors = f", {counts[Outcome.ERROR]} error" if counts[Outcome.ERROR] else ""
    return (
        f"{counts[Outcome.PASS]} passed, {counts[Outcome.FAIL]} failed,"
        f" {counts[Outcome.SKIP]} skipped, {counts[Outcome.INFO]} info{errors};"
        f" {_plural(sent, 'request')} sent: {verdict}"
    )


def to_json(plan: Plan, results: Sequence[Result]) -> dict[str, Any]:
    """The report as a JSON-ready document."""
    counts = _counts(results)
    target = plan.target
    planned = {p.check.id: p.requests for p in plan.checks}
    return {
        "target": {"method": target.method, "url": target.shown_url},
        "planned_requests": plan.requests,
        "requests": sum(result.requests for result in results),
        "summary": {outcome.value.lower(): counts[outcome] for outcome in Outcome},
        "exit_status": exit_status(results),
        "checks": [
            {
                "id": result.id,
                "title": result.title,
                "rules": result.rules,
                "result": result.outcome.value,
                "reason": result.reason,
                "evidence": list(result.evidence),
                "requests": result.requests,
                "planned_requests": planned.get(result.id, 0),
            }
            for result in results
        ],
    }


def json_text(plan: Plan, results: Sequence[Result]) -> str:
    return json.dumps(to_json(plan, results), indent=2) + "\n"


def to_junit(plan: Plan, results: Sequence[Result]) -> str:
    """JUnit XML: one test case per check; SKIP is skipped, FAIL a failure, ERROR an error,
    INFO a pass."""
    counts = _counts(results)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=_xml(f"retrysafe check {plan.target.method} {plan.target.shown_url}"),
        tests=str(len(results)),
        failures=str(counts[Outcome.FAIL]),
        skipped=str(counts[Outcome.SKIP]),
        errors=str(counts[Outcome.ERROR]),
    )
    for result in results:
        case = ET.SubElement(suite, "testcase", classname="retrysafe.check", name=result.id)
        evidence = "\n".join(result.evidence)
        if result.outcome is Outcome.FAIL:
            failure = ET.SubElement(case, "failure", message=_xml(result.reason), type="FAIL")
            failure.text = _xml(evidence)
        elif result.outcome is Outcome.ERROR:
            error = ET.SubElement(case, "error", message=_xml(result.reason), type="ERROR")
            error.text = _xml(evidence)
        elif result.outcome is Outcome.SKIP:
            ET.SubElement(case, "skipped", message=_xml(result.reason))
        else:
            out = ET.SubElement(case, "system-out")
            out.text = _xml(f"{result.outcome.value}: {result.reason}\n{evidence}")
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
