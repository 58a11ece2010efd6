"""``retrysafe check URL ...``: parse the options, state the plan, ask, run, report.

httpx is imported only when the command runs, so that the rest of ``retrysafe`` works without
the ``client`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .plan import CHECKS, Outcome, Plan, Result, Target, Verdict, make_plan

__all__ = ["add_parser"]

MAX_CONCURRENCY = 64
MAX_TTL = 3600.0

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
"""An HTTP token (RFC 9110 5.6.2): what a header name or a method may be."""
_NOT_IN_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
"""The characters a header value cannot carry (controls other than tab)."""


class UsageError(Exception):
    """The command line asks for something that cannot be done: status 2, one line."""


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not _TOKEN.match(name):
        # echoed only when it cannot be a credential run into the name
        shown = repr(name[:40]) if sep and " " not in name else "a header without a name"
        raise argparse.ArgumentTypeError(f"write 'Name: value', not {shown}")
    value = value.strip()
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        # the value is not echoed: it is often a credential
        raise argparse.ArgumentTypeError(f"{name}: the value is not Latin-1 text") from None
    if _NOT_IN_VALUE.search(value):
        raise argparse.ArgumentTypeError(f"{name}: control characters in the header value")
    return name, value


def _number(
    low: float, high: float, kind: type[int] | type[float] = float
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` to the ``retrysafe`` command."""
    ids = ", ".join(check.id for check in CHECKS)
    parser = subparsers.add_parser(
        "check",
        help="check a live endpoint, in any language, against the Idempotency-Key contract",
        description="Send real requests to an endpoint and report, rule by rule of the contract,"
        " whether it is retry-safe. The plan (how many requests, how many at once) is stated"
        " first, and nothing is sent until you confirm (or pass --yes). Exit status: 0 when"
        " every check that applied passed, 1 when one failed, 2 for usage or connection errors.",
    )
    parser.add_argument("url", metavar="URL", help="the endpoint (http:// or https://)")
    request = parser.add_argument_group("the request")
    request.add_argument("-X", "--request", dest="method", default="POST", metavar="METHOD")
    request.add_argument(
        "-d", "--data", metavar="JSON|@FILE", help="the body (JSON is sent as application/json)"
    )
    request.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header of every request (credentials, Content-Type); repeatable",
    )
    request.add_argument(
        "--key-header", default="Idempotency-Key", metavar="NAME", help="(Idempotency-Key)"
    )
    probes = parser.add_argument_group("what to check")
    probes.add_argument(
        "--second-auth",
        type=_header,
        metavar="'NAME: VALUE'",
        help="another caller's credentials (replaces the -H of that name): enables other-caller",
    )
    probes.add_argument(
        "--fail-with",
        type=_header,
        metavar="'NAME: VALUE'",
        help="a header that makes the API answer 5xx: enables 5xx-released and stuck-key",
    )
    probes.add_argument(
        "--ttl",
        type=_number(0.01, MAX_TTL),
        metavar="SECONDS",
        help="the API's retention: enables ttl, which waits that long",
    )
    probes.add_argument(
        "--require-key", action="store_true", help="judge a request without a key (expect 400)"
    )
    probes.add_argument(
        "--other-path", metavar="PATH", help="for other-path (default: URL + /retrysafe-check)"
    )
    probes.add_argument(
        "--other-data", metavar="JSON|@FILE", help="for other-body (default: derived)"
    )
    probes.add_argument("--only", metavar="IDS", help=f"comma-separated checks to run: {ids}")
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--concurrency",
        type=_number(2, MAX_CONCURRENCY, int),
        default=5,
        metavar="N",
        help="duplicates sent at once, and the most requests in flight (5)",
    )
    limits.add_argument(
        "--timeout", type=_number(0.1, 300), default=10.0, metavar="S", help="per request (10)"
    )
    limits.add_argument(
        "--stuck-wait",
        type=_number(0, 60),
        default=1.0,
        metavar="SECONDS",
        help="how long stuck-key retries a 409 before calling the key stuck (1)",
    )
    run = parser.add_argument_group("running and reporting")
    run.add_argument("-y", "--yes", action="store_true", help="send without asking")
    run.add_argument("--dry-run", action="store_true", help="print the plan, send nothing")
    run.add_argument("--json", metavar="FILE", help="write the report as JSON")
    run.add_argument("--junit", metavar="FILE", help="write the report as JUnit XML")
    run.add_argument("-v", "--verbose", action="store_true", help="evidence under every check")
    parser.set_defaults(run=_check)


def _body(text: str | None, option: str) -> bytes | None:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"{option}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        # surrogateescape: the bytes of an argument that was not UTF-8, as they were given
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UsageError(f"{option}: not text that can be sent: {text!r}") from None


def _is_json(body: bytes) -> bool:
    import json

    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _url(text: str) -> str:
    """``text`` if it is an http(s) URL the checker can send to, else a :class:`UsageError`."""
    try:
        parts = urlsplit(text)
        port = parts.port  # a port out of range or not a number raises here
    except ValueError as exc:
        raise UsageError(f"not a valid URL: {text!r} ({exc})") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UsageError(f"not an http(s) URL: {text!r}")
    if port == 0:
        raise UsageError(f"not a valid URL: {text!r} (port 0)")
    if not text.isprintable() or any(c.isspace() for c in text):
        raise UsageError(f"not a valid URL: {text!r} (spaces or control characters)")
    _sendable(text, "URL")
    return text


def _sendable(url: str, what: str) -> None:
    """Refuse what httpx would refuse only once the run has started."""
    import httpx  # present: checked before the command line is read

    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UsageError(f"{what}: not a valid URL: {url!r} ({exc})") from None


def _key_header(args: argparse.Namespace) -> str:
    """The key's header name; refused when the caller's headers already send it."""
    name: str = args.key_header
    if not _TOKEN.match(name):
        raise UsageError(f"--key-header: not a header name: {name!r}")
    given = [("-H", header) for header in args.headers]
    for option, header in (("--second-auth", args.second_auth), ("--fail-with", args.fail_with)):
        if header is not None:
            given.append((option, header))
    for option, (header, _) in given:
        if header.lower() == name.lower():
            raise UsageError(
                f"{option} '{header}: ...': the checker sends its own keys in {name} (one per"
                " check, prefixed so that they can be found): drop this header"
            )
    return name


def _target(args: argparse.Namespace) -> Target:
    url = _url(args.url)
    method = args.method.upper()
    if not _TOKEN.match(method):
        raise UsageError(f"-X: not a method: {args.method!r}")
    if method in {"GET", "HEAD", "OPTIONS"}:
        raise UsageError(f"-X {method}: check a method the API protects (POST, PATCH)")
    body = _body(args.data, "--data") or b""
    headers = list(args.headers)
    if body and _is_json(body) and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", "application/json"))
    only = None
    if args.only is not None:
        only = frozenset(part.strip() for part in args.only.split(",") if part.strip())
        unknown = only - {check.id for check in CHECKS}
        if unknown or not only:
            raise UsageError(f"--only: unknown checks {', '.join(sorted(unknown)) or '(none)'}")
    if args.other_path is not None and not args.other_path.startswith("/"):
        raise UsageError("--other-path: give a path starting with /")
    key_header = _key_header(args)
    target = Target(
        url=url,
        method=method,
        body=body,
        headers=tuple(headers),
        key_header=key_header,
        concurrency=args.concurrency,
        timeout=args.timeout,
        second_auth=args.second_auth,
        fail_with=args.fail_with,
        ttl=args.ttl,
        require_key=args.require_key,
        other_path=args.other_path,
        other_body=_body(args.other_data, "--other-data"),
        stuck_wait=args.stuck_wait,
        only=only,
    )
    parts = urlsplit(url)
    _sendable(f"{parts.scheme}://{parts.netloc}{target.reused_path()}", "--other-path")
    return target


def _confirmed(plan: Plan) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(
            "check sends real requests: confirm with --yes (--dry-run shows the plan); nothing sent"
        )
    try:
        answer = input(f"Send these {plan.requests} requests to {plan.target.shown_url}? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in {"y", "yes"}


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _check(args: argparse.Namespace) -> int:
    try:
        return _check_or_raise(args)
    except UsageError as exc:
        print(f"retrysafe check: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retrysafe check: interrupted; the report is incomplete", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_or_raise(args: argparse.Namespace) -> int:
    try:
        importlib.import_module("httpx")
    except ImportError:
        raise UsageError("needs httpx: pip install 'retrysafe[client]'") from None
    # Imported only now: the rest of the command must work without httpx.
    from . import report
    from .runner import KEY_PREFIX, TargetError, run_plan

    plan = make_plan(_target(args))
    run_id = secrets.token_hex(4)
    print(report.plan_text(plan, key_prefix=f"{KEY_PREFIX}{run_id}-"), flush=True)
    if args.dry_run:
        return 0
    if not args.yes and not _confirmed(plan):
        raise UsageError("not confirmed; nothing sent")
    finished: list[Result] = []
    try:
        results = asyncio.run(run_plan(plan, run_id=run_id, on_result=finished.append))
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        if not finished:
            raise
        results = _interrupted(plan, finished)
    colour = _colour()
    print()
    print(report.table(results, colour=colour, verbose=args.verbose))
    print()
    print(report.summary(results, colour=colour))
    if args.json is not None:
        _write(args.json, report.json_text(plan, results))
    if args.junit is not None:
        _write(args.junit, report.to_junit(plan, results))
    status = report.exit_status(results)
    for result in results:
        if result.outcome is Outcome.ERROR:
            print(
                f"retrysafe check: {result.id}: {_one_line(result.reason)}; the run stopped there,"
                " the report is incomplete",
                file=sys.stderr,
            )
    return status


def _interrupted(plan: Plan, finished: list[Result]) -> list[Result]:
    """The report of a run stopped by Ctrl-C: the checks done, the one interrupted (ERROR,
    with what it had sent), then the rest as not run."""
    results = finished[:]
    for planned in plan.checks[len(finished) :]:
        if results[-1].outcome is Outcome.ERROR:
            verdict = Verdict(Outcome.SKIP, "not run: the run was interrupted")
        else:  # stopped between two checks
            verdict = Verdict(Outcome.ERROR, "interrupted before it finished")
        results.append(Result.of(planned.check, verdict, [], 0))
    return results


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
