"""Runs the ``mloc`` CLI as a user would: a separate process, from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def mloc(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, inherit: bool = True
) -> subprocess.CompletedProcess[str]:
    """``mloc ARGS`` with ``env`` over this process's environment (only ``env`` when not ``inherit``: a
    REDIS_URL of the caller's must then not reach it); wide columns so tables do not wrap."""
    return subprocess.run(
        [sys.executable, "-m", "mloc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**(os.environ if inherit else {}), "COLUMNS": "200", **(env or {})},
    )
