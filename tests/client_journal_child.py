"""A client program for the journal crash test: ``python client_journal_child.py URL JOURNAL OP``.

It posts a charge as operation ``OP`` through a :class:`retrysafe.Client` whose key journal
is the file ``JOURNAL``, then prints the outcome as one JSON line. The test kills it mid-call
and runs it again. Its waits are short (50 ms) so the rerun's retries of a 409 are quick.
"""

from __future__ import annotations

import json
import sys

from retrysafe import Client, RetryPolicy, retry_info


def main() -> None:
    url, journal, operation = sys.argv[1:4]
    policy = RetryPolicy(attempts=200, deadline=30, backoff=0.05, max_backoff=0.05,
                         max_retry_after=0.05)  # fmt: skip
    with Client(retry=policy, journal=journal, timeout=30) as client:
        response = client.post(url, json={"order": 42, "amount": 4200}, operation=operation)
    info = retry_info(response)
    assert info is not None
    print(
        json.dumps(
            {
                "status": response.status_code,
                "body": response.text,
                "key": info.key,
                "attempts": info.attempts,
                "replayed": info.replayed,
                "outcomes": info.outcomes,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
