"""Lint and type checks as part of the suite: CI runs only the tests, so a check left to be run by hand
is a check that drifts. Both tools read their settings from pyproject.toml, as they do when run by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# mypy from a cold cache takes about a minute on a quiet machine, several on a loaded CI runner.
pytestmark = pytest.mark.timeout(900)


def _run(tool: str, *args: str) -> None:
    # This interpreter's tools: the versions the project pins, whatever else is on PATH.
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True)
    command = " ".join((tool, *args))
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout}{done.stderr}"


def test_ruff_check_passes() -> None:
    _run("ruff", "check", ".")


def test_mypy_passes() -> None:
    # No arguments: [tool.mypy] files names what is checked (src, tests and bench).
    _run("mypy")
