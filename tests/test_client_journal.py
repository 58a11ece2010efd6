"""The key journal: an operation keeps its key across calls, clients and processes (until its
retention runs out), so a client killed mid-call and run again is replayed, not executed twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_servers import FakeClock, Stack, faulty_proxy, serve_protected
from servers import TESTS_DIR, poll_until

from retrysafe import AsyncClient, Client, ConfigError, KeyJournal, RetryPolicy, retry_info
from retrysafe.client.requests import Session

OPERATION = "order-42/charge"


@pytest.fixture
def stack() -> Iterator[Stack]:
    with serve_protected() as stack:
        yield stack


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


def fast_policy() -> RetryPolicy:
    return RetryPolicy(clock=FakeClock(), jitter=lambda: 0.5)


# --- the journal alone ------------------------------------------------------------------------


def test_an_operation_keeps_its_key_across_journal_instances(journal_path: Path) -> None:
    """Every instance opened on the file (as every process would) gets the operation's key;
    another operation gets another key."""
    first = KeyJournal(journal_path).key_for(OPERATION)
    assert KeyJournal(journal_path).key_for(OPERATION) == first
    assert KeyJournal(journal_path).get(OPERATION) == first
    assert KeyJournal(journal_path).key_for("order-43/charge") != first


def test_concurrent_first_uses_agree_on_one_key(journal_path: Path) -> None:
    """Eight threads with their own journal instances ask for a new operation's key at once:
    the mint-or-read is one transaction, so they all get the same key."""
    keys: list[str] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        journal = KeyJournal(journal_path)
        barrier.wait(10)
        keys.append(journal.key_for("order-99/charge"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(keys) == 8
    assert len(set(keys)) == 1


def test_keys_expire_with_the_retention(journal_path: Path) -> None:
    """A key lives ``retention`` seconds (the server's 24 h by default); after that the
    operation is a new one with a new key, and ``purge`` drops the dead entries."""
    now = [1_000_000.0]
    journal = KeyJournal(journal_path, clock=lambda: now[0])
    assert journal.retention == 86400
    key = journal.key_for(OPERATION)
    journal.key_for("other")
    now[0] += 86399
    assert journal.key_for(OPERATION) == key
    now[0] += 1
    assert journal.get(OPERATION) is None
    assert journal.purge() == 2
    fresh = journal.key_for(OPERATION)
    assert fresh != key


def test_forget_starts_an_operation_afresh(journal_path: Path) -> None:
    """``forget`` drops an operation's key: its next run is a new operation."""
    journal = KeyJournal(journal_path)
    key = journal.key_for(OPERATION)
    assert journal.forget(OPERATION)
    assert not journal.forget(OPERATION)
    assert journal.key_for(OPERATION) != key


def test_bad_journal_settings_and_names_are_refused(journal_path: Path) -> None:
    """Misuse fails early with ``ConfigError``: no retention, an empty operation name."""
    with pytest.raises(ConfigError):
        KeyJournal(journal_path, retention=0)
    with pytest.raises(ConfigError):
        KeyJournal(journal_path).key_for("")


def test_a_new_journal_file_is_private_to_the_user(tmp_path: Path) -> None:
    """A journal file created in an existing directory is mode 0600, whatever the umask allows."""
    path = tmp_path / "keys.db"
    KeyJournal(path).key_for(OPERATION)
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_journal_creates_its_missing_directory(tmp_path: Path, stack: Stack) -> None:
    """A journal path in a directory that does not exist yet works: the directories are made
    (the last one private to the user), directly and through ``Client(journal=PATH)``."""
    direct = tmp_path / "state" / "shop" / "keys.db"
    key = KeyJournal(direct).key_for(OPERATION)
    assert KeyJournal(direct).get(OPERATION) == key
    assert direct.parent.stat().st_mode & 0o777 == 0o700
    through_client = tmp_path / "other" / "keys.db"
    with Client(retry=fast_policy(), journal=through_client) as client:
        response = client.post(stack.url + "/charge", json={"amount": 1}, operation=OPERATION)
    info = retry_info(response)
    assert info is not None
    assert info.key == KeyJournal(through_client).get(OPERATION)


# --- through the clients ----------------------------------------------------------------------


def test_running_an_operation_again_is_replayed(stack: Stack, journal_path: Path) -> None:
    """Two runs of one operation by two clients (as by two runs of a program) send one key:
    the second run is replayed, the handler ran once; another operation executes."""
    url = stack.url + "/charge"
    with Client(retry=fast_policy(), journal=journal_path) as client:
        first = client.post(url, json={"amount": 1}, operation=OPERATION)
    with Client(retry=fast_policy(), journal=KeyJournal(journal_path)) as client:
        again = client.post(url, json={"amount": 1}, operation=OPERATION)
        other = client.post(url, json={"amount": 1}, operation="order-43/charge")
    one, two, three = (retry_info(r) for r in (first, again, other))
    assert one is not None
    assert two is not None
    assert three is not None
    assert one.key == two.key == KeyJournal(journal_path).get(OPERATION)
    assert (one.replayed, two.replayed, three.replayed) == (False, True, False)
    assert again.content == first.content
    assert stack.app.keys() == [one.key, three.key]


def test_retries_of_a_journaled_operation_keep_its_key(stack: Stack, journal_path: Path) -> None:
    """A journaled call that loses its response is retried with the journaled key."""
    with (
        faulty_proxy(stack.url, ["lose"]) as proxy,
        Client(retry=fast_policy(), journal=journal_path, timeout=5) as client,
    ):
        response = client.post(proxy.url + "/charge", json={"amount": 1}, operation=OPERATION)
    key = KeyJournal(journal_path).get(OPERATION)
    info = retry_info(response)
    assert info is not None
    assert (info.attempts, info.key, info.replayed) == (2, key, True)
    assert proxy.keys() == [key, key]
    assert stack.app.keys() == [key]


@pytest.mark.anyio
async def test_async_client_and_requests_session_share_the_journal(
    stack: Stack, journal_path: Path
) -> None:
    """``AsyncClient`` and the requests ``Session`` use the same journal the same way: the
    operation's second run, from the other client library, is replayed."""
    url = stack.url + "/charge"
    async with AsyncClient(retry=fast_policy(), journal=journal_path) as client:
        first = await client.post(url, json={"amount": 1}, operation=OPERATION)
    with Session(retry=fast_policy(), journal=journal_path) as session:
        again = session.post(url, json={"amount": 1}, operation=OPERATION)
    one, two = retry_info(first), retry_info(again)
    assert one is not None
    assert two is not None
    assert one.key == two.key
    assert two.replayed
    assert len(stack.app.executions) == 1


def test_operation_needs_a_journal_and_no_key_of_its_own(stack: Stack, journal_path: Path) -> None:
    """``operation=`` without a journal, or together with an explicit key, is a ``ConfigError``
    (nothing is sent)."""
    with Client() as client, pytest.raises(ConfigError):
        client.post(stack.url + "/charge", operation=OPERATION)
    with Client(journal=journal_path) as client, pytest.raises(ConfigError):
        client.post(stack.url + "/charge", operation=OPERATION, headers={"Idempotency-Key": "k"})
    assert stack.app.executions == []


# --- the crash test ---------------------------------------------------------------------------


def _run_child(url: str, journal: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "client_journal_child.py"), url, str(journal), OPERATION],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_client_killed_mid_operation_completes_it_with_the_same_key_when_rerun(
    stack: Stack, journal_path: Path
) -> None:
    """A client process SIGKILLed while its charge runs on the server, run again: it sends the
    journaled key, waits out the 409 ``in-progress`` while the first run's charge finishes,
    and gets that charge replayed. The server executed the operation once."""
    url = stack.url + "/gated"
    first = _run_child(url, journal_path)
    try:
        poll_until(lambda: len(stack.app.started) == 1, timeout=30, what="the charge to start")
        journaled = KeyJournal(journal_path).get(OPERATION)
        assert journaled is not None
        assert stack.app.started == [journaled]  # recorded before the request left
    finally:
        first.kill()
        first.communicate(timeout=10)
    assert first.returncode == -9

    second = _run_child(url, journal_path)
    try:
        poll_until(lambda: 409 in stack.recorder.statuses, timeout=30, what="a 409 in-progress")
        stack.app.gate.set()  # the first run's charge completes now
        out, err = second.communicate(timeout=30)
    finally:
        second.kill()
    assert second.returncode == 0, err
    result = json.loads(out)
    assert result["key"] == journaled
    assert result["status"] == 201
    assert result["replayed"] is True
    assert result["outcomes"][0] == "409"
    assert result["outcomes"][-1] == "201"
    assert stack.app.keys() == [journaled]
    assert json.loads(result["body"]) == {"charge": 1}
