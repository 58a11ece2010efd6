"""Running a plan against a live endpoint: one httpx client per run, at most ``concurrency``
requests in flight, a timeout on each, and no check sending more than the plan stated.

Every request goes through a :class:`Probe`, which counts it against its check's budget, gives
it a key with the run's recognisable prefix, and notes its answer as evidence.

What goes wrong on the way becomes a result, never a traceback: a request with no answer in
time or a connection cut mid-answer fails its check (:class:`ProbeFailed`); an endpoint that
cannot be reached, or an answer that cannot be read, ends the run with the check at hand as
ERROR and the rest as not run (the baseline's is raised as :class:`TargetError`, since nothing
was checked); a check going past its stated budget is an ERROR too (:class:`PlanExceeded`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .exchange import Exchange
from .plan import (
    Outcome,
    Plan,
    PlanExceeded,
    PlannedCheck,
    ProbeFailed,
    Result,
    Target,
    TargetError,
    Verdict,
)

__all__ = [
    "KEY_PREFIX",
    "Context",
    "PlanExceeded",
    "Probe",
    "ProbeFailed",
    "TargetError",
    "run_plan",
]

KEY_PREFIX = "retrysafe-check-"
MAX_BODY = 16 << 20
"""The most bytes of one answer the checker reads (decoded): beyond, the request fails."""
USER_AGENT = "retrysafe-check"


@dataclass
class Context:
    """What the checks of one run share."""

    target: Target
    run_id: str
    first: Exchange | None = None
    """The baseline's first execution, under :attr:`key_a`: what replays are compared with."""
    distinct: bool = False
    """Whether two executions of the request answer different bodies, so that a second
    execution shows from outside. When False, the checks that need to see one skip."""
    shared_cookies: frozenset[str] = frozenset()
    """The ``Set-Cookie`` values both of the baseline's executions got: not per execution, so
    one in a replay does not show that it was stored (a proxy in front may set it)."""
    problems: list[tuple[str, Exchange]] = field(default_factory=list)
    """Refusals seen with the expected status, for the ``problem-json`` check."""
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def key_a(self) -> str:
        return f"{KEY_PREFIX}{self.run_id}-A"

    def passed(self, check_id: str) -> bool:
        result = self.results.get(check_id)
        return result is not None and result.outcome is Outcome.PASS


class _Session:
    """The run's client, with the semaphore that bounds concurrency."""

    def __init__(self, client: httpx.AsyncClient, target: Target) -> None:
        self.client = client
        self.target = target
        self.slots = asyncio.Semaphore(target.concurrency)
        self.sent = 0
        parts = urlsplit(target.url)
        self.origin = f"{parts.scheme}://{parts.netloc}"


class Probe:
    """One check's way to the endpoint: at most ``budget`` requests, each noted as evidence."""

    def __init__(self, session: _Session, context: Context, check_id: str, budget: int) -> None:
        self._session = session
        self.context = context
        self.check_id = check_id
        self.budget = budget
        self.sent = 0
        self.evidence: list[str] = []

    def key(self, name: str) -> str:
        """A key unique to this run and check, recognisable by its prefix in the API's logs."""
        return f"{KEY_PREFIX}{self.context.run_id}-{self.check_id}-{name}"

    def note(self, line: str) -> None:
        self.evidence.append(line)

    async def send(
        self,
        label: str,
        *,
        key: str | None = None,
        key_headers: Sequence[tuple[str, bytes]] = (),
        method: str | None = None,
        target: str | None = None,
        body: bytes | None = None,
        auth: tuple[str, str] | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> Exchange:
        """Send the checked request, changed as asked; return what came back.

        ``key`` sends it under the configured key header; ``key_headers`` sends these raw
        headers instead (malformed forms). ``target`` replaces the path and query, ``auth``
        replaces the caller's header of that name, ``extra`` adds headers.
        """
        if self.sent >= self.budget:
            raise PlanExceeded(
                f"a bug of the checker: {self.check_id} would send more than the"
                f" {self.budget} requests the plan stated; not sent, the run stops (please report)"
            )
        self.sent += 1
        session = self._session
        spec = session.target
        method = method or spec.method
        path = target if target is not None else spec.path
        pairs: list[tuple[str, bytes]] = []
        replaced = auth[0].lower() if auth else None
        for name, value in spec.headers:
            if name.lower() != replaced:
                pairs.append((name, value.encode("latin-1")))
        if auth is not None:
            pairs.append((auth[0], auth[1].encode("latin-1")))
        pairs.extend((name, value.encode("latin-1")) for name, value in extra)
        if key is not None:
            pairs.append((spec.key_header, key.encode("ascii")))
        pairs.extend(key_headers)
        headers = [(name.encode("ascii"), value) for name, value in pairs]
        content = (spec.body if body is None else body) if method not in {"GET", "HEAD"} else None
        async with session.slots:
            session.sent += 1
            response, answer = await self._exchange(label, method, path, content, headers)
        exchange = Exchange(
            label=label,
            method=method,
            target=path,
            status=response.status_code,
            headers=tuple(
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in response.headers.raw
            ),
            body=answer,
        )
        self.evidence.append(exchange.line())
        return exchange

    async def _exchange(
        self,
        label: str,
        method: str,
        path: str,
        content: bytes | None,
        headers: list[tuple[bytes, bytes]],
    ) -> tuple[httpx.Response, bytes]:
        """One request and its whole answer, within ``--timeout`` from the first byte sent to
        the last byte read (httpx's own timeouts bound each read, not the whole: an answer
        trickled a byte at a time would never end) and at most :data:`MAX_BODY` bytes."""
        session = self._session
        spec = session.target
        sent: list[bool] = []

        async def trace(event: str, info: object) -> None:
            if "send_request_headers" in event:
                sent.append(True)

        try:
            async with asyncio.timeout(spec.timeout):
                request = session.client.build_request(
                    method,
                    session.origin + path,
                    content=content,
                    headers=headers,
                    extensions={"trace": trace},
                )
                response = await session.client.send(request, stream=True)
                try:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_BODY:
                            raise ProbeFailed(
                                f"{label}: the answer is larger than {MAX_BODY >> 20} MiB;"
                                " not read further"
                            )
                        chunks.append(chunk)
                finally:
                    await response.aclose()
        except TimeoutError:
            if not sent:
                raise TargetError(
                    f"cannot connect to {spec.shown_origin}: no connection within"
                    f" {spec.timeout:g} s (--timeout)"
                ) from None
            raise ProbeFailed(f"{label}: no answer within {spec.timeout:g} s (--timeout)") from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise TargetError(f"cannot connect to {spec.shown_origin}: {exc}") from None
        except httpx.TimeoutException:
            raise ProbeFailed(f"{label}: no answer within {spec.timeout:g} s (--timeout)") from None
        except httpx.TransportError as exc:
            raise ProbeFailed(f"{label}: the connection failed: {exc!r}") from None
        except httpx.HTTPError as exc:  # DecodingError: a body its Content-Encoding belies
            raise TargetError(
                f"{label}: the answer cannot be read: {type(exc).__name__}: {exc}"
            ) from None
        except httpx.InvalidURL as exc:
            raise TargetError(f"{label}: cannot send to {spec.shown_origin}{path}: {exc}") from None
        return response, b"".join(chunks)

    async def send_many(self, label: str, count: int, *, key: str) -> list[Exchange]:
        """Send ``count`` copies at once (as at once as the concurrency bound allows).

        If one fails, the others are cancelled and waited for before the failure is raised, so
        that no request of this check is still in flight when the next check starts.
        """
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.send(f"{label} {i + 1}", key=key)) for i in range(count)
                ]
        except ExceptionGroup as failures:
            raise _gravest(failures) from None
        return [task.result() for task in tasks]

    def problem(self, exchange: Exchange) -> None:
        """Note a refusal, so that the ``problem-json`` check judges its form."""
        self.context.problems.append((self.check_id, exchange))


def _gravest(failures: ExceptionGroup[Exception]) -> Exception:
    """The failure of a group of requests that decides the check: the checker's own bug, then
    the endpoint gone, then a request without an answer. Anything else is not expected, and
    raised as it is."""
    for kind in (PlanExceeded, TargetError, ProbeFailed):
        for failure in failures.exceptions:
            if isinstance(failure, kind):
                return failure
    raise failures


async def run_plan(
    plan: Plan,
    *,
    run_id: str | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every check of ``plan`` in order, one result for each.

    Raise :class:`TargetError` if the endpoint cannot be checked at all (the baseline could
    not finish). A check that cannot finish later is an ERROR result, and the checks after
    it are reported as not run: what was found before is kept.
    """
    target = plan.target
    context = Context(target, run_id or secrets.token_hex(4))
    limits = httpx.Limits(
        max_connections=target.concurrency, max_keepalive_connections=target.concurrency
    )
    results: list[Result] = []
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(target.timeout),
        limits=limits,
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
        trust_env=False,
    ) as client:
        session = _Session(client, target)
        stopped: str | None = None
        for planned in plan.checks:
            if stopped is not None:
                result = Result.of(
                    planned.check, Verdict(Outcome.SKIP, f"not run: the run stopped at {stopped}"),
                    [], 0,
                )  # fmt: skip
            else:
                result = await _run_one(planned, session, context, on_result)
                if result.outcome is Outcome.ERROR:
                    if not results:
                        raise TargetError(result.reason)
                    stopped = result.id
            context.results[planned.check.id] = result
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


async def _run_one(
    planned: PlannedCheck,
    session: _Session,
    context: Context,
    on_result: Callable[[Result], None] | None = None,
) -> Result:
    check = planned.check
    if planned.skip is not None:
        return Result.of(check, Verdict(Outcome.SKIP, planned.skip), [], 0)
    probe = Probe(session, context, check.id, planned.requests)
    try:
        verdict = await check.run(context, probe)
    except asyncio.CancelledError:
        # Interrupted (Ctrl-C): the report still says what this check had sent.
        if on_result is not None:
            interrupted = Verdict(Outcome.ERROR, "interrupted before it finished")
            on_result(Result.of(check, interrupted, probe.evidence, probe.sent))
        raise
    except ProbeFailed as exc:
        verdict = Verdict(Outcome.FAIL, str(exc))
    except (TargetError, PlanExceeded) as exc:
        verdict = Verdict(Outcome.ERROR, str(exc))
    return Result.of(check, verdict, probe.evidence, probe.sent)
