"""Runs the ``mloc`` CLI as a user would: a separate process, from the repository root."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
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


def in_a_pty(*args: str, env: dict[str, str], columns: int = 200, timeout: float = 60) -> tuple[int | None, str]:
    """``mloc ARGS`` in a pseudo-terminal ``columns`` wide, with exactly ``env``: its exit status (None
    when it outlived ``timeout``) and what it wrote there, stdout and stderr together."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mloc.cli", *args], stdin=follower, stdout=follower, stderr=follower, cwd=REPO, env=env
    )
    os.close(follower)
    read = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            read += chunk
        status: int | None = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        status = None
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return status, read.decode()
