"""The gateway's settings: a TOML file and command-line flags, validated once at start.

Flags override the file, the file overrides the defaults. Every error names the file and line
(``gateway.toml:12: routes[2].outcome: ...``), so that a bad deploy fails loudly at start.
"""

from __future__ import annotations

import contextvars
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..engine import DEFAULT_NAMESPACE, DEFAULT_STORE
from ..errors import ConfigError
from ..policy import DEFAULT_DENIED_HEADERS, PolicyOptions, Route, default_store_status
from ..problems import DEFAULT_PROBLEM_BASE
from ..stores import open_store

__all__ = [
    "UPSTREAM_FAILURE",
    "GatewaySettings",
    "OutcomePolicy",
    "RouteSettings",
    "UpstreamSettings",
    "load_settings",
]

UPSTREAM_FAILURE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "retrysafe_gateway_upstream_failure", default=None
)
"""Set by the proxy (in the request's own task) when the upstream failed: ``"not-sent"`` when
it never got the request and ``"unknown"`` when it may have executed it (the proxy answers
502/504 itself), ``"cut-short"`` when its answer broke off after the status was forwarded."""

OUTCOMES = ("default", "success")
FAILURE_POLICIES = ("release", "keep")


class OutcomePolicy:
    """Which statuses are final (stored), per route: a ``store_status`` for the engine.

    ``outcome="default"`` is the contract's rule 14; ``"success"`` stores only 2xx and 3xx.
    ``store_statuses``/``release_statuses`` add exceptions. The gateway's own 502/504 (the
    upstream failed) release the key, unless ``upstream_failure="keep"`` and the upstream may
    have executed the request (it was sent): then the problem is stored and replayed.
    """

    __slots__ = ("keep_upstream_failures", "outcome", "release", "store")

    def __init__(
        self,
        outcome: str = "default",
        store: frozenset[int] = frozenset(),
        release: frozenset[int] = frozenset(),
        upstream_failure: str = "release",
    ) -> None:
        self.outcome = outcome
        self.store = store
        self.release = release
        self.keep_upstream_failures = upstream_failure == "keep"

    def __call__(self, status: int) -> bool:
        failure = UPSTREAM_FAILURE.get()
        if failure == "cut-short":  # the upstream's own status, cut off: kept only if final
            return self.keep_upstream_failures and self._final(status)
        if failure is not None:
            return self.keep_upstream_failures and failure == "unknown"
        return self._final(status)

    def _final(self, status: int) -> bool:
        if status in self.release:
            return False
        if status in self.store:
            return True
        if self.outcome == "success":
            return 200 <= status < 400
        return default_store_status(status)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    idle_timeout: float = 1.0
    max_idle: int = 256
    preserve_host: bool = False
    ca_file: str | None = None
    """PEM file of the authorities trusted for an https:// upstream (default: the system's)."""
    verify: bool = True
    """Whether an https:// upstream's certificate and name are checked (off only for tests)."""
    cert_file: str | None = None
    """PEM client certificate for mutual TLS (with ``key_file``, or a key in the same file)."""
    key_file: str | None = None
    host: str = field(init=False)
    port: int = field(init=False)
    tls: bool = field(init=False)
    base_path: bytes = field(init=False)
    host_header: bytes = field(init=False)

    def __post_init__(self) -> None:
        try:
            tls, host, port, base, host_header = parse_upstream_url(self.url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not tls and (self.ca_file or self.cert_file or self.key_file or not self.verify):
            raise ConfigError(
                f"TLS options (ca_file, cert_file, key_file, verify) need an https:// upstream,"
                f" not {self.url!r}"
            )
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file needs cert_file (the client certificate)")
        object.__setattr__(self, "tls", tls)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "base_path", base)
        object.__setattr__(self, "host_header", host_header)
        self.ssl_context()  # unreadable certificate files are refused at start

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings for an https:// upstream (``None`` for http://)."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the upstream's TLS files: {exc}") from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        return context


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """What the proxy needs per route (the engine holds the rest as a :class:`Route`)."""

    label: str
    """The route's pattern (``default`` for no route): the metrics' ``route`` label."""
    read_timeout: float
    route: Route | None = None
    keep_upstream_failures: bool = False
    """``upstream_failure = "keep"``: a request the upstream may have run is never sent twice."""


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    upstream: UpstreamSettings
    store: str = DEFAULT_STORE
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    admin_prefix: str = "/_retrysafe"
    shutdown_timeout: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    header: str = "Idempotency-Key"
    namespace: str = DEFAULT_NAMESPACE
    problem_base: str = DEFAULT_PROBLEM_BASE
    fail_open: bool = False
    defaults: PolicyOptions = field(default_factory=lambda: PolicyOptions())
    routes: tuple[RouteSettings, ...] = ()
    default_route: RouteSettings = field(default=RouteSettings("default", 60.0))

    def engine_routes(self) -> list[Route]:
        return [r.route for r in self.routes if r.route is not None]


def parse_upstream_url(url: str) -> tuple[bool, str, int, bytes, bytes]:
    """``http(s)://host:port/base`` -> (TLS?, host, port, base path without a trailing '/',
    Host value)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the upstream must be an http:// or https:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"the upstream URL has no host: {url!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"the upstream URL may hold only host, port and path: {url!r}")
    try:
        tls = parts.scheme == "https"
        default_port = 443 if tls else 80
        port = parts.port or default_port
    except ValueError as exc:
        raise ValueError(f"bad port in the upstream URL {url!r}: {exc}") from None
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port != default_port:
        netloc += f":{port}"
    return tls, host, port, parts.path.rstrip("/").encode(), netloc.encode("idna")


# -- reading the file -------------------------------------------------------------------------

_Checker = Callable[[Any], Any]


def _number(minimum: float = 0.0, *, positive: bool = False) -> _Checker:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if positive and not value > 0:
            raise ValueError(f"must be > 0, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    return check


def _integer(minimum: int = 0, maximum: int | None = None) -> _Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value!r}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _choice(*choices: str) -> _Checker:
    def check(value: Any) -> str:
        if value not in choices:
            expected = ", ".join(f'"{c}"' for c in choices)
            raise ValueError(f"expected one of {expected}, got {value!r}")
        return str(value)

    return check


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of names, got {value!r}")
    return tuple(value)


def _methods(value: Any) -> tuple[str, ...]:
    names = _names(value)
    for name in names:
        if not re.fullmatch(r"[A-Za-z]+", name):
            raise ValueError(f"not an HTTP method: {name!r}")
    return tuple(n.upper() for n in names)


def _statuses(value: Any) -> frozenset[int]:
    """A list of statuses: numbers (404) or ranges as strings ("500-599")."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of statuses, got {value!r}")
    out: set[int] = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            out.add(item)
        elif isinstance(item, str) and (m := re.fullmatch(r"([1-5]\d\d)-([1-5]\d\d)", item)):
            out.update(range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            raise ValueError(f'expected statuses (404) or ranges ("500-599"), got {item!r}')
    return frozenset(out)


def _prefix(value: Any) -> str:
    text = _string(value)
    if text and (not text.startswith("/") or text.endswith("/") or "?" in text):
        raise ValueError(f'expected "" (no admin endpoints) or a path like "/_retrysafe": {text!r}')
    return text


_POLICY_KEYS: dict[str, _Checker] = {
    "methods": _methods,
    "require_key": _boolean,
    "ttl": _number(positive=True),
    "lease": _number(positive=True),
    "wait": _number(),
    "max_request_body": _integer(),
    "max_response_body": _integer(),
    "exclude_fields": _names,
    "scope_headers": _names,
    "scope_cookies": _names,
    "denied_headers": _names,
}
_OUTCOME_KEYS: dict[str, _Checker] = {
    "outcome": _choice(*OUTCOMES),
    "store_statuses": _statuses,
    "release_statuses": _statuses,
    "upstream_failure": _choice(*FAILURE_POLICIES),
}
_ROUTE_KEYS: dict[str, _Checker] = {
    **_POLICY_KEYS,
    **_OUTCOME_KEYS,
    "path": _string,
    "read_timeout": _number(positive=True),
}
_SECTIONS: dict[str, dict[str, _Checker]] = {
    "gateway": {
        "upstream": _string,
        "store": _string,
        "host": _string,
        "port": _integer(0, 65535),
        "workers": _integer(1),
        "admin_prefix": _prefix,
        "shutdown_timeout": _number(),
        "access_log": _boolean,
        "log_level": _choice("critical", "error", "warning", "info", "debug"),
    },
    "upstream": {
        "connect_timeout": _number(positive=True),
        "read_timeout": _number(positive=True),
        "idle_timeout": _number(),
        "preserve_host": _boolean,
        "ca_file": _string,
        "verify": _boolean,
        "cert_file": _string,
        "key_file": _string,
    },
    "idempotency": {
        **_POLICY_KEYS,
        **_OUTCOME_KEYS,
        "header": _string,
        "namespace": _string,
        "problem_base": _string,
        "fail_open": _boolean,
    },
    "limits": {
        "max_request_body": _integer(),
        "max_response_body": _integer(),
        "max_idle_connections": _integer(0),
    },
}


class _Lines:
    """Where each key of a TOML document was written, for error messages (best effort)."""

    _TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    _KEY = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=')

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, int, str], int] = {}
        table, index = "", 0
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if match := self._TABLE.match(line):
                table = match.group(2)
                if match.group(1) == "[[":
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                else:
                    index = 0
                self.where.setdefault((table, index, ""), number)
            elif match := self._KEY.match(line):
                self.where.setdefault((table, index, match.group(2)), number)

    def line(self, table: str, index: int = 0, key: str = "") -> int | None:
        return self.where.get((table, index, key)) or self.where.get((table, index, ""))


class _Source:
    def __init__(self, path: Path | None, text: str) -> None:
        self.path = path
        self.lines = _Lines(text)

    def error(self, what: str, message: str, table: str, index: int = 0, key: str = "") -> str:
        line = self.lines.line(table, index, key)
        where = (
            f"{self.path}:{line}: " if self.path and line else f"{self.path}: " if self.path else ""
        )
        return f"{where}{what}: {message}"


def _read_table(
    source: _Source, table: str, values: Any, checkers: Mapping[str, _Checker], index: int = 0
) -> dict[str, Any]:
    what = table if table != "routes" else f"routes[{index + 1}]"
    if not isinstance(values, dict):
        raise ConfigError(source.error(what, "expected a table", table, index))
    out: dict[str, Any] = {}
    for name, value in values.items():
        checker = checkers.get(name)
        if checker is None:
            known = ", ".join(sorted(checkers))
            message = f"unknown setting {name!r} (known: {known})"
            raise ConfigError(source.error(what, message, table, index, name))
        try:
            out[name] = checker(value)
        except ValueError as exc:
            raise ConfigError(
                source.error(f"{what}.{name}", str(exc), table, index, name)
            ) from None
    return out


def _read_file(path: Path) -> tuple[_Source, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    source = _Source(path, text)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        if line is None and (m := re.search(r"line (\d+)", str(exc))):
            line = int(m.group(1))
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return source, document


def load_settings(config: str | Path | None = None, **flags: Any) -> GatewaySettings:
    """Build the settings from a TOML file (optional) and flags (None: not given).

    Flags: ``upstream``, ``store``, ``host``, ``port``, ``workers``, ``ttl``, ``lease``,
    ``require_key``, ``admin_prefix``, ``access_log``, ``log_level``, ``shutdown_timeout``,
    ``connect_timeout``, ``read_timeout``.
    """
    document: dict[str, Any] = {}
    source = _Source(None, "")
    if config is not None:
        source, document = _read_file(Path(config))
    sections: dict[str, dict[str, Any]] = {}
    for name, values in document.items():
        if name == "routes":
            continue
        checkers = _SECTIONS.get(name)
        if checkers is None:
            known = ", ".join([*_SECTIONS, "routes"])
            raise ConfigError(source.error(name, f"unknown section (known: {known})", name))
        sections[name] = _read_table(source, name, values, checkers)
    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError(source.error("routes", "expected [[routes]] tables", "routes"))
    gateway = sections.get("gateway", {})
    upstream_opts = sections.get("upstream", {})
    idempotency = sections.get("idempotency", {})
    limits = sections.get("limits", {})

    def flag(name: str, section: dict[str, Any], table: str) -> None:
        value = flags.get(name)
        if value is not None:
            try:  # a flag is checked as the file's setting would be
                section[name] = _SECTIONS[table][name](value)
            except ValueError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None

    for name in ("upstream", "store", "host", "port", "workers", "admin_prefix"):
        flag(name, gateway, "gateway")
    for name in ("access_log", "log_level", "shutdown_timeout"):
        flag(name, gateway, "gateway")
    for name in ("connect_timeout", "read_timeout"):
        flag(name, upstream_opts, "upstream")
    for name in ("ttl", "lease", "require_key"):
        flag(name, idempotency, "idempotency")

    url = gateway.pop("upstream", None)
    if not url:
        raise ConfigError("no upstream: pass --upstream URL or set upstream in [gateway]")
    max_idle = limits.pop("max_idle_connections", 256)
    try:
        upstream = UpstreamSettings(url, max_idle=max_idle, **upstream_opts)
    except TypeError as exc:  # pragma: no cover - the checkers above keep the keys known
        raise ConfigError(str(exc)) from None
    default_timeout = upstream.read_timeout

    engine_globals = {
        k: idempotency.pop(k) for k in ("header", "namespace", "problem_base", "fail_open")
        if k in idempotency
    }  # fmt: skip
    outcome_defaults = {k: idempotency.pop(k) for k in _OUTCOME_KEYS if k in idempotency}
    defaults: dict[str, Any] = {**limits, **idempotency}
    defaults["store_status"] = _outcome(outcome_defaults, {})
    _check_policy(defaults, source, "idempotency")

    routes = []
    for index, raw in enumerate(raw_routes):
        values = _read_table(source, "routes", raw, _ROUTE_KEYS, index)
        what = f"routes[{index + 1}]"
        pattern = values.pop("path", None)
        if pattern is None:
            raise ConfigError(
                source.error(what, 'a route needs a path ("/v1/charges/**")', "routes", index)
            )
        timeout = values.pop("read_timeout", default_timeout)
        outcome = {k: values.pop(k) for k in _OUTCOME_KEYS if k in values}
        options: dict[str, Any] = dict(values)
        options["store_status"] = _outcome(outcome_defaults, outcome)
        try:
            route = Route(pattern, **options)
            _check_policy({**defaults, **options}, source, "routes", index)
        except ConfigError as exc:
            raise ConfigError(source.error(what, str(exc), "routes", index, "path")) from None
        keep = options["store_status"].keep_upstream_failures
        routes.append(RouteSettings(pattern, timeout, route, keep))

    for name in ("header", "namespace"):
        if name in engine_globals and not engine_globals[name]:
            raise ConfigError(
                source.error(f"idempotency.{name}", "may not be empty", "idempotency", 0, name)
            )
    settings = GatewaySettings(
        upstream=upstream,
        defaults=PolicyOptions(**defaults),  # type: ignore[typeddict-item]
        routes=tuple(routes),
        default_route=RouteSettings(
            "default", default_timeout, None, defaults["store_status"].keep_upstream_failures
        ),
        **gateway,
        **engine_globals,
    )
    try:  # the URL is checked now (opening connects nothing), not in the workers after start
        open_store(settings.store)
    except ConfigError as exc:
        if flags.get("store") is not None:
            raise ConfigError(f"--store: {exc}") from None
        raise ConfigError(source.error("gateway.store", str(exc), "gateway", 0, "store")) from None
    return settings


def _outcome(defaults: Mapping[str, Any], route: Mapping[str, Any]) -> OutcomePolicy:
    merged = {**defaults, **route}
    return OutcomePolicy(
        merged.get("outcome", "default"),
        merged.get("store_statuses", frozenset()),
        merged.get("release_statuses", frozenset()),
        merged.get("upstream_failure", "release"),
    )


def _check_policy(options: Mapping[str, Any], source: _Source, table: str, index: int = 0) -> None:
    """Let the engine's own validation speak, with the line."""
    from ..policy import Policy

    try:
        Policy().with_options(PolicyOptions(**options))  # type: ignore[typeddict-item]
    except ConfigError as exc:
        what = table if table != "routes" else f"routes[{index + 1}]"
        raise ConfigError(source.error(what, str(exc), table, index)) from None


# The default deny-list, for documentation and for ``denied_headers`` that extend it.
DEFAULT_DENIED = tuple(sorted(DEFAULT_DENIED_HEADERS))
