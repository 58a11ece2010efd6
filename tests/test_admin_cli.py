"""Operators' commands (``retrysafe keys ...``, ``stats``, ``store init``) on every shared ledger.

Records are made the way production makes them, by the middleware in front of an app; the
commands then run through :func:`retrysafe.cli.main` on a handle of their own, as an operator's
shell would. ``memory://`` is left out: a second handle is a different ledger.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import drop_postgres_table, fresh_url

from retrysafe import IdempotencyMiddleware, open_store
from retrysafe.cli import main
from retrysafe.records import State

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ALICE = "Bearer alice-token"
BOB = "Bearer bob-token"


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger URL that a second handle (the command's) shares."""
    url = fresh_url(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        drop_postgres_table(url)


class App:
    """Counts executions; answers 201 with the count."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        self.calls += 1
        body = json.dumps({"n": self.calls}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def post(url: str, app: App, requests: list[tuple[str, str]]) -> list[int]:
    """POST ``(key, authorization)`` pairs through the middleware on ``url``; the statuses."""

    async def run() -> list[int]:
        layer = IdempotencyMiddleware(app, store=url)
        try:
            transport = httpx.ASGITransport(app=layer)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                statuses = []
                for key, auth in requests:
                    headers = {"Idempotency-Key": key, "Authorization": auth}
                    response = await client.post("/charges", json={"amount": 5}, headers=headers)
                    statuses.append(response.status_code)
                return statuses
        finally:
            await layer.aclose()

    return asyncio.run(run())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def listing(capsys: pytest.CaptureFixture[str], url: str, *options: str) -> dict[str, Any]:
    status, out, err = run_cli(capsys, "keys", "list", "--store", url, "--json", *options)
    assert status == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_list_shows_the_records_the_middleware_wrote(
    ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keys list`` shows each executed key as a done record with its status, as JSON and as a
    table."""
    assert post(ledger, App(), [("k-1", ALICE), ("k-2", ALICE), ("k-1", BOB)]) == [201] * 3
    data = listing(capsys, ledger)
    assert data["next_cursor"] is None
    records = data["records"]
    assert len(records) == 3
    assert {r["state"] for r in records} == {"done"}
    assert {r["status"] for r in records} == {201}
    assert len({r["scope"] for r in records}) == 2  # Alice's two keys share her scope's tag
    status, out, _ = run_cli(capsys, "keys", "list", "--store", ledger)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "SCOPE", "STATE", "STATUS"]
    assert len(lines) == 4
    assert all(" done " in line and " 201 " in line for line in lines[1:])


def test_show_finds_a_key_only_in_its_callers_scope(
    ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keys show KEY -H 'Authorization: ...'`` finds the caller's record and no other
    caller's; ``--id`` with the 12 digits the logs print finds it too."""
    post(ledger, App(), [("order-7", ALICE)])
    status, out, err = run_cli(
        capsys, "keys", "show", "order-7", "-H", f"Authorization: {ALICE}", "--store", ledger,
        "--json",
    )  # fmt: skip
    assert status == 0, err
    shown = json.loads(out)
    assert shown["state"] == "done"
    assert shown["status"] == 201
    assert ["content-type", "application/json"] in shown["headers"]
    status, _, err = run_cli(
        capsys, "keys", "show", "order-7", "-H", f"Authorization: {BOB}", "--store", ledger
    )
    assert status == 1
    assert "no live record" in err
    status, out, _ = run_cli(capsys, "keys", "show", "--id", shown["id"][:12], "--store", ledger)
    assert status == 0
    assert shown["id"] in out
    assert "201" in out


def test_delete_lets_the_key_run_again(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    """After ``keys delete KEY --yes`` the next retry of that key executes anew."""
    app = App()
    post(ledger, app, [("pay-1", ALICE), ("pay-1", ALICE)])
    assert app.calls == 1
    status, out, err = run_cli(
        capsys, "keys", "delete", "pay-1", "-H", f"Authorization: {ALICE}", "--yes",
        "--store", ledger,
    )  # fmt: skip
    assert status == 0, err
    assert out.startswith("deleted ")
    post(ledger, app, [("pay-1", ALICE)])
    assert app.calls == 2


def test_delete_without_yes_off_a_terminal_is_refused(
    ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--yes`` and without a terminal to ask on, ``keys delete`` deletes nothing."""
    app = App()
    post(ledger, app, [("pay-2", ALICE)])
    status, _, err = run_cli(
        capsys, "keys", "delete", "pay-2", "-H", f"Authorization: {ALICE}", "--store", ledger
    )
    assert status == 2
    assert "--yes" in err
    post(ledger, app, [("pay-2", ALICE)])
    assert app.calls == 1


def test_filters_and_pages(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Filters by state, scope tag and age select exactly their records; pages of ``--limit``
    followed by their cursors list every record once."""
    post(ledger, App(), [(f"a-{i}", ALICE) for i in range(5)] + [("b-0", BOB), ("b-1", BOB)])

    async def claim_one() -> None:
        store = open_store(ledger)
        try:
            rid = secrets.token_bytes(32)
            assert await store.claim(rid, 1, b"fp", 60, 60, scope=b"\x01" * 8) is None
        finally:
            await store.aclose()

    asyncio.run(claim_one())
    everything = listing(capsys, ledger)["records"]
    assert len(everything) == 8
    in_flight = listing(capsys, ledger, "--state", "in-flight")["records"]
    assert [r["scope"] for r in in_flight] == ["01" * 8]
    bob = next(r for r in everything if r["scope"] not in {"01" * 8} and r["state"] == "done")
    tag = bob["scope"]
    by_tag = listing(capsys, ledger, "--scope-tag", tag)["records"]
    assert len(by_tag) in {2, 5}
    assert {r["scope"] for r in by_tag} == {tag}
    assert listing(capsys, ledger, "--older-than", "1h")["records"] == []
    assert len(listing(capsys, ledger, "--newer-than", "1h")["records"]) == 8

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):
        options = ["--limit", "3"] + ([] if cursor is None else ["--cursor", cursor])
        page = listing(capsys, ledger, *options)
        seen += [r["id"] for r in page["records"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r["id"] for r in everything)


def test_stats_and_purge(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``stats`` counts records by state; ``keys purge`` removes the expired ones and no
    others."""

    async def fill() -> None:
        store = open_store(ledger)
        try:
            for i in range(3):
                rid = secrets.token_bytes(32)
                await store.claim(rid, i, b"fp", 60, 60)
                await store.complete(rid, i, State.DONE, None, 60)
            await store.claim(secrets.token_bytes(32), 9, b"fp", 60, 60)
            for i in range(4):  # expire almost at once
                rid = secrets.token_bytes(32)
                await store.claim(rid, i, b"fp", 0.2, 0.2)
                await store.complete(rid, i, State.NOT_REPLAYABLE, None, 0.2)
        finally:
            await store.aclose()

    asyncio.run(fill())
    time.sleep(0.6)
    status, out, err = run_cli(capsys, "keys", "purge", "--store", ledger, "--json")
    assert status == 0, err
    assert json.loads(out)["deleted"] in {0, 4}  # 0 where the store expires records itself
    status, out, err = run_cli(capsys, "stats", "--store", ledger, "--json")
    assert status == 0, err
    assert json.loads(out) == {
        "in-flight": 1, "done": 3, "not-replayable": 0, "committed": 0, "expired": 0,
    }  # fmt: skip
    status, out, _ = run_cli(capsys, "stats", "--store", ledger)
    assert status == 0
    assert [line.split() for line in out.splitlines()] == [
        ["in-flight", "1"], ["done", "3"], ["not-replayable", "0"], ["committed", "0"],
        ["expired", "0"], ["live", "4"],
    ]  # fmt: skip


def test_store_init_is_idempotent(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``store init URL`` prepares a ledger and can run again; the ledger then works."""
    for _ in range(2):
        status, out, err = run_cli(capsys, "store", "init", ledger)
        assert status == 0, err
        assert out.startswith("ledger ready: ")
    assert post(ledger, App(), [("after-init", ALICE)]) == [201]


def test_operator_mistakes_are_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad URLs, missing files, unreachable servers and bad names give a message and a status,
    never a traceback or a password."""
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    status, _, err = run_cli(capsys, "stats", "--store", missing)
    assert (status, "no ledger at") == (2, err[len("retrysafe: ") :][:12])
    assert not (tmp_path / "none.db").exists()
    status, _, err = run_cli(capsys, "stats", "--store", "ftp://x")
    assert status == 2
    assert "unknown store URL" in err
    status, _, err = run_cli(capsys, "stats", "--store", "redis://ops:s3cret@127.0.0.1:1/0")
    assert status == 1
    assert "s3cret" not in err
    assert "127.0.0.1:1" in err
    repeated = "postgresql://127.0.0.1/test?password=s3cret&password=s3cret"
    status, _, err = run_cli(capsys, "stats", "--store", repeated)
    assert status == 2
    assert "more than once" in err
    assert "s3cret" not in err
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    run_cli(capsys, "store", "init", url)
    status, _, err = run_cli(capsys, "keys", "show", "k", "--id", "abcd", "--store", url)
    assert status == 2
    assert "not both" in err
    both = ("--scope", "tenant-1", "-H", "Authorization: Bearer t")
    status, _, err = run_cli(capsys, "keys", "delete", "k", *both, "--store", url)
    assert status == 2
    assert "--scope or with -H" in err
    status, _, err = run_cli(capsys, "stats", "--store", url + "#2")
    assert status == 2
    assert "cannot hold one" in err  # not silently a ledger at another path
    status, out, _ = run_cli(capsys, "keys", "list", "--store", url)
    assert status == 0
    assert out.strip() == f"no records in {url!r}"  # a mistyped ledger looks empty: name it
    status, _, err = run_cli(capsys, "keys", "show", "a,b", "--store", url)
    assert status == 2
    assert "KEY:" in err
    status, _, err = run_cli(capsys, "keys", "list", "--older-than", "soon", "--store", url)
    assert status == 2
    assert "not a duration" in err


def test_looking_at_a_file_that_is_no_ledger_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listing, showing, counting, purging or deleting in an SQLite file without the ledger's
    table (or with a mistyped ?table=) is an error, and the file is left as it was."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    before = path.read_bytes()
    for url in (f"sqlite:///{path}", f"sqlite:///{path}?table=typo"):
        for argv in (
            ["keys", "list"], ["keys", "show", "k"], ["stats"], ["keys", "purge"],
            ["keys", "delete", "k", "--yes"],
        ):  # fmt: skip
            status, out, err = run_cli(capsys, *argv, "--store", url)
            assert status == 1, (argv, out, err)
            assert "no ledger table" in err
            assert f"retrysafe store init {url}`" in err  # the URL to run, ?table= included
    assert path.read_bytes() == before  # no table, no WAL mode, no user_version
    assert not Path(f"{path}-wal").exists()


def test_looking_at_a_missing_postgres_table_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keys list`` and ``stats`` on a PostgreSQL URL whose table does not exist say so and
    issue no DDL; ``store init`` then creates it."""
    url = fresh_url("postgres", tmp_path)
    try:
        for argv in (["keys", "list"], ["stats"]):
            status, _, err = run_cli(capsys, *argv, "--store", url)
            assert status == 1
            assert "retrysafe store init" in err
        assert (
            run_cli(capsys, "stats", "--store", url)[0] == 1
        )  # still missing: nothing was created by the first two
        assert run_cli(capsys, "store", "init", url)[0] == 0
        assert run_cli(capsys, "stats", "--store", url)[0] == 0
    finally:
        drop_postgres_table(url)


def test_store_init_creates_an_sqlite_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``store init sqlite:///new.db`` creates the file and its table: ``stats`` then works."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    status, out, err = run_cli(capsys, "store", "init", url)
    assert (status, err) == (0, "")
    assert (tmp_path / "new.db").exists()
    status, out, err = run_cli(capsys, "stats", "--store", url, "--json")
    assert status == 0, err
    assert json.loads(out)["done"] == 0


def test_a_ledger_in_a_missing_directory_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``store init`` of a file in a directory that does not exist names that directory."""
    url = f"sqlite:///{tmp_path / 'sub' / 'dir' / 'x.db'}"
    status, _, err = run_cli(capsys, "store", "init", url)
    assert status != 0
    assert f"the directory {tmp_path / 'sub' / 'dir'} does not exist" in err


def test_a_reader_that_leaves_gets_no_traceback(tmp_path: Path) -> None:
    """``retrysafe stats | head -0``: output to a closed pipe ends quietly (status 141)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert subprocess.run([sys.executable, "-m", "retrysafe", "store", "init", url]).returncode == 0
    with subprocess.Popen(
        [sys.executable, "-m", "retrysafe", "stats", "--store", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as command:  # fmt: skip
        assert command.stdout is not None
        assert command.stderr is not None
        command.stdout.close()  # the reader left before the first line
        err = command.stderr.read().decode()
    assert (command.returncode, err) == (141, "")


def test_a_cursor_of_no_page_is_refused(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A mangled ``--cursor`` is a one-line error with status 2 on every ledger."""
    post(ledger, App(), [("c-0", ALICE)])
    status, _, err = run_cli(capsys, "keys", "list", "--store", ledger, "--cursor", "zz|q")
    assert status == 2
    assert err.startswith("retrysafe: --cursor: ")
    assert len(err.splitlines()) == 1


def test_the_next_page_hint_can_be_pasted_into_a_shell(
    ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The "more:" line quotes its cursor (Redis's holds "|"): split as a shell would, it
    continues the listing."""
    import shlex

    post(ledger, App(), [(f"p-{i}", ALICE) for i in range(12)])
    ids: set[str] = set()
    cursor: str | None = None
    for _ in range(30):
        options = ["--limit", "2"] + ([] if cursor is None else ["--cursor", cursor])
        status, out, err = run_cli(capsys, "keys", "list", "--store", ledger, *options)
        assert status == 0, err
        lines = out.splitlines()
        ids |= {line.split()[0] for line in lines[1:] if not line.startswith("more: ")}
        more = [line for line in lines if line.startswith("more: ")]
        if not more:
            break
        words = shlex.split(more[0].removeprefix("more: ").split(" (and")[0])
        cursor = words[words.index("--cursor") + 1]
    assert len(ids) == 12


class Terminal:
    """A stdin that is a terminal whose user answers with ``answer`` (or ends the input)."""

    def __init__(self, answer: str | BaseException) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer", ["", "n\n", KeyboardInterrupt()], ids=["eof", "no", "ctrl-c"])
def test_a_delete_not_confirmed_deletes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str | BaseException,
) -> None:
    """At the confirmation prompt, "n", end of input (Ctrl-D) or Ctrl-C delete nothing and
    exit 1, without a traceback."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    post(url, App(), [("keep-me", ALICE)])
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    status, out, err = run_cli(
        capsys, "keys", "delete", "keep-me", "-H", f"Authorization: {ALICE}", "--store", url
    )
    assert (status, err) == (1, "")
    assert "nothing deleted" in out
    assert len(listing(capsys, url)["records"]) == 1


def test_headers_are_taken_as_the_bytes_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A credential with non-Latin-1 text names the record its caller made with those UTF-8
    bytes; a header without a colon is refused without repeating it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    token = "Bearer 日本-token"

    async def make() -> None:
        layer = IdempotencyMiddleware(App(), store=url)
        try:
            transport = httpx.ASGITransport(app=layer)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                headers = {b"Idempotency-Key": b"utf8", b"Authorization": token.encode()}
                assert (await client.post("/charges", headers=headers)).status_code == 201
        finally:
            await layer.aclose()

    asyncio.run(make())
    status, out, err = run_cli(
        capsys, "keys", "show", "utf8", "-H", f"Authorization: {token}", "--store", url
    )
    assert status == 0, err
    assert "done" in out
    status, _, err = run_cli(
        capsys, "keys", "show", "utf8", "-H", "Authorization Bearer sk_live_SECRET", "--store", url
    )
    assert status == 2
    assert "sk_live_SECRET" not in err


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://admin:hunter2@db/x.db",
        "redis://:hunter2@[::1/0",
        "postgresql://u:hunter2@h:99999/d",
        "postgresql://u:hun#ter2@127.0.0.1:5432/test",
        "redis://:hunter/2@127.0.0.1:6379",
        "rediss+cluster://:hun?ter2@127.0.0.1:7001",
        "postgresql://u:p#w@127.0.0.1/test?sslpassword=hunter2",
        "redis://127.0.0.1:6379/0?client_name=a@b&password=hunter2",
        "redis://:Xk?9=hunter2@127.0.0.1:6379/0",
        "postgresql://u:s3c?r=hunter2@127.0.0.1:5432/test",
        "postgresql://alice:hun@ter2/x@127.0.0.1:5432/test",
        "redis://:hun@ter2?x@127.0.0.1:6379/0",
        "redis://hun?ter2=x@127.0.0.1:6379/0",
    ],
    ids=[
        "sqlite-netloc", "bad-ipv6", "port-out-of-range", "raw-hash-in-password",
        "raw-slash-in-password", "raw-question-mark-in-password", "split-and-option-password",
        "option-password-after-an-at", "password-with-a-query", "pg-password-with-a-query",
        "at-then-slash-in-password", "at-then-query-in-password", "password-only-with-a-query",
    ],
)  # fmt: skip
def test_a_bad_store_url_is_one_line_without_its_password(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """A store URL that cannot be used is refused in one line with status 2; its password is
    not printed."""
    status, _, err = run_cli(capsys, "stats", "--store", url)
    assert status == 2
    assert err.startswith("retrysafe: ")
    assert len(err.splitlines()) == 1
    assert "hunter2" not in err
    assert "hun" not in err.replace("hunter/2", "")  # no piece of it either
    assert "ter2" not in err


def test_record_ids_are_whole_bytes_and_delete_needs_a_long_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An odd number of hex digits is named as such; ``delete --id`` wants the 12 digits the
    logs print, so one byte cannot pick a record to delete."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    post(url, App(), [("one", ALICE)])
    rid = listing(capsys, url)["records"][0]["id"]
    status, _, err = run_cli(capsys, "keys", "show", "--id", rid[:5], "--store", url)
    assert status == 2
    assert "even number of hex digits" in err
    status, _, err = run_cli(capsys, "keys", "delete", "--id", rid[:2], "--yes", "--store", url)
    assert status == 2
    assert "at least 12 hex digits" in err
    assert len(listing(capsys, url)["records"]) == 1
    status, _, err = run_cli(capsys, "keys", "delete", "--id", rid[:12], "--yes", "--store", url)
    assert status == 0, err
    assert listing(capsys, url)["records"] == []


def test_an_in_flight_record_past_its_lease_shows_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stuck key (in flight, lease run out) says "expired" under LEASE LEFT, not "-"."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def claim() -> None:
        store = open_store(url)
        try:
            assert await store.claim(secrets.token_bytes(32), 1, b"fp", 0.05, 60) is None
        finally:
            await store.aclose()

    asyncio.run(claim())
    time.sleep(0.2)
    status, out, _ = run_cli(capsys, "keys", "list", "--store", url)
    assert status == 0
    row = out.splitlines()[1]
    assert row.split()[2] == "in-flight"
    assert row.split()[-1] == "expired"


def test_memory_ledgers_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--store memory://`` would always look empty from another process: it is refused."""
    status, _, err = run_cli(capsys, "stats", "--store", "memory://")
    assert status == 2
    assert "memory://" in err


def test_a_filtered_listing_reads_whole_pages(tmp_path: Path) -> None:
    """With a filter matching few records, the listing asks the store for pages of ``limit``,
    not one record at a time."""
    from retrysafe import admin

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    post(url, App(), [(f"a-{i}", ALICE) for i in range(40)] + [("b-0", BOB)])

    async def scans() -> tuple[int, int]:
        store = open_store(url)
        try:
            everything = (await admin.list_records(store, limit=100)).records
            bob = {
                r.scope
                for _, r in everything
                if sum(x.scope == r.scope for _, x in everything) == 1
            }
            sizes: list[int] = []
            scan = store.scan

            async def counted(cursor: str | None = None, limit: int = 100) -> Any:
                sizes.append(limit)
                return await scan(cursor, limit)

            store.scan = counted  # type: ignore[method-assign]
            found = await admin.list_records(store, limit=4, scope_tag=bob.pop())
            assert set(sizes) == {4}
            return len(sizes), len(found.records)
        finally:
            await store.aclose()

    calls, found = asyncio.run(scans())
    assert found == 1
    assert calls <= 41 // 4 + 1
