"""The lock that lets one `mloc up` at a time use an MLOC home (its embedded Redis data, results, logs).

It is an flock on ``MLOC_HOME/up.lock``, held for the life of the process: the kernel drops it when the
process ends however it ends, so a file left by a killed `mloc up` never blocks the next one. The file
also names its holder (pid and API URL), so a refused second `mloc up` can say which one runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mloc.errors import MlocError

LOCK_FILE = "up.lock"


@dataclass(frozen=True)
class Holder:
    """What the running `mloc up` wrote into the lock file (either may be missing: it may not have written yet)."""

    pid: int | None
    api_url: str | None


class HomeInUse(MlocError):
    """Another `mloc up` holds this MLOC home."""

    status_code = 409
    code = "home_in_use"

    def __init__(self, home: Path, holder: Holder) -> None:
        named = [f"pid {holder.pid}"] if holder.pid else []
        named += [f"API {holder.api_url}"] if holder.api_url else []
        who = f" ({', '.join(named)})" if named else ""
        use = f"use it (export MLOC_API_URL={holder.api_url})" if holder.api_url else "use it"
        stop = f"stop it (`mloc down` on this home, or kill {holder.pid})" if holder.pid else "stop it (`mloc down`)"
        super().__init__(
            f"MLOC_HOME {home} is in use by another `mloc up`{who}: "
            f"{use}, {stop}, or give this one another home (MLOC_HOME=/some/other/dir mloc up)"
        )
        self.home = home
        self.holder = holder


class HomeLock:
    """Held by the one `mloc up` that runs on ``home``; :meth:`acquire` raises :class:`HomeInUse` otherwise."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self, api_url: str) -> HomeLock:
        self.home.mkdir(parents=True, exist_ok=True)
        # "a+": opening must not empty the holder's record before the lock says who holds it.
        lock = open(self.path, "a+")  # noqa: SIM115  (held open until release)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(lock)
            lock.close()
            raise HomeInUse(self.home, holder) from None
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"pid": os.getpid(), "api_url": api_url}))
        lock.flush()
        self._file = lock
        return self

    def release(self) -> None:
        if self._file is not None:
            # The file stays: removing it would let a process that opened it just before lock a file
            # no one else can find.
            self._file.close()
            self._file = None


def holder_of(home: Path) -> Holder | None:
    """Who holds ``home`` now; None when no `mloc up` runs on it."""
    try:
        lock = open(home / LOCK_FILE)  # noqa: SIM115  (closed below)
    except FileNotFoundError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(lock)
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None


def _read(lock: IO[str]) -> Holder:
    lock.seek(0)
    try:
        state = json.loads(lock.read() or "{}")
    except ValueError:
        state = {}
    pid = None
    with contextlib.suppress(TypeError, ValueError):
        pid = int(state.get("pid"))
    api_url = state.get("api_url")
    return Holder(pid, api_url if isinstance(api_url, str) and api_url else None)
