"""Shared fixtures: the stores every contract test runs against, and the async backend."""

from __future__ import annotations

from pathlib import Path

import pytest

STORE_KINDS = ["memory", "sqlite"]


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (uvicorn's loop)."""
    return "asyncio"


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger URL of each store kind."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'ledger.db'}"
