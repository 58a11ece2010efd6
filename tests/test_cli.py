"""The ``retrysafe`` command: ``--version``, and ``demo`` against a real uvicorn server.

The demo's figures are the point: retries double-charge the bare API and never the protected one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from retrysafe.cli import DEMO_PURCHASES, main

SUMMARY = re.compile(
    r"^(without|with) retrysafe: +(\d+) purchases? -> (\d+) charges?"
    r"(?: \((\d+) double charges?\))?$",
    re.MULTILINE,
)


def figures(output: str) -> dict[str, tuple[int, int, int]]:
    """(purchases, charges, double charges) per run, read from the report's summary lines."""
    return {
        run: (int(purchases), int(charges), int(double or 0))
        for run, purchases, charges, double in SUMMARY.findall(output)
    }


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` prints the installed version and exits 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"retrysafe {version('retrysafe')}"


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a subcommand the command prints its usage and exits 2."""
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad ``--purchases`` is refused by argparse with status 2, nothing is run."""
    assert main(["demo", "--purchases", "0"]) == 2
    assert "--purchases" in capsys.readouterr().err


def test_demo_default_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """With the default seed retries double-charge the bare API, never the protected one."""
    assert main(["demo"]) == 0
    output = capsys.readouterr().out
    runs = figures(output)
    bare_purchases, bare_charges, bare_double = runs["without"]
    purchases, charges, double = runs["with"]
    assert bare_purchases == purchases == DEMO_PURCHASES
    assert bare_charges > bare_purchases
    assert bare_double == bare_charges - bare_purchases
    assert (charges, double) == (purchases, 0)
    assert max(map(len, output.splitlines())) <= 80


def test_demo_as_module() -> None:
    """``python -m retrysafe demo`` runs in its own process and exits 0 with one charge each."""
    result = subprocess.run(
        [sys.executable, "-m", "retrysafe", "demo", "--purchases", "6", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    purchases, charges, double = figures(result.stdout)["with"]
    assert (purchases, charges, double) == (6, 6, 0)


def test_demo_without_extras(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without uvicorn the demo prints a one-line install hint and exits 2."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "retrysafe[demo]" in err
    assert err.count("\n") == 1
