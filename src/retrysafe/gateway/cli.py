"""The ``retrysafe gateway`` subcommand: parse the flags, validate the settings, serve.

Nothing here imports the gateway's extra dependencies until the command runs, so that the rest
of the ``retrysafe`` command works without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

__all__ = ["add_parser"]

EXTRAS = ("uvicorn", "httptools", "prometheus_client")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``retrysafe gateway`` to the command."""
    parser = subparsers.add_parser(
        "gateway",
        help="run a reverse proxy that gives any HTTP API the Idempotency-Key contract",
        description="Forward every request to the upstream, with the Idempotency-Key contract"
        " in front: keyed POST/PATCH requests are executed once, retries get the recorded"
        " answer. Flags override the --config file; see docs/gateway.md.",
    )
    parser.add_argument(
        "--upstream", metavar="URL", help="the API to protect: http(s)://host[:port][/base/path]"
    )
    parser.add_argument(
        "--store", metavar="URL", help="the ledger (default: sqlite:///retrysafe.db, here)"
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument(
        "--workers", type=_workers, metavar="N", help="worker processes (default 1)"
    )
    parser.add_argument(
        "--ttl",
        type=_positive_float,
        metavar="S",
        help="how long outcomes are replayed, seconds (default 86400)",
    )
    parser.add_argument(
        "--lease", type=_positive_float, metavar="S", help="claim lease, seconds (default 15)"
    )
    parser.add_argument(
        "--require-key",
        action="store_true",
        default=None,
        help="refuse protected requests without a key (400 missing-key)",
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML file (routes, limits, ...)")
    parser.add_argument(
        "--admin-prefix",
        metavar="PATH",
        help='where health and metrics live (default /_retrysafe; "" turns them off)',
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_float,
        metavar="S",
        help="upstream connect timeout (default 5)",
    )
    parser.add_argument(
        "--read-timeout",
        type=_positive_float,
        metavar="S",
        help="longest wait for the upstream's next byte (default 60)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        metavar="S",
        help="how long in-flight requests may finish at shutdown (default 30)",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one JSON line per request on stdout (default on)",
    )
    parser.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    # Found, not imported: prometheus_client must be imported only after the server has set
    # its multiprocess directory.
    for name in EXTRAS:
        if importlib.util.find_spec(name) is None:
            print(
                f"retrysafe gateway needs {', '.join(EXTRAS)}: pip install 'retrysafe[gateway]'",
                file=sys.stderr,
            )
            return 2
    from ..errors import ConfigError
    from .config import load_settings
    from .server import serve

    names = (
        "upstream", "store", "host", "port", "workers", "ttl", "lease", "require_key",
        "admin_prefix", "connect_timeout", "read_timeout", "shutdown_timeout", "access_log",
        "log_level",
    )  # fmt: skip
    flags: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        settings = load_settings(args.config, **flags)
    except ConfigError as exc:
        print(f"retrysafe gateway: {exc}", file=sys.stderr)
        return 2
    return serve(settings, args.config, flags)
