"""The ``retrysafe`` command: one argparse parser with a subcommand per task.

A subcommand is a function in ``COMMANDS`` that adds its parser; its work lives in its own module.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import admin
from .check import cli as check_cli
from .engine import DEFAULT_NAMESPACE, DEFAULT_STORE
from .errors import ConfigError, StoreError
from .gateway import cli as gateway_cli
from .keys import MalformedKey, parse_key
from .stores import MemoryStore, SQLiteStore, Store, open_store, redact_url

__all__ = ["COMMANDS", "build_parser", "main"]


def _version() -> str:
    try:
        return version("retrysafe")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _purchase_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError("must be between 1 and 10000")
    return value


# -- demo -------------------------------------------------------------------------------------

DEMO_EXTRAS = ("uvicorn", "httpx")
DEMO_PURCHASES = 20
DEMO_SEED = 7


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="show retries double-charging a payments API, and retrysafe preventing it",
        description="Run a small payments API under uvicorn twice, bare and behind retrysafe,"
        " and send it the same purchases through a flaky network.",
    )
    parser.add_argument(
        "--purchases",
        type=_purchase_count,
        default=DEMO_PURCHASES,
        metavar="N",
        help=f"purchases to make (default {DEMO_PURCHASES})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_SEED,
        help=f"seed of the faults both runs face (default {DEMO_SEED})",
    )
    parser.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    for name in DEMO_EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            print(
                f"retrysafe demo needs {' and '.join(DEMO_EXTRAS)}: pip install 'retrysafe[demo]'",
                file=sys.stderr,
            )
            return 2
    # Imported only now: the command's other subcommands must work without the demo extra.
    from .demo import format_report, run_demo

    demo = run_demo(args.purchases, args.seed)
    print(format_report(demo))
    # The demo doubles as a smoke test: a double charge behind retrysafe is a bug, not a show.
    return 0 if demo.protected.charges == demo.protected.purchases else 1


# -- operators' commands: keys, stats, store init ---------------------------------------------

STORE_ENV = "RETRYSAFE_STORE"
DELETE_ID_BYTES = 6
"""The shortest record-id prefix ``keys delete --id`` accepts: what the logs print."""


def _age(text: str) -> float:
    try:
        return admin.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _hex(text: str) -> bytes:
    if len(text.strip()) % 2:
        raise argparse.ArgumentTypeError(f"an even number of hex digits, please: {text!r}")
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hexadecimal: {text!r}") from None
    if not value:
        raise argparse.ArgumentTypeError("empty")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        # The text is not repeated: it may well be a credential with its colon forgotten.
        raise argparse.ArgumentTypeError("write 'Name: value' (no colon found)")
    return name.strip(), value.strip()


def _store_options(parser: argparse.ArgumentParser, *, json: bool = True) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        help=f"the ledger (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    )
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON, not a table")


def _record_options(parser: argparse.ArgumentParser) -> None:
    """How to name a record: its key and its caller's scope, or its id."""
    parser.add_argument("key", nargs="?", metavar="KEY", help="the Idempotency-Key value")
    parser.add_argument(
        "--id",
        type=_hex,
        metavar="HEX",
        help="the record id, or its start (logs show the first 12 hex digits)",
    )
    group = parser.add_argument_group(
        "the caller's scope (with KEY)",
        "By default the scope is the caller's credentials: give the headers it sent with -H,"
        " and the app's scope_headers/scope_cookies if it set any. An app with its own scope"
        " function: give the value it returns with --scope. With neither, the anonymous scope.",
    )
    group.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header the caller sent (Authorization, a cookie, ...); repeatable",
    )
    group.add_argument("--scope-header", action="append", default=[], metavar="NAME")
    group.add_argument("--scope-cookie", action="append", default=[], metavar="NAME")
    group.add_argument("--scope", metavar="VALUE", help="what the app's scope function returns")
    group.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the app's namespace")


def _add_keys(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="list, show, delete and purge the ledger's records",
        description="Inspect and manage the records of a ledger.",
    )
    commands = keys.add_subparsers(title="commands", metavar="COMMAND")
    keys.set_defaults(run=lambda args: _usage(keys))

    listing = commands.add_parser(
        "list",
        help="list live records, a page at a time",
        description="List live records, newest pages first as the store orders them; filters"
        " combine.",
    )
    _store_options(listing)
    listing.add_argument(
        "--scope-tag", type=_hex, metavar="HEX", help="only records of this scope (its tag)"
    )
    listing.add_argument("--state", choices=sorted(admin.STATES_BY_NAME))
    listing.add_argument("--older-than", type=_age, metavar="AGE", help="claimed before (2h)")
    listing.add_argument("--newer-than", type=_age, metavar="AGE", help="claimed within (15m)")
    listing.add_argument("--limit", type=_positive, default=50, help="records per page (50)")
    listing.add_argument("--cursor", help="continue where the previous page ended")
    listing.set_defaults(run=_keys_list)

    show = commands.add_parser("show", help="show one record and its stored response")
    _store_options(show)
    _record_options(show)
    show.set_defaults(run=_keys_show)

    delete = commands.add_parser(
        "delete",
        help="delete one record (its key can then run again)",
        description="Delete a record whatever its state. A deleted key executes anew on its next"
        " retry: use it to free a key, knowing that.",
    )
    _store_options(delete, json=False)
    _record_options(delete)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(run=_keys_delete)

    purge = commands.add_parser("purge", help="delete expired records now")
    _store_options(purge)
    purge.add_argument("--limit", type=_positive, help="delete at most this many")
    purge.set_defaults(run=_keys_purge)


def _add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stats = subparsers.add_parser("stats", help="count the ledger's records by state")
    _store_options(stats)
    stats.set_defaults(run=_stats)


def _add_store(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = subparsers.add_parser("store", help="set up a ledger")
    commands = store.add_subparsers(title="commands", metavar="COMMAND")
    store.set_defaults(run=lambda args: _usage(store))
    init = commands.add_parser(
        "init",
        help="create the ledger's tables (for databases where the app may not)",
        description="Create what the ledger needs, if missing; safe to run again.",
    )
    init.add_argument("url", metavar="URL", help="the ledger")
    init.set_defaults(run=_store_init)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _store_url(args: argparse.Namespace) -> str:
    url: str = args.store or os.environ.get(STORE_ENV) or DEFAULT_STORE
    return url


def _with_store(
    args: argparse.Namespace,
    work: Callable[[Store], Awaitable[int]],
    *,
    create: bool = False,
) -> int:
    """Open the ledger, run ``work`` on it, close it; map failures to messages and statuses."""
    url = args.url if create else _store_url(args)
    try:
        store = open_store(url)
    except ConfigError as exc:
        print(f"retrysafe: {exc}", file=sys.stderr)
        return 2
    if isinstance(store, MemoryStore):
        print("retrysafe: a memory:// ledger lives inside its own process", file=sys.stderr)
        return 2
    if not create:
        # Looking at a ledger never creates one: a mistyped file or table is an error.
        store.create = False
        if isinstance(store, SQLiteStore) and not os.path.exists(store.path):
            print(f"retrysafe: no ledger at {store.path}", file=sys.stderr)
            return 2

    async def run() -> int:
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(run())
    except StoreError as exc:
        print(f"retrysafe: {exc}", file=sys.stderr)  # it names the ledger (never a password)
        return 1
    except ConfigError as exc:
        print(f"retrysafe: {redact_url(url)}: {exc}", file=sys.stderr)
        return 1


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def _keys_list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        now = time.time()
        try:
            listing = await admin.list_records(
                store,
                limit=args.limit,
                cursor=args.cursor,
                scope_tag=args.scope_tag,
                state=None if args.state is None else admin.STATES_BY_NAME[args.state],
                older_than=args.older_than,
                newer_than=args.newer_than,
                now=now,
            )
        except ValueError as exc:  # a cursor of another ledger, or mangled
            print(f"retrysafe: --cursor: {exc}", file=sys.stderr)
            return 2
        if args.json:
            records = [admin.record_as_dict(rid, r, now) for rid, r in listing.records]
            _print_json({"records": records, "next_cursor": listing.cursor})
            return 0
        if listing.records:
            print(admin.record_table(listing.records, now))
        else:
            # Name the ledger looked at: a mistyped prefix, table or database looks empty.
            print(f"no records in {redact_url(_store_url(args))}")
        if listing.cursor is not None:
            more = shlex.quote(listing.cursor)
            print(f"more: retrysafe keys list --cursor {more} (and the same options)")
        return 0

    return _with_store(args, work)


async def _named_records(store: Store, args: argparse.Namespace) -> list[tuple[bytes, Any]]:
    if args.id is not None:
        return await admin.find_records(store, args.id)
    scope = admin.scope_of(
        scope=args.scope,
        headers=args.headers,
        scope_headers=args.scope_header,
        scope_cookies=args.scope_cookie,
    )
    rid = admin.record_id_of(args.namespace, scope, args.key)
    record = await store.get(rid)
    return [] if record is None else [(rid, record)]


def _check_named(args: argparse.Namespace) -> str | None:
    """Why the arguments do not name one record, or None."""
    if args.key is None and args.id is None:
        return "name the record by KEY (and its caller's scope) or by --id"
    if args.key is not None and args.id is not None:
        return "name the record by KEY (and its caller's scope) or by --id, not both"
    if args.scope is not None and (args.headers or args.scope_header or args.scope_cookie):
        # Either names the scope on its own: taking one silently could name another record.
        return "give the scope with --scope or with -H/--scope-header/--scope-cookie, not both"
    if args.key is not None:
        try:
            args.key = parse_key(args.key.encode("utf-8", "surrogateescape"))
        except MalformedKey as exc:
            return f"KEY: {exc}"
    return None


def _one(matches: list[tuple[bytes, Any]], args: argparse.Namespace) -> int | None:
    """None if ``matches`` holds exactly one record; else report and return the status."""
    if not matches:
        print("retrysafe: no live record by that name", file=sys.stderr)
        return 1
    if len(matches) > 1:
        print(
            f"retrysafe: {len(matches)} records start with {args.id.hex()}: give more digits",
            file=sys.stderr,
        )
        return 2
    return None


def _keys_show(args: argparse.Namespace) -> int:
    problem = _check_named(args)
    if problem:
        print(f"retrysafe: {problem}", file=sys.stderr)
        return 2

    async def work(store: Store) -> int:
        matches = await _named_records(store, args)
        failed = _one(matches, args)
        if failed is not None:
            return failed
        rid, record = matches[0]
        data = admin.record_as_dict(rid, record, time.time(), detail=True)
        if args.json:
            _print_json(data)
            return 0
        for name in ("id", "scope", "state", "token", "status", "body_bytes", "age"):
            print(f"{name:>11}: {'-' if data[name] is None else data[name]}")
        for name in ("created_at", "expires_at", "lease_until"):
            if data[name] is not None:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data[name]))
                print(f"{name:>11}: {stamp}")
        for header, value in data.get("headers", []):
            print(f"{'header':>11}: {header}: {value}")
        if data.get("damaged"):
            print(f"{'response':>11}: damaged (it will be dropped when the key comes back)")
        return 0

    return _with_store(args, work)


def _keys_delete(args: argparse.Namespace) -> int:
    problem = _check_named(args)
    if problem is None and args.id is not None and len(args.id) < DELETE_ID_BYTES:
        problem = f"--id: give at least {2 * DELETE_ID_BYTES} hex digits to delete (logs show 12)"
    if problem:
        print(f"retrysafe: {problem}", file=sys.stderr)
        return 2
    if not args.yes and not sys.stdin.isatty():
        print("retrysafe: deleting a record lets its key run again: add --yes", file=sys.stderr)
        return 2

    async def work(store: Store) -> int:
        matches = await _named_records(store, args)
        failed = _one(matches, args)
        if failed is not None:
            return failed
        rid, record = matches[0]
        if not args.yes:
            state = admin.STATE_NAMES[record.state]
            question = f"delete {state} record {rid.hex()}? its key will run again [y/N] "
            try:
                # Asked on the loop's own thread: nothing else runs meanwhile, and Ctrl-C
                # interrupts the question itself (a worker thread would hold the exit).
                answer = input(question)  # noqa: ASYNC250
            except (EOFError, KeyboardInterrupt):
                answer = ""
                print()
            if answer.strip().lower() not in {"y", "yes"}:
                print("nothing deleted")
                return 1
        deleted = await store.delete(rid)
        print(f"deleted {rid.hex()}" if deleted else "already gone")
        return 0

    return _with_store(args, work)


def _keys_purge(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        deleted = await admin.purge(store, args.limit)
        if args.json:
            _print_json({"deleted": deleted})
        else:
            print(f"purged {deleted} expired record{'s' if deleted != 1 else ''}")
        return 0

    return _with_store(args, work)


def _stats(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        stats = await store.stats()
        counts = {
            "in-flight": stats.in_flight,
            "done": stats.done,
            "not-replayable": stats.not_replayable,
            "committed": stats.committed,
            "expired": stats.expired,
        }
        if args.json:
            _print_json(counts)
            return 0
        width = max(len(str(n)) for n in counts.values())
        for name, n in counts.items():
            print(f"{name:>15}  {n:>{width}}")
        print(f"{'live':>15}  {sum(counts.values()) - stats.expired:>{width}}")
        return 0

    return _with_store(args, work)


def _store_init(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        await store.initialize()
        print(f"ledger ready: {redact_url(args.url)}")
        return 0

    return _with_store(args, work, create=True)


# -- the command ------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_demo,
    _add_keys,
    _add_stats,
    _add_store,
    check_cli.add_parser,
    gateway_cli.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrysafe", description="Idempotency-Key done right: safe retries."
    )
    parser.add_argument("--version", action="version", version=f"retrysafe {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``retrysafe`` command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: report the status instead
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = run(args)
        sys.stdout.flush()  # here, where a reader that left is caught below
        return status
    except BrokenPipeError:
        # The reader left (`retrysafe keys list | head`): not an error worth a traceback.
        # What is still buffered for it can go nowhere, so stdout goes to /dev/null, where
        # the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # as a shell reports a command ended by SIGPIPE
