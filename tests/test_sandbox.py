"""The python_repl sandbox: escapes are contained, the host is untouched, limits end runaway code."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mloc.executors.agent.sandbox import Limits, PythonSandbox


@pytest.fixture
def sandbox() -> Iterator[PythonSandbox]:
    with PythonSandbox(Limits(timeout_sec=3, memory_bytes=256 * 1024 * 1024, max_processes=8)) as box:
        yield box


def processes_of(uid: int) -> list[int]:
    """Live processes of ``uid`` (zombies are dead and wait only for their reaper)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if f"Uid:\t{uid}\t" in status and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def test_code_runs_like_a_repl_cell_in_a_private_folder(sandbox: PythonSandbox) -> None:
    first = sandbox.run("import os\nopen('notes.txt', 'w').write('kept')\nos.getcwd() == os.environ['HOME']")
    assert first.ok and first.output.strip() == "True"
    second = sandbox.run("print(open('notes.txt').read()); 6 * 7")
    assert second.output.split() == ["kept", "42"]
    assert (sandbox.workdir / "notes.txt").read_text() == "kept"


def test_errors_show_the_users_traceback_only(sandbox: PythonSandbox) -> None:
    result = sandbox.run("x = 1\n1 / x\n{}['missing']")
    assert result.exit_code == 1 and not result.ok
    assert "KeyError: 'missing'" in result.output and "<python_repl>" in result.output
    assert "sandbox.py" not in result.output


def test_network_is_unreachable_even_on_the_hosts_loopback(sandbox: PythonSandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    try:
        local = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        remote = sandbox.run("import socket\nsocket.create_connection(('1.1.1.1', 443), timeout=2)")
        dns = sandbox.run("import socket\nsocket.getaddrinfo('pypi.org', 443)")
    finally:
        server.close()
    assert local.exit_code == 1 and ("ConnectionRefusedError" in local.output or "unreachable" in local.output)
    assert remote.exit_code == 1 and "Network is unreachable" in remote.output
    assert dns.exit_code == 1 and "gaierror" in dns.output
    assert accepted == []


def test_writing_outside_its_folder_fails(sandbox: PythonSandbox, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    host_tmp = Path("/tmp") / f"mloc-escape-{os.getpid()}"
    paths = [target, host_tmp, Path("/dev/shm") / "escape", sandbox.workdir.parent / "sibling"]
    if sandbox.mode == "root":
        # Under a throwaway uid, folders the worker owns are closed too, not only the shared ones.
        paths.append(Path(__file__).parent / f"escaped-{os.getpid()}.py")
    for path in paths:
        result = sandbox.run(f"open({str(path)!r}, 'w').write('x')")
        assert result.exit_code == 1, path
        # /tmp is masked by an empty read-only folder, so a host path below it is not even there.
        assert any(
            error in result.output
            for error in ("Read-only file system", "Permission denied", "No such file or directory")
        ), result.output
        assert not path.exists()


def test_endless_loop_is_killed_at_the_time_limit(sandbox: PythonSandbox) -> None:
    started = time.monotonic()
    result = sandbox.run("print('start', flush=True)\nwhile True:\n    pass")
    assert result.timed_out and not result.ok and result.output.startswith("start")
    assert "time limit" in result.notes[0]
    assert time.monotonic() - started < 3 + 2


def test_huge_memory_allocation_fails_inside_the_sandbox(sandbox: PythonSandbox) -> None:
    result = sandbox.run("block = bytearray(8 * 1024 ** 3)\nprint('allocated')")
    assert result.exit_code == 1 and "MemoryError" in result.output and "allocated" not in result.output
    assert sandbox.run("len(bytearray(16 * 1024 ** 2))").output.strip() == str(16 * 1024**2)


def test_fork_bomb_is_contained_and_leaves_no_process_behind(sandbox: PythonSandbox) -> None:
    if sandbox.mode != "root":
        pytest.skip("the process limit is per user; only a root worker gives each run its own uid")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = sandbox.run(bomb)
    assert result.timed_out
    assert processes_of(sandbox.uid) == []
    # The host can still start processes and the sandbox still works.
    assert sandbox.run("print('alive')").output.strip() == "alive"


def test_output_is_capped() -> None:
    with PythonSandbox(Limits(timeout_sec=5, max_output_bytes=1000)) as box:
        result = box.run("for n in range(100000):\n    print('line', n)")
    assert result.ok and result.truncated and len(result.output) == 1000
    assert "output cut at 1000 bytes" in result.notes


def test_folder_is_removed_on_close() -> None:
    box = PythonSandbox(Limits(timeout_sec=2))
    box.run("open('f', 'w').write('x')")
    box.close()
    assert not box.workdir.exists()
