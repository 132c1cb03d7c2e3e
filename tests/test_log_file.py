"""The log file on a file system that cannot take it, with a real `mloc start --node-type orchestrator`.

Without MLOC_LOG_FILE the orchestrator logs to `orchestrator.log` in its working folder. In a container
with a read-only root file system that folder cannot be written: the orchestrator must still start,
log to stderr, and say once what to set. A file MLOC_LOG_FILE names was asked for: one that cannot
be written stops the start with one line and exit code 2, as other bad settings do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

MLOC = str(Path(sys.executable).parent / "mloc")
START = [MLOC, "start", "--node-type", "orchestrator"]
# Binds `folder` read-only over itself in a mount namespace of the command's own, then runs the command
# in it: root ignores permission bits, so chmod would not stop root's writes.
READ_ONLY_BIND = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && cd "$1" && shift && exec "$@"'


def orchestrator_env(tmp_path: Path, redis_url: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOC_", "REDIS_URL", "RESULTS_DIR", "LOG_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": redis_url,
            "MLOC_PORT": str(port),
            "MLOC_HOST": "127.0.0.1",
            "MLOC_HOME": str(tmp_path / "home"),
            "RESULTS_DIR": str(tmp_path / "results"),
            **extra,
        }
    )
    return env


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A folder the orchestrator cannot write, and the command prefix that runs a process in it."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, []
        folder.chmod(0o755)
        return
    unshare = shutil.which("unshare")
    prefix = [unshare or "unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_BIND, "sh", str(folder)]
    probe = subprocess.run([*prefix, "sh", "-c", "! touch probe 2>/dev/null"], capture_output=True, timeout=10)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"running as root, and a read-only bind mount in a new mount namespace failed: {probe.stderr!r}")
    yield folder, prefix


def serves(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _run_until_healthy(cmd: list[str], cwd: Path, env: dict[str, str], port: int) -> tuple[bool, str]:
    """Start the orchestrator, wait for /healthz, stop it; whether it answered, and its stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        healthy = serves(port, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate(timeout=5)
    return healthy, stderr


def _warnings_naming_the_log_file(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WARNING" in line and "MLOC_LOG_FILE" in line]


def test_orchestrator_in_a_read_only_working_folder_starts_and_logs_to_stderr(
    read_only_folder: tuple[Path, list[str]], redis_url: str, tmp_path: Path
) -> None:
    folder, prefix = read_only_folder
    port = free_port()
    healthy, stderr = _run_until_healthy([*prefix, *START], folder, orchestrator_env(tmp_path, redis_url, port), port)
    assert healthy, f"the orchestrator did not answer /healthz:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    (warning,) = _warnings_naming_the_log_file(stderr)
    reason = "Permission denied" if os.geteuid() else "Read-only file system"
    assert f"{folder}/orchestrator.log" in warning and reason in warning, warning
    assert "MLOC_LOG_FILE=-" in warning, warning
    assert "orchestrator ready" in stderr, "the orchestrator's own lines still reach stderr"
    assert not (folder / "orchestrator.log").exists()


def test_orchestrator_whose_working_folder_takes_no_files_starts(redis_url: str, tmp_path: Path) -> None:
    """/proc refuses new files to root as well (FileNotFoundError)."""
    port = free_port()
    healthy, stderr = _run_until_healthy(START, Path("/proc"), orchestrator_env(tmp_path, redis_url, port), port)
    assert healthy, f"the orchestrator did not answer /healthz:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    (warning,) = _warnings_naming_the_log_file(stderr)
    assert "/proc/orchestrator.log" in warning, warning


def _refused(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLOC_LOG_FILE "), done.stderr
    assert "MLOC_LOG_FILE=-" in lines[0], lines[0]
    return done


def test_a_log_file_under_a_file_refuses_to_start_with_one_line(redis_url: str, tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    env = orchestrator_env(tmp_path, redis_url, free_port(), MLOC_LOG_FILE=str(a_file / "orchestrator.log"))
    done = _refused(START, tmp_path, env)
    assert f"{a_file} is a file, not a folder" in done.stderr, done.stderr


def test_a_log_file_on_a_read_only_folder_refuses_to_start_with_one_line(
    read_only_folder: tuple[Path, list[str]], redis_url: str, tmp_path: Path
) -> None:
    folder, prefix = read_only_folder
    env = orchestrator_env(tmp_path, redis_url, free_port(), MLOC_LOG_FILE=str(folder / "logs" / "orchestrator.log"))
    done = _refused([*prefix, *START], folder, env)
    assert str(folder / "logs") in done.stderr, done.stderr


def test_a_missing_log_folder_is_created_and_said(redis_url: str, tmp_path: Path) -> None:
    log_file = tmp_path / "new" / "logs" / "orchestrator.log"
    port = free_port()
    env = orchestrator_env(tmp_path, redis_url, port, MLOC_LOG_FILE=str(log_file))
    healthy, stderr = _run_until_healthy(START, tmp_path, env, port)
    assert healthy, stderr
    assert f"created {log_file.parent} for the log file {log_file}" in stderr, stderr
    assert "orchestrator ready" in log_file.read_text()


def test_no_log_file_is_written_with_a_dash(redis_url: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    healthy, stderr = _run_until_healthy(
        START, work, orchestrator_env(tmp_path, redis_url, port, MLOC_LOG_FILE="-"), port
    )
    assert healthy, stderr
    assert list(work.iterdir()) == [] and not _warnings_naming_the_log_file(stderr), stderr
