"""The checks as data: each has an id, the contract rules it covers, the requests it needs, and
a coroutine that sends them through a probe and judges the answers.

:func:`make_plan` decides which checks apply to a target and how many requests each may send,
so that the total is known and stated before anything is sent.

How double execution is seen from outside: the API's answers are compared. A replay must be
byte-identical to the original; two different bodies under one key mean two executions. That
only works if two executions of the same request answer different bodies (an id, a timestamp),
which the ``baseline`` check finds out first. When they do not, the checks that would need to
see a second execution report SKIP, never a PASS they cannot back.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .exchange import (
    COMPARED_HEADERS,
    Exchange,
    body_diff,
    headers_not_replayed,
    problem_defects,
    same_answer,
)

if TYPE_CHECKING:
    from .runner import Context, Probe

__all__ = [
    "CHECKS",
    "Check",
    "Outcome",
    "Plan",
    "PlanExceeded",
    "PlannedCheck",
    "ProbeFailed",
    "Result",
    "Target",
    "TargetError",
    "Verdict",
    "make_plan",
]

STUCK_POLL = 0.25
"""Seconds between the retries of ``stuck-key`` while the key answers 409."""

REUSED_TYPE = "key-reused"
"""How the type of the contract's 422 ends (``urn:retrysafe:problem:key-reused``, rule 24)."""


class TargetError(Exception):
    """The endpoint cannot be checked: unreachable, or the request itself does not succeed."""


class ProbeFailed(Exception):
    """A request got no usable answer (timeout, connection cut): the check fails with this."""


class PlanExceeded(Exception):
    """A check tried to send more requests than the plan stated: a bug of the checker's own,
    stopped before the request is sent."""


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    INFO = "INFO"
    """Reported, not judged (the baseline; the missing-key behaviour without ``--require-key``)."""
    ERROR = "ERROR"
    """The check could not finish (the endpoint went away, an answer could not be read): the run
    stops there, the checks after it are reported as not run, and the exit status is 2."""


def _masked(url: str) -> str:
    """``url`` with the password of its user information (``user:secret@``) masked."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


@dataclass(frozen=True)
class Target:
    """The endpoint and the request to check, and how hard the checker may push."""

    url: str
    method: str = "POST"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    """The caller's headers (credentials, Content-Type), sent with every request."""
    key_header: str = "Idempotency-Key"
    concurrency: int = 5
    timeout: float = 10.0
    second_auth: tuple[str, str] | None = None
    fail_with: tuple[str, str] | None = None
    """A header that makes the API answer 5xx: the way to test what happens after a failure."""
    ttl: float | None = None
    require_key: bool = False
    other_path: str | None = None
    other_body: bytes | None = None
    stuck_wait: float = 1.0
    only: frozenset[str] | None = None

    @property
    def shown_url(self) -> str:
        """The URL as reports show it: a password in it is masked."""
        return _masked(self.url)

    @property
    def shown_origin(self) -> str:
        parts = urlsplit(self.shown_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        """The path and query the request goes to."""
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json_body(self) -> Any:
        """The body as JSON, or None when it is not a JSON document sent as one."""
        content_type = (self.header("content-type") or "").split(";")[0].strip().lower()
        if not (content_type == "application/json" or content_type.endswith("+json")):
            return None
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None

    def reused_body(self) -> bytes:
        """The body sent under a used key by ``other-body``: ``--other-data``, else derived."""
        if self.other_body is not None:
            return self.other_body
        document = self.json_body()
        if isinstance(document, dict):
            return json.dumps({**document, "retrysafe_check": "another body"}).encode()
        if isinstance(document, list):
            return json.dumps([*document, "retrysafe-check: another body"]).encode()
        return self.body + b"\nretrysafe-check: another body"

    def reused_path(self) -> str:
        """The path ``other-path`` sends the used key to: ``--other-path``, else derived."""
        if self.other_path is not None:
            return self.other_path
        parts = urlsplit(self.url)
        path = (parts.path or "/").rstrip("/") + "/retrysafe-check"
        return path + (f"?{parts.query}" if parts.query else "")

    def ttl_wait(self) -> float:
        """How long ``ttl`` waits past the retention, for clocks and rounding."""
        return 0.0 if self.ttl is None else self.ttl + 0.5 + self.ttl * 0.02


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    evidence: tuple[str, ...] = ()
    """Lines added to the requests' own evidence (a body diff)."""


@dataclass(frozen=True)
class Result:
    """A check's outcome, for the report."""

    id: str
    title: str
    rules: str
    outcome: Outcome
    reason: str
    evidence: tuple[str, ...]
    requests: int

    @classmethod
    def of(cls, check: Check, verdict: Verdict, evidence: list[str], requests: int) -> Result:
        return cls(
            check.id,
            check.title,
            check.rules,
            verdict.outcome,
            verdict.reason,
            (*evidence, *verdict.evidence),
            requests,
        )


Run = Callable[["Context", "Probe"], Awaitable[Verdict]]


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    """What it proves, in a line."""
    rules: str
    """The contract rules it covers (``"14, 15"``)."""
    run: Run
    requests: Callable[[Target], int]
    """The most requests it sends."""
    executions: Callable[[Target], int] = lambda target: 0
    """How many of them run the operation on a conforming API (a broken one may run more)."""
    needs: Callable[[Target], str | None] = lambda target: None
    """Why it cannot run against this target (a missing option), or None."""
    requires: tuple[str, ...] = ()
    """The checks whose outcome it builds on: ``--only`` runs them too (before it)."""


@dataclass(frozen=True)
class PlannedCheck:
    check: Check
    requests: int
    executions: int
    skip: str | None


@dataclass(frozen=True)
class Plan:
    target: Target
    checks: tuple[PlannedCheck, ...] = field(default_factory=tuple)

    @property
    def requests(self) -> int:
        return sum(planned.requests for planned in self.checks)

    @property
    def executions(self) -> int:
        return sum(planned.executions for planned in self.checks)


def _chosen(only: frozenset[str]) -> set[str]:
    """``only``, ``baseline``, and every check those require, however indirectly."""
    requires = {check.id: check.requires for check in CHECKS}
    chosen = {"baseline"}
    todo = list(only)
    while todo:
        check_id = todo.pop()
        if check_id not in chosen:
            chosen.add(check_id)
            todo.extend(requires.get(check_id, ()))
    return chosen


def make_plan(target: Target) -> Plan:
    """The checks that apply to ``target`` (``baseline`` always, and with ``only`` the checks
    those require), with their request counts."""
    chosen = None if target.only is None else _chosen(target.only)
    planned = []
    for check in CHECKS:
        if chosen is not None and check.id not in chosen:
            continue
        skip = check.needs(target)
        if skip is None:
            planned.append(
                PlannedCheck(check, check.requests(target), check.executions(target), None)
            )
        else:
            planned.append(PlannedCheck(check, 0, 0, skip))
    return Plan(target, tuple(planned))


# -- judging helpers ---------------------------------------------------------------------------


def _ok(exchange: Exchange) -> bool:
    return exchange.status < 400


def _cannot_see(what: str) -> str:
    return f"{what}, but executions answer identical bodies: a second execution would not show"


def _judge_replay(first: Exchange, retry: Exchange, context: Context) -> Verdict:
    """Whether ``retry`` is a faithful, marked replay of ``first`` (rules 15, 16)."""
    distinct = context.distinct
    diff = body_diff(first.body, retry.body)
    if first.replayed:
        return Verdict(Outcome.FAIL, "the original response is marked Idempotent-Replayed")
    if retry.status == 409:
        return Verdict(Outcome.FAIL, "the retry got 409 after the original had finished")
    if retry.status == first.status and diff.startswith("truncated"):
        return Verdict(
            Outcome.FAIL,
            f"truncated replay: {len(retry.body)} of {len(first.body)} bytes",
            (f"body: {diff}",),
        )
    if not same_answer(first, retry):
        evidence = (f"status {first.status} then {retry.status}; body: {diff or 'identical'}",)
        if retry.replayed:
            return Verdict(Outcome.FAIL, "the replay differs from the original", evidence)
        return Verdict(Outcome.FAIL, "executed again: the retry got another response", evidence)
    if not retry.replayed:
        if distinct:
            return Verdict(Outcome.FAIL, "the replay is not marked Idempotent-Replayed: true")
        return Verdict(
            Outcome.FAIL,
            "not marked Idempotent-Replayed: true (a replay, or a second execution:"
            " executions answer identical bodies)",
        )
    for name in COMPARED_HEADERS:
        if first.header(name) != retry.header(name):
            return Verdict(
                Outcome.FAIL,
                f"the replay's {name} is {retry.header(name)!r}, the original's"
                f" {first.header(name)!r}",
            )
    # A cookie that differs from one execution to the next (the baseline's two did not both
    # get it) and comes back in the replay was stored with the response (rule 16).
    cookies = set(first.values("set-cookie")) & set(retry.values("set-cookie"))
    if cookies - context.shared_cookies:
        return Verdict(
            Outcome.FAIL,
            "the replay carries the original's Set-Cookie (rule 16: never stored nor replayed)",
        )
    missing = headers_not_replayed(first, retry)
    if missing:
        return Verdict(
            Outcome.FAIL,
            f"headers not replayed: {', '.join(missing)} (the original had them)",
        )
    return Verdict(Outcome.PASS, "replayed byte for byte, marked Idempotent-Replayed: true")


def _problem_type(exchange: Exchange) -> str | None:
    """The ``type`` member of a JSON object body, whatever its Content-Type; else None."""
    try:
        document = json.loads(exchange.body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python reads
        return None
    if isinstance(document, dict) and isinstance(document.get("type"), str):
        kind: str = document["type"]
        return kind
    return None


async def _judge_reuse(
    probe: Probe,
    first: Exchange,
    reused: Exchange,
    what: str,
    control: Callable[[], Awaitable[Exchange]],
    hint: str,
) -> Verdict:
    """Whether the key reused for ``what`` was refused with 422 and not executed (rule 9).

    A 422 alone does not show that: an API may refuse the variant itself (a validation error)
    whatever its key. The refusal counts as the key's when its problem type ends in
    ``key-reused`` (rule 24); otherwise ``control`` sends the variant with a fresh key, and
    the 422 counts only if that one is not refused with 422 too. If it is, the check cannot
    tell the two refusals apart and skips, saying which option gives it a variant to use.
    """
    if not _ok(first):
        return Verdict(Outcome.FAIL, f"the first request itself answered {first.status}")
    if reused.status == 422:
        kind = _problem_type(reused)
        if kind is not None and kind.endswith(REUSED_TYPE):
            probe.problem(reused)
            # the server's text: shown as it is only when it cannot drive the terminal
            shown = kind if kind.isprintable() and len(kind) <= 200 else repr(kind[:200])
            return Verdict(Outcome.PASS, f"same key with {what}: 422 {shown}, not executed")
        fresh = await control()
        named = f"type {kind[:200]!r}" if kind is not None else "no problem type"
        if fresh.status == 422:
            return Verdict(
                Outcome.SKIP,
                f"{what} is refused (422) with a fresh key too: the 422 ({named}) may not be"
                f" the key's; {hint}",
            )
        probe.problem(reused)
        return Verdict(
            Outcome.PASS,
            f"same key with {what}: 422 ({named}), not executed; with a fresh key it got"
            f" {fresh.status}, not 422, so the 422 was the key's",
        )
    if reused.replayed or (same_answer(first, reused) and probe.context.distinct):
        return Verdict(
            Outcome.FAIL, f"mismatch replayed: the request with {what} got the first one's response"
        )
    if same_answer(first, reused):
        return Verdict(
            Outcome.FAIL,
            f"the request with {what} got a response identical to the first (replayed, or"
            " executed again), not 422",
        )
    if _ok(reused):
        return Verdict(Outcome.FAIL, f"executed: the request with {what} ran ({reused.status})")
    return Verdict(Outcome.FAIL, f"same key with {what}: {reused.status}, expected 422")


# -- the checks --------------------------------------------------------------------------------


async def _baseline(context: Context, probe: Probe) -> Verdict:
    try:
        first = await probe.send("first request (key A)", key=context.key_a)
        other = await probe.send("same request, another key (B)", key=probe.key("B"))
    except ProbeFailed as exc:
        raise TargetError(f"{exc}: the checks need a request that is answered") from None
    for exchange in (first, other):
        if not _ok(exchange):
            raise TargetError(
                f"{exchange.method} {context.target.shown_url} answered {exchange.summary()}:"
                " the checks need a request that succeeds (give its body with --data, its"
                " credentials with -H)"
            )
    context.first = first
    context.distinct = first.body != other.body
    context.shared_cookies = frozenset(first.values("set-cookie")) & frozenset(
        other.values("set-cookie")
    )
    if context.distinct:
        return Verdict(
            Outcome.INFO,
            "two executions answered different bodies: a second execution shows from outside",
        )
    return Verdict(
        Outcome.INFO,
        "two executions answered identical bodies: a second execution cannot be seen, the"
        " checks that need to see one are skipped",
    )


async def _replay(context: Context, probe: Probe) -> Verdict:
    assert context.first is not None
    probe.note(context.first.line())
    retry = await probe.send("retry (key A)", key=context.key_a)
    return _judge_replay(context.first, retry, context)


async def _key_forms(context: Context, probe: Probe) -> Verdict:
    if not context.passed("replay"):
        return Verdict(Outcome.SKIP, "needs a working replay (see replay)")
    assert context.first is not None
    name = context.target.key_header.upper()
    retry = await probe.send(
        f'retry as {name}: "A" (quoted, upper-case name)',
        key_headers=[(name, f'"{context.key_a}"'.encode())],
    )
    if retry.status == 400:
        return Verdict(Outcome.FAIL, "the quoted key was refused (400): sf-string keys not read")
    verdict = _judge_replay(context.first, retry, context)
    if verdict.outcome is Outcome.PASS:
        return Verdict(Outcome.PASS, f'{name}: "A" replayed key A')
    return Verdict(Outcome.FAIL, f"the quoted key was taken for another key: {verdict.reason}")


def _reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reordered(v) for k, v in reversed(value.items())}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


async def _json_canonical(context: Context, probe: Probe) -> Verdict:
    if not context.passed("replay"):
        return Verdict(Outcome.SKIP, "needs a working replay (see replay)")
    assert context.first is not None
    document = context.target.json_body()
    variant = json.dumps(_reordered(document), indent=2).encode()
    retry = await probe.send(
        "retry, same JSON reordered and re-spaced (key A)", key=context.key_a, body=variant
    )
    if retry.status == 422:
        return Verdict(Outcome.FAIL, "refused (422): JSON bodies compared byte for byte")
    verdict = _judge_replay(context.first, retry, context)
    if verdict.outcome is Outcome.PASS:
        return Verdict(Outcome.PASS, "the same JSON, reordered and re-spaced, replayed key A")
    return Verdict(Outcome.FAIL, verdict.reason, verdict.evidence)


async def _concurrency(context: Context, probe: Probe) -> Verdict:
    count = context.target.concurrency
    key = probe.key("D")
    answers = await probe.send_many("duplicate", count, key=key)
    conflicts = [a for a in answers if a.status == 409]
    originals = [a for a in answers if a.status != 409 and not a.replayed]
    replays = [a for a in answers if a.status != 409 and a.replayed]
    executions = {a.body for a in originals if _ok(a)}
    if context.distinct and len(executions) > 1:
        return Verdict(
            Outcome.FAIL,
            f"executed {len(executions)} times: {len(executions)} different bodies for one key"
            f" ({count} sent at once)",
        )
    failed = [a for a in originals if a.status >= 500]
    if failed:
        return Verdict(
            Outcome.FAIL, f"{len(failed)} of {count} duplicates failed with {failed[0].status}"
        )
    if len(originals) != 1:
        what = "unmarked replays" if context.distinct else "executed again, or unmarked replays"
        return Verdict(
            Outcome.FAIL,
            f"{len(originals)} of {count} duplicates answered as originals, neither 409 nor"
            f" marked replays ({what})",
        )
    (original,) = originals
    for answer in replays:
        verdict = _judge_replay(original, answer, context)
        if verdict.outcome is not Outcome.PASS:
            return Verdict(Outcome.FAIL, f"{answer.label}: {verdict.reason}", verdict.evidence)
    for answer in conflicts:
        if answer.header("retry-after") is None:
            return Verdict(Outcome.FAIL, "409 without Retry-After")
        probe.problem(answer)
    follow = await probe.send("retry once all were answered", key=key)
    if follow.status == 409:
        return Verdict(Outcome.FAIL, "still 409 after every duplicate was answered")
    verdict = _judge_replay(original, follow, context)
    if verdict.outcome is not Outcome.PASS:
        return Verdict(Outcome.FAIL, f"the retry afterwards: {verdict.reason}", verdict.evidence)
    tally = f"1 execution, {len(conflicts)} x 409 with Retry-After, {len(replays)} replays"
    if not context.distinct:
        return Verdict(Outcome.SKIP, _cannot_see(tally))
    return Verdict(Outcome.PASS, f"{count} at once: {tally}")


async def _other_body(context: Context, probe: Probe) -> Verdict:
    key = probe.key("E")
    body = context.target.reused_body()
    first = await probe.send("first (key E)", key=key)
    reused = await probe.send("same key E, another body", key=key, body=body)

    def control() -> Awaitable[Exchange]:
        return probe.send("another body, fresh key (E2)", key=probe.key("E2"), body=body)

    hint = "give --other-data with another body the API accepts"
    return await _judge_reuse(probe, first, reused, "another body", control, hint)


async def _other_path(context: Context, probe: Probe) -> Verdict:
    key = probe.key("F")
    path = context.target.reused_path()
    first = await probe.send("first (key F)", key=key)
    reused = await probe.send("same key F, another path", key=key, target=path)

    def control() -> Awaitable[Exchange]:
        return probe.send("another path, fresh key (F2)", key=probe.key("F2"), target=path)

    hint = "give --other-path with another route the API accepts"
    return await _judge_reuse(probe, first, reused, "another path", control, hint)


async def _malformed_key(context: Context, probe: Probe) -> Verdict:
    name = context.target.key_header
    forms: list[tuple[str, list[tuple[str, bytes]]]] = [
        ("empty", [(name, b"")]),
        ("256 characters", [(name, probe.key("long").ljust(256, "x").encode())]),
        ("non-ASCII", [(name, probe.key("é").encode())]),
        ("two headers", [(name, probe.key("one").encode()), (name, probe.key("two").encode())]),
        ("a list", [(name, f"{probe.key('three')}, {probe.key('four')}".encode())]),
        ("a broken quoted string", [(name, f'"{probe.key("quote")}'.encode())]),
        ("a control character", [(name, f"{probe.key('tab')}\tx".encode())]),
    ]
    wrong = []
    for form, headers in forms:
        answer = await probe.send(f"key {form}", key_headers=headers)
        if answer.status == 400:
            probe.problem(answer)
        else:
            executed = " (executed)" if _ok(answer) else ""
            wrong.append(f"{form}: {answer.status}{executed}")
    if wrong:
        return Verdict(Outcome.FAIL, "not refused with 400: " + "; ".join(wrong))
    return Verdict(Outcome.PASS, f"all {len(forms)} malformed forms refused with 400")


async def _get_ignored(context: Context, probe: Probe) -> Verdict:
    key = probe.key("G")
    plain = await probe.send("GET without a key", method="GET")
    keyed = [
        await probe.send("GET with key G", method="GET", key=key),
        await probe.send("GET with key G again", method="GET", key=key),
        await probe.send(
            "GET with an empty key", method="GET", key_headers=[(context.target.key_header, b"")]
        ),
    ]
    wrong = [
        f"{a.label}: {a.status}" + (" marked replayed" if a.replayed else "")
        for a in keyed
        if a.status != plain.status or a.replayed
    ]
    if wrong:
        return Verdict(
            Outcome.FAIL, f"the key was not ignored ({plain.status} without): " + "; ".join(wrong)
        )
    return Verdict(Outcome.PASS, f"GET answered {plain.status} with and without a key, unmarked")


async def _missing_key(context: Context, probe: Probe) -> Verdict:
    answer = await probe.send("no key")
    if context.target.require_key:
        if answer.status == 400:
            probe.problem(answer)
            return Verdict(Outcome.PASS, "refused with 400, not executed")
        if _ok(answer):
            return Verdict(Outcome.FAIL, f"executed without a key ({answer.status})")
        return Verdict(Outcome.FAIL, f"answered {answer.status}, expected 400 missing-key")
    if _ok(answer):
        return Verdict(
            Outcome.INFO,
            f"executed without a key ({answer.status}): keys are optional (--require-key to"
            " demand one)",
        )
    return Verdict(Outcome.INFO, f"refused without a key ({answer.status})")


async def _other_caller(context: Context, probe: Probe) -> Verdict:
    second = context.target.second_auth
    assert second is not None
    key = probe.key("H")
    mine = await probe.send("caller A (key H)", key=key)
    theirs = await probe.send("caller B, same key H", key=key, auth=second)
    again = await probe.send("caller A again (key H)", key=key)
    if not _ok(mine):
        return Verdict(Outcome.FAIL, f"caller A's request itself answered {mine.status}")
    if theirs.replayed or (context.distinct and same_answer(mine, theirs)):
        cookie = mine.header("set-cookie")
        leak = " with A's Set-Cookie" if cookie and theirs.header("set-cookie") == cookie else ""
        return Verdict(Outcome.FAIL, f"cross-caller replay: caller B got caller A's response{leak}")
    if theirs.status in {401, 403}:
        return Verdict(Outcome.SKIP, f"caller B's credentials were refused ({theirs.status})")
    if theirs.status in {409, 422}:
        return Verdict(
            Outcome.FAIL,
            f"caller B was refused ({theirs.status}) over caller A's key: callers share keys",
        )
    if not _ok(theirs):
        return Verdict(Outcome.FAIL, f"caller B's request answered {theirs.status}")
    if context.distinct and same_answer(theirs, again):
        return Verdict(Outcome.FAIL, "caller A's retry got caller B's response")
    verdict = _judge_replay(mine, again, context)
    if verdict.outcome is not Outcome.PASS:
        return Verdict(Outcome.FAIL, f"caller A's retry: {verdict.reason}", verdict.evidence)
    if not context.distinct:
        return Verdict(Outcome.SKIP, _cannot_see("caller B's answer was unmarked"))
    return Verdict(Outcome.PASS, "caller B's same key ran B's request; A still gets its replay")


async def _failed_first(probe: Probe, key: str) -> Exchange | Verdict:
    fail_with = probe.context.target.fail_with
    assert fail_with is not None
    failed = await probe.send("with --fail-with", key=key, extra=[fail_with])
    if failed.status < 500:
        return Verdict(Outcome.SKIP, f"--fail-with did not make the API fail ({failed.status})")
    return failed


async def _fivexx_released(context: Context, probe: Probe) -> Verdict:
    key = probe.key("J")
    failed = await _failed_first(probe, key)
    if isinstance(failed, Verdict):
        return failed
    retry = await probe.send("retry without --fail-with", key=key)
    if retry.status == failed.status and (retry.replayed or retry.body == failed.body):
        return Verdict(Outcome.FAIL, f"5xx cached: the retry got the stored {failed.status} back")
    if retry.status == 409:
        return Verdict(Outcome.SKIP, "the key was still held after the failure (see stuck-key)")
    if _ok(retry) and not retry.replayed:
        return Verdict(Outcome.PASS, f"{failed.status} not kept: the retry ran ({retry.status})")
    return Verdict(Outcome.FAIL, f"the retry after a {failed.status} answered {retry.summary()}")


async def _stuck_key(context: Context, probe: Probe) -> Verdict:
    key = probe.key("K")
    failed = await _failed_first(probe, key)
    if isinstance(failed, Verdict):
        return failed
    retry = await probe.send("retry without --fail-with", key=key)
    polls = _stuck_polls(context.target)
    while retry.status == 409 and polls:
        polls -= 1
        await asyncio.sleep(STUCK_POLL)
        retry = await probe.send("retry again", key=key)
    if retry.status == 409:
        return Verdict(
            Outcome.FAIL,
            f"stuck key: still 409 {context.target.stuck_wait:g} s after its failed execution"
            " ended",
        )
    if retry.replayed or same_answer(failed, retry):
        return Verdict(Outcome.SKIP, "the failure was replayed (see 5xx-released)")
    if _ok(retry):
        return Verdict(Outcome.PASS, f"free after the failure: the retry ran ({retry.status})")
    return Verdict(Outcome.FAIL, f"the retry after the failure answered {retry.summary()}")


def _stuck_polls(target: Target) -> int:
    return math.ceil(target.stuck_wait / STUCK_POLL)


async def _ttl(context: Context, probe: Probe) -> Verdict:
    if not context.passed("replay"):
        return Verdict(
            Outcome.SKIP,
            "needs a working replay (see replay): executing anew after the retention means"
            " nothing if the API does not replay before it",
        )
    target = context.target
    key = probe.key("T")
    first = await probe.send("first (key T)", key=key)
    wait = target.ttl_wait()
    probe.note(f"waited {wait:g} s (--ttl {target.ttl:g} and a margin)")
    await asyncio.sleep(wait)
    later = await probe.send("after the retention (key T)", key=key)
    if later.replayed or (context.distinct and same_answer(first, later)):
        return Verdict(Outcome.FAIL, f"still replayed {wait:g} s after the first, past --ttl")
    if later.status == 409:
        return Verdict(Outcome.FAIL, "409 after the retention: the key stays busy")
    if not _ok(later):
        return Verdict(Outcome.FAIL, f"after the retention: {later.summary()}")
    if not context.distinct:
        return Verdict(Outcome.SKIP, _cannot_see("unmarked after the retention"))
    return Verdict(Outcome.PASS, f"executed anew {wait:g} s after the first")


async def _problem_json(context: Context, probe: Probe) -> Verdict:
    if not context.problems:
        return Verdict(Outcome.SKIP, "no refusal was seen to judge")
    wrong = []
    for check_id, exchange in context.problems:
        defects = problem_defects(exchange)
        if defects:
            wrong.append(f"{check_id} ({exchange.label}, {exchange.status}): {', '.join(defects)}")
    for line in wrong:
        probe.note(line)
    if wrong:
        return Verdict(Outcome.FAIL, f"{len(wrong)} of {len(context.problems)} refusals malformed")
    return Verdict(
        Outcome.PASS,
        f"{len(context.problems)} refusals, all application/problem+json with type, title,"
        " status, detail",
    )


def _needs(option: str, why: str) -> Callable[[Target], str | None]:
    def needs(target: Target) -> str | None:
        return None if getattr(target, option) is not None else why

    return needs


def _needs_json(target: Target) -> str | None:
    document = target.json_body()
    if isinstance(document, dict | list) and document:
        return None
    return "the body is not a JSON object or array sent as application/json"


def _one(target: Target) -> int:
    return 1


def _two(target: Target) -> int:
    return 2


def _three(target: Target) -> int:
    return 3


CHECKS: tuple[Check, ...] = (
    Check(
        "baseline",
        "two first executions, other keys: does a second execution show?",
        "-",
        _baseline,
        _two,
        _two,
    ),
    Check("replay", "a retry gets the original byte for byte, marked", "14, 15, 16", _replay, _one),
    Check(
        "key-forms",
        "the key survives quoting and the header name's case",
        "3, 4",
        _key_forms,
        _one,
        requires=("replay",),
    ),
    Check(
        "json-canonical",
        "the same JSON reordered and re-spaced is the same request",
        "8",
        _json_canonical,
        _one,
        needs=_needs_json,
        requires=("replay",),
    ),
    Check(
        "concurrency",
        "N duplicates at once execute once; the rest get 409 + Retry-After or the replay",
        "10, 12",
        _concurrency,
        lambda target: target.concurrency + 1,
        _one,
    ),
    # The third request of other-body and other-path (a fresh key, to tell whose refusal a 422
    # is) is sent only when the 422 does not name key-reused: not on a conforming API.
    Check(
        "other-body",
        "the key with another body: 422 key-reused, not executed",
        "9",
        _other_body,
        _three,
        _one,
    ),
    Check(
        "other-path",
        "the key on another path: 422 key-reused, not executed",
        "9",
        _other_path,
        _three,
        _one,
    ),
    Check(
        "malformed-key",
        "empty, too long, non-ASCII, repeated, list, broken quote, control: 400",
        "4, 5",
        _malformed_key,
        lambda target: 7,
    ),
    Check("get-ignored", "a key on GET is ignored", "1", _get_ignored, lambda target: 4),
    Check(
        "missing-key",
        "a request without a key (judged with --require-key)",
        "2",
        _missing_key,
        _one,
        lambda target: 0 if target.require_key else 1,
    ),
    Check(
        "other-caller",
        "another caller's same key never gets the first caller's response",
        "6",
        _other_caller,
        lambda target: 3,
        _two,
        _needs("second_auth", "give --second-auth 'Name: value' (another caller's credentials)"),
    ),
    Check(
        "5xx-released",
        "a 5xx is not stored: the retry runs again",
        "14",
        _fivexx_released,
        _two,
        _two,
        _needs("fail_with", "give --fail-with 'Name: value' (a header that makes the API fail)"),
    ),
    Check(
        "stuck-key",
        "a key whose execution failed is free again at once",
        "11, 14",
        _stuck_key,
        lambda target: 2 + _stuck_polls(target),
        _two,
        _needs("fail_with", "give --fail-with 'Name: value' (a header that makes the API fail)"),
    ),
    Check(
        "ttl",
        "a key past its retention executes anew",
        "19",
        _ttl,
        _two,
        _two,
        _needs("ttl", "give --ttl SECONDS (the API's retention; the check waits that long)"),
        requires=("replay",),
    ),
    Check(
        "problem-json",
        "refusals are application/problem+json with type, title, status, detail",
        "24",
        _problem_json,
        lambda target: 0,
    ),
)
