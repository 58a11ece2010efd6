"""The ``retrysafe`` command: one argparse parser with a subcommand per task.

A subcommand is a function in ``COMMANDS`` that adds its parser; its work lives in its own module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

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


# -- the command ------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_demo,
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
    return run(args)
