"""The python_repl sandbox against escape attempts beyond tests/test_sandbox.py: reading the host's
secrets, running commands, ctypes and __subclasses__ walks, other socket families, detached and
signal-ignoring processes, memory built up piecewise, and the environment it inherits."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mloc.executors.agent.sandbox import Limits, PythonSandbox
from mloc.executors.base import write_json_atomic
from tests.test_sandbox import processes_of


@pytest.fixture
def sandbox() -> Iterator[PythonSandbox]:
    with PythonSandbox(Limits(timeout_sec=3, memory_bytes=256 * 1024 * 1024, max_processes=8)) as box:
        yield box


@pytest.fixture
def secret() -> Iterator[Path]:
    """A file the worker wrote the way it writes results, where the sandbox can see it (not in /tmp
    or the home folder, which it masks)."""
    folder = Path(__file__).parent / f".secret-{os.getpid()}"
    path = write_json_atomic(folder / "responses.json", {"owner": "alice", "output": "private"})
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def needs_root(sandbox: PythonSandbox) -> None:
    if sandbox.mode != "root":
        pytest.skip("file permissions separate the sandbox from the worker only when the worker is root")


def test_files_of_the_worker_and_the_host_cannot_be_read(sandbox: PythonSandbox, secret: Path) -> None:
    needs_root(sandbox)
    for path in (secret, Path("/etc/shadow"), Path("/proc/1/environ"), Path(f"/proc/{os.getpid()}/environ")):
        result = sandbox.run(f"print(open({str(path)!r}).read())")
        assert result.exit_code == 1, (path, result.output)
        assert "private" not in result.output
        assert "Permission denied" in result.output or "No such file" in result.output, result.output
    # A closed folder the interpreter lives under (/root/.pyenv) is masked and cannot even be listed.
    listing = sandbox.run(f"import os\nos.listdir({str(Path.home())!r})")
    assert listing.exit_code == 1 and "Permission denied" in listing.output


def test_commands_run_only_as_the_throwaway_user_and_change_nothing(sandbox: PythonSandbox, secret: Path) -> None:
    needs_root(sandbox)
    target = secret.parent / "planted"
    result = sandbox.run(
        "import os, subprocess\n"
        "print('uid', os.getuid(), os.geteuid())\n"
        f"print('system', os.system('touch {target} 2>/dev/null'))\n"
        f"print('cat', subprocess.run(['cat', {str(secret)!r}], capture_output=True).returncode)\n"
        "try:\n    os.setuid(0)\nexcept PermissionError as exc:\n    print('setuid', exc.errno)\n"
    )
    assert result.ok, result.output
    lines = dict(line.split(" ", 1) for line in result.output.strip().splitlines())
    assert lines["uid"] == f"{sandbox.uid} {sandbox.uid}"
    assert lines["system"] != "0" and lines["cat"] != "0" and lines["setuid"] == "1"
    assert not target.exists()


def test_ctypes_cannot_regain_privileges_or_leave_the_namespaces(sandbox: PythonSandbox) -> None:
    needs_root(sandbox)
    result = sandbox.run(
        "import ctypes, ctypes.util\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('setuid', libc.setuid(0), ctypes.get_errno())\n"
        "print('unshare', libc.unshare(0x10000000 | 0x40000000), ctypes.get_errno())\n"  # new user + net ns
        "print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n"
        "fd = libc.open(b'/proc/1/ns/net', 0)\n"
        "print('setns', libc.setns(fd, 0) if fd >= 0 else -1, ctypes.get_errno())\n"
    )
    assert result.ok, result.output
    outcome = {line.split()[0]: line.split()[1] for line in result.output.strip().splitlines()}
    # Every call fails (-1); user namespaces may be allowed for an unprivileged user, but setuid 0
    # inside one maps to nobody on the host, and the network stays the one without interfaces.
    assert outcome["setuid"] == "-1" and outcome["mount"] == "-1" and outcome["setns"] == "-1"
    net = sandbox.run(
        "import ctypes, socket\nlibc = ctypes.CDLL(None)\nlibc.unshare(0x10000000)\n"
        "socket.create_connection(('1.1.1.1', 443), timeout=2)"
    )
    assert net.exit_code == 1 and "unreachable" in net.output


def test_a_subclasses_walk_reaches_nothing_that_is_not_already_confined(sandbox: PythonSandbox) -> None:
    needs_root(sandbox)
    walk = (
        "wrap = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
        "system = wrap.__init__.__globals__['system']\n"
        "print('status', system('id -u > uid.txt; echo x > /etc/mloc-escaped'))\n"
        "print('uid', open('uid.txt').read().strip())\n"
    )
    result = sandbox.run(walk)
    assert result.ok, result.output
    assert f"uid {sandbox.uid}" in result.output and "status 0" not in result.output
    assert not Path("/etc/mloc-escaped").exists()


def test_unix_and_raw_sockets_reach_nothing(sandbox: PythonSandbox, tmp_path: Path) -> None:
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0mloc-escape-{os.getpid()}")
    abstract.listen()
    # A socket in /tmp (masked) and one in a folder the sandbox can see but not enter.
    masked = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    masked.bind(str(tmp_path / "s.sock"))
    masked.listen()
    accepted: list[object] = []

    def accept(server: socket.socket) -> None:
        # Nobody came: it times out, or the socket is closed when the test ends.
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    for server in (abstract, masked):
        server.settimeout(5)
        threading.Thread(target=accept, args=(server,), daemon=True).start()
    try:
        result = sandbox.run(
            "import socket\n"
            f"for address in ['\\0mloc-escape-{os.getpid()}', {str(tmp_path / 's.sock')!r}]:\n"
            "    try:\n"
            "        socket.socket(socket.AF_UNIX).connect(address)\n"
            "        print('connected', repr(address))\n"
            "    except OSError as exc:\n"
            "        print('refused', exc.errno)\n"
            "for family, kind in [(socket.AF_INET, socket.SOCK_RAW), (socket.AF_PACKET, socket.SOCK_RAW)]:\n"
            "    try:\n"
            "        socket.socket(family, kind, 1)\n"
            "        print('raw socket opened')\n"
            "    except OSError as exc:\n"
            "        print('no raw', exc.errno)\n"
        )
    finally:
        abstract.close()
        masked.close()
    assert "connected" not in result.output and "raw socket opened" not in result.output, result.output
    assert result.output.count("refused") == 2 and accepted == []


def test_processes_that_leave_the_group_and_ignore_signals_are_killed(sandbox: PythonSandbox) -> None:
    needs_root(sandbox)
    started = time.monotonic()
    result = sandbox.run(
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "            signal.signal(sig, signal.SIG_IGN)\n"
        "        while True:\n"
        "            time.sleep(0.1)\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('parent done')\n"
    )
    assert result.ok and "parent done" in result.output
    assert processes_of(sandbox.uid) == []
    assert time.monotonic() - started < 10


def test_piecewise_memory_growth_stops_at_the_limit(sandbox: PythonSandbox) -> None:
    result = sandbox.run("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))")
    assert result.exit_code == 1 and "MemoryError" in result.output
    assert not result.timed_out


def test_signal_ignoring_busy_loop_is_killed_at_the_time_limit(sandbox: PythonSandbox) -> None:
    started = time.monotonic()
    result = sandbox.run(
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass"
    )
    assert result.timed_out and not result.ok
    assert time.monotonic() - started < 3 + 2


def test_a_large_file_is_stopped_at_the_size_limit() -> None:
    with PythonSandbox(Limits(timeout_sec=5, max_file_bytes=1 << 20)) as box:
        result = box.run("with open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 18))")
        size = (box.workdir / "big").stat().st_size
    assert not result.ok and size <= 1 << 20
    assert result.killed_by == "SIGXFSZ" or "File too large" in result.output


def test_the_workers_secrets_are_not_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "admin-secret")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@127.0.0.1:6379/0")
    with PythonSandbox(Limits(timeout_sec=3)) as box:
        result = box.run("import os\nsorted(os.environ)")
    assert result.ok
    assert "ORCHESTRATOR_TOKEN" not in result.output and "REDIS_URL" not in result.output
    assert "admin-secret" not in result.output
