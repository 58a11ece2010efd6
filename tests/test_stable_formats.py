"""What a ledger keeps must mean the same after an upgrade.

A record is found by its id and compared by its fingerprint. If either derivation changed
between two releases, a retry that spans the deploy would miss its record and execute again,
or be refused as a different request. These values were computed by the first release; a
change to them is a breaking change to every ledger and must be deliberate.
"""

from __future__ import annotations

import pytest

from retrysafe import RequestView
from retrysafe.engine import record_id
from retrysafe.fingerprint import default_fingerprint
from retrysafe.records import StoredResponse

JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("scope", "key", "rid", "tag"),
    [
        (
            b"\x01" * 32,
            "order-42",
            "e66eee50b41b6294ebe248895442899f05d1e6dc81722e4666b7803353379680",
            "fe207d6c3851cb18",
        ),
        (
            None,
            "k",
            "87aff44e782e88a757b965dc5d8cd3c52adf87bb15e40df2b3419a9179896ce1",
            "84a64fdf901422a7",
        ),
        (
            1234,
            "k",
            "0a9fd37a892943240c08d5322ab2c6fc1d524cac2bf67deab46ed4b104f63f7b",
            "03f5934d520e5cde",
        ),
    ],
)
def test_record_ids_do_not_change_between_releases(
    scope: bytes | int | None, key: str, rid: str, tag: str
) -> None:
    """A (namespace, scope, key) maps to the same record id and scope tag as in release one."""
    got_rid, got_tag = record_id(b"retrysafe", scope, key)
    assert (got_rid.hex(), got_tag.hex()) == (rid, tag)


@pytest.mark.parametrize(
    ("request_view", "fingerprint"),
    [
        (
            RequestView(
                "POST",
                "/items",
                b"a=1",
                JSON,
                b'{"price": 9.99, "name": "w", "n": 10.0000000000000001}',
            ),
            "4aa8da417f687c8c7036c13ea352ff59f258f7201fe41f651445d3553a70be6a",
        ),
        (
            RequestView("POST", "/items", b"", JSON, b'{ "b":1,"a":[2.5, "x"]}'),
            "806eab925843386f5384bfe5dfeda3539c288dacec080ce11ca96346d84f790f",
        ),
        (
            RequestView("PUT", "/\u00e9", b"", [], b"raw"),
            "dbb30c4ca6396aea8c2477220fd605b59a3845e503c0d24328f877a04cd43031",
        ),
    ],
)
def test_fingerprints_do_not_change_between_releases(
    request_view: RequestView, fingerprint: str
) -> None:
    """Canonical-JSON, inexact-number and raw bodies fingerprint as they did in release one."""
    assert default_fingerprint(request_view).hex() == fingerprint


def test_stored_responses_written_by_release_one_still_decode() -> None:
    """A response encoded by the first release decodes to the same status, headers and body."""
    encoded = bytes.fromhex(
        "525331b566f6f700c90002000c636f6e74656e742d747970650000001061"
        "70706c69636174696f6e2f6a736f6e00086c6f636174696f6e000000092f"
        "6f72646572732f377b226964223a377d"
    )
    response = StoredResponse.decode(encoded)
    assert response == StoredResponse(
        201,
        [(b"content-type", b"application/json"), (b"location", b"/orders/7")],
        b'{"id":7}',
    )
    assert response.encode() == encoded
