"""`mloc up` as a user runs it: a real process on a free port with a home of its own (its embedded Redis
keeps its data there), reached from a second shell with the lines it prints, stopped with SIGTERM or
Ctrl-C while a client follows a task, and started again on the same home."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

from mloc.client import Client
from mloc.homelock import LOCK_FILE
from tests.conftest import free_port, real_clock_env
from tests.support.api import wait_until
from tests.support.cli import mloc

REPO = Path(__file__).resolve().parents[1]
READY = "export MLOC_API_URL="
# With MLOC_SHUTDOWN_GRACE_SEC=1 `mloc up` kills what is left 4 s after the signal; the rest is slack
# for a loaded machine.
STOPPED_WITHIN_SEC = 10
# An echo task that runs in an executor process of its own (a grandchild of `mloc up`) for a minute.
ISOLATED = {"taskType": "echo", "hyperparameters": {"sleep_sec": 60, "steps": 60, "isolate": True}}


class Lines:
    """Every line a process writes to ``stream``, collected by a thread so that reading never blocks a test."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120) -> str:
        """The first line holding ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} in {timeout}s:\n" + "\n".join(self.lines[-40:]))

    @property
    def text(self) -> str:
        self._thread.join(5)
        return "\n".join(self.lines)


class Up:
    """One `mloc up` in a session of its own (so a test can Ctrl-C its process group); its output and that
    of the processes it starts is collected."""

    def __init__(self, env: dict[str, str], *, sigint_ignored: bool = False) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mloc.cli", "up"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # As a non-interactive shell starts a background job (`mloc up &` in a script).
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        )
        assert self.proc.stdout is not None
        self.output = Lines(self.proc.stdout)
        self.seen: list[psutil.Process] = []

    def tree(self) -> list[psutil.Process]:
        """`mloc up` and every process under it now: embedded Redis, orchestrator, workers, executor processes."""
        root = psutil.Process(self.proc.pid)
        found = [root, *root.children(recursive=True)]
        self.seen.extend(found)
        return found

    def close(self) -> None:
        """Whatever a failed test left running goes."""
        for proc in [*self.seen, *self._tree_if_running()]:
            if running(proc):
                proc.kill()
        self.proc.wait(30)

    def _tree_if_running(self) -> list[psutil.Process]:
        try:
            return self.tree()
        except psutil.NoSuchProcess:
            return []


def running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a dead child the container's init has not reaped yet is gone for good)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def up_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no MLOC settings but a home and a port of its own."""
    env = {
        k: v
        for k, v in real_clock_env().items()
        if not k.startswith(("MLOC_", "WORKER_", "TASK_TOPICS", "REDIS_URL", "ORCHESTRATOR_TOKEN"))
    }
    return env | {
        "MLOC_HOME": str(home),
        "MLOC_PORT": str(port),
        "RESULTS_DIR": str(home / "results"),
        "MLOC_SHUTDOWN_GRACE_SEC": "1",
        "MLOC_RETRY_BACKOFF_SEC": "0.2",
        **extra,
    }


@pytest.fixture
def start_up() -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(env: dict[str, str], *, sigint_ignored: bool = False) -> Up:
        up = Up(env, sigint_ignored=sigint_ignored)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


def test_up_says_how_to_reach_it_and_a_second_up_on_its_home_is_refused_in_one_line(
    tmp_path: Path, start_up: Callable[[dict[str, str]], Up]
) -> None:
    home, port = tmp_path / "home", free_port()
    env = up_env(home, port, ORCHESTRATOR_TOKEN="up token")
    up = start_up(env)
    up.output.wait_for(READY)
    # With the embedded Redis, its export is the last line `mloc up` prints; read it before looking at the lines.
    up.output.wait_for("export REDIS_URL=")
    api = f"http://127.0.0.1:{port}"
    lines = up.output.lines
    assert f"fresh start: no tasks in {home}" in lines
    said = next(line for line in lines if line.startswith("MLOC is up:"))
    assert f"API {api}," in said and f"dashboard {api}/dashboard" in said
    assert f"  export MLOC_API_URL={api}" in lines
    assert "  export MLOC_TOKEN='up token'" in lines
    # And where a worker started by hand in another shell finds its Redis.
    exported = next(line for line in lines if line.startswith("  export REDIS_URL="))
    assert exported.startswith("  export REDIS_URL=redis://127.0.0.1:") and exported.endswith(
        "# for a worker: mloc start"
    )
    # Its processes say they use its embedded Redis (handed to them as REDIS_URL), not a Redis of the user's.
    told = [line for line in lines if "Redis: redis://" in line]
    assert told and all(line.endswith(f"(the embedded Redis of {home}, passed as REDIS_URL)") for line in told), told
    # The two lines are all a second shell needs.
    second_shell = mloc("tasks", env={"MLOC_API_URL": api, "MLOC_TOKEN": "up token"})
    assert second_shell.returncode == 0, second_shell.stderr

    again = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "up"],
        env=env | {"MLOC_PORT": str(free_port())},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0
    assert again.stdout == ""
    refusal = again.stderr.splitlines()
    assert len(refusal) == 1, again.stderr
    assert refusal[0].startswith(
        f"error: MLOC_HOME {home} is in use by another `mloc up` (pid {up.proc.pid}, API {api})"
    )
    assert (
        f"export MLOC_API_URL={api}" in refusal[0] and f"`mloc down` on this home, or kill {up.proc.pid}" in refusal[0]
    )
    assert "another home" in refusal[0]
    assert up.proc.poll() is None  # the first one runs on, untouched

    # Another home on the same port: refused before anything starts, never "MLOC is up" first.
    elsewhere = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "up"],
        env=up_env(tmp_path / "home2", port),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert elsewhere.returncode != 0
    assert "MLOC is up" not in elsewhere.stdout, elsewhere.stdout
    assert f"port {port} on 127.0.0.1 is in use by another process" in elsewhere.stderr, elsewhere.stderr
    assert up.proc.poll() is None


def _send_sigterm(up: Up) -> None:
    up.proc.send_signal(signal.SIGTERM)


def _press_ctrl_c(up: Up) -> None:
    # A terminal sends SIGINT to the whole foreground process group: `mloc up`, its orchestrator and workers.
    os.killpg(up.proc.pid, signal.SIGINT)


def _hang_up(up: Up) -> None:
    up.proc.send_signal(signal.SIGHUP)  # `kill -HUP`


def _close_the_terminal(up: Up) -> None:
    # The shell passes the hang-up on to its job's whole process group.
    os.killpg(up.proc.pid, signal.SIGHUP)


def _press_ctrl_c_twice(up: Up) -> None:
    # The second arrives while the first is being handled: the stopping must not be cut short.
    os.killpg(up.proc.pid, signal.SIGINT)
    up.proc.send_signal(signal.SIGINT)


def _run_mloc_down(up: Up) -> None:
    # From another shell with the same MLOC_HOME: it returns once everything has stopped.
    done = mloc("down", env=up.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"stopped `mloc up` (pid {up.proc.pid}) on MLOC_HOME {up.env['MLOC_HOME']}\n"
    assert up.proc.wait(5) == 0  # what it started has stopped; it ends right after
    again = mloc("down", env=up.env)
    assert again.returncode == 0 and again.stderr.endswith(": nothing to stop\n"), again.stderr


@pytest.mark.parametrize(
    "stop",
    [_send_sigterm, _press_ctrl_c, _hang_up, _close_the_terminal, _press_ctrl_c_twice, _run_mloc_down],
    ids=["sigterm", "ctrl-c", "sighup", "terminal-closed", "ctrl-c-twice", "mloc-down"],
)
def test_up_stops_every_process_it_started_within_seconds_while_a_client_follows_a_log(
    stop: Callable[[Up], None], tmp_path: Path, start_up: Callable[[dict[str, str]], Up]
) -> None:
    port = free_port()
    up = start_up(up_env(tmp_path / "home", port))
    up.output.wait_for(READY)
    api = f"http://127.0.0.1:{port}"
    client = Client(api)
    task_id = client.submit(ISOLATED)["task_id"]
    wait_until(client, task_id, lambda record: record["state"] == "running")
    client.close()
    follower = subprocess.Popen(
        [sys.executable, "-m", "mloc.cli", "logs", "-f", task_id],
        env={**os.environ, "MLOC_API_URL": api},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None and follower.stderr is not None
    followed, complaints = Lines(follower.stdout), Lines(follower.stderr)
    followed.wait_for("step 1/60", timeout=30)  # the stream is open and the executor is at work

    tree = up.tree()
    commands = [" ".join(proc.cmdline()) for proc in tree]
    for part in ("redis-server", "--node-type orchestrator", "mloc.worker.listener", "mloc.worker.host"):
        assert any(part in command for command in commands), (part, commands)

    began = time.monotonic()
    stop(up)
    assert up.proc.wait(STOPPED_WITHIN_SEC) == 0, up.output.text
    deadline = began + STOPPED_WITHIN_SEC
    while any(running(proc) for proc in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [" ".join(proc.cmdline()) for proc in tree if running(proc)]
    assert not left, f"still running {time.monotonic() - began:.1f}s after the signal: {left}"

    # The follower ends with one line saying the orchestrator went away.
    assert follower.wait(30) == 3
    assert complaints.text.splitlines() == [
        f"error: lost the orchestrator at {api}; the task goes on — follow it again with `mloc logs -f {task_id}`"
    ]
    for text in (up.output.text, followed.text):
        assert "Traceback" not in text, text
    # The worker drained (handed its running task back) rather than died with the signal.
    assert "worker local-1 stopped" in up.output.text, up.output.text
    assert up.output.lines[-1] == "MLOC stopped"


def test_up_started_in_the_background_by_a_script_stops_on_sigint(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    up = start_up(up_env(tmp_path / "home", free_port()), sigint_ignored=True)
    up.output.wait_for(READY)
    tree = up.tree()
    began = time.monotonic()
    up.proc.send_signal(signal.SIGINT)  # `kill -INT`, to `mloc up` alone
    assert up.proc.wait(STOPPED_WITHIN_SEC) == 0, up.output.text
    while any(running(proc) for proc in tree) and time.monotonic() < began + STOPPED_WITHIN_SEC:
        time.sleep(0.1)
    assert not [" ".join(proc.cmdline()) for proc in tree if running(proc)]
    assert up.output.lines[-1] == "MLOC stopped"


def test_restarted_up_says_what_it_restored_and_runs_the_interrupted_task_again(
    tmp_path: Path, start_up: Callable[[dict[str, str]], Up]
) -> None:
    home, port = tmp_path / "home", free_port()
    env = up_env(home, port)
    first = start_up(env)
    first.output.wait_for(READY)
    api = f"http://127.0.0.1:{port}"
    client = Client(api)
    done = client.submit({"taskType": "echo", "payload": "done"})["task_id"]
    wait_until(client, done, lambda record: record["state"] == "succeeded")
    waiting = client.submit({"taskType": "echo", "resources": {"hardware": {"gpu": {"count": 1}}}})["task_id"]
    # A group of two replicas, waiting for GPUs: one task, as `mloc tasks` lists it, not three.
    group = {
        "taskType": "inference",
        "model": {"source": {"type": "package", "identifier": "mloc-tiny-llama"}},
        "inference": {"prompts": ["a", "b"]},
        "resources": {"replicas": 2, "hardware": {"gpu": {"count": 1}}},
    }
    assert len(client.submit(group)["replicas"]) == 2
    interrupted = client.submit({"taskType": "echo", "hyperparameters": {"sleep_sec": 4, "steps": 4}})["task_id"]
    wait_until(client, interrupted, lambda record: record["state"] == "running")
    time.sleep(1.5)  # the embedded Redis writes its append-only file to disk every second
    # The machine loses power: nothing stops cleanly, and the lock file stays behind.
    for proc in first.tree():
        proc.kill()
    first.proc.wait(30)
    assert json.loads((home / LOCK_FILE).read_text())["pid"] == first.proc.pid

    second = start_up(env)
    second.output.wait_for(READY)
    assert f"restored from {home}: 4 tasks (2 pending, 1 running → queued again, 1 succeeded)" in second.output.lines, (
        second.output.text
    )
    again = wait_until(client, interrupted, lambda record: record["state"] == "succeeded", timeout=60)
    assert again["requeues"] == 1 and again["reason_code"] is None, again  # handed back by the restart, not failed
    assert client.task(waiting)["state"] == "pending"
    client.close()


def test_a_worker_that_dies_under_up_is_started_again_and_one_asked_to_stop_stays_stopped(
    tmp_path: Path, start_up: Callable[[dict[str, str]], Up]
) -> None:
    home, port = tmp_path / "home", free_port()
    up = start_up(up_env(home, port))
    up.output.wait_for(READY)
    client = Client(f"http://127.0.0.1:{port}")

    def worker() -> psutil.Process:
        return next(p for p in up.tree() if "mloc.worker.listener" in " ".join(p.cmdline()))

    task_id = client.submit({"taskType": "echo", "hyperparameters": {"sleep_sec": 3, "steps": 3}})["task_id"]
    wait_until(client, task_id, lambda record: record["state"] == "running")
    killed = worker()
    killed.kill()  # as the kernel's OOM killer would
    up.output.wait_for("worker local-1 exited (code -9); starting it again: what it ran goes back to the queue")
    # Its task went back to the queue and ran again on the worker started in its place.
    again = wait_until(client, task_id, lambda record: record["state"] == "succeeded", timeout=60)
    assert again["requeues"] == 1 and again["worker_id"] == "local-1", again
    assert worker().pid != killed.pid and up.proc.poll() is None

    worker().terminate()  # asked to stop: it stays stopped, and the rest runs on
    up.output.wait_for("worker local-1 stopped; the rest run on (`mloc down` stops everything)")
    time.sleep(1)
    assert up.proc.poll() is None and not [p for p in up.tree() if "mloc.worker.listener" in " ".join(p.cmdline())]
    assert client.tasks()["total"] == 1  # the orchestrator still answers
    client.close()


def test_run_of_a_task_no_worker_here_can_run_says_what_to_change_and_fails(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("taskType: echo\nresources: {hardware: {gpu: {count: 1}}}\n")
    env = up_env(tmp_path / "home", free_port(), MLOC_WORKER_GPUS="none")  # no GPU, on any machine
    command = [sys.executable, "-m", "mloc.cli", "run", str(gpu)]
    ran = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    task_id = ran.stdout.split()[2]
    assert ran.stdout.startswith(f"submitted task {task_id} (not placed: no registered worker can run this task")
    assert "worker None" not in ran.stdout
    said = ran.stderr.splitlines()
    assert f"error: no worker of the throw-away cluster can run task {task_id}: " in said[0] and "GPU" in said[0]
    assert f"Ask for resources this machine has (spec.resources in {gpu})" in said[0]
    # The cluster, and the task with it, is gone: there is nothing to cancel.
    assert "mloc cancel" not in ran.stderr


def test_run_with_a_token_set_sends_it_and_leaves_no_cluster_behind(tmp_path: Path) -> None:
    echo = tmp_path / "echo.yaml"
    echo.write_text("taskType: echo\npayload: {said: hello}\n")
    scratch = tmp_path / "scratch"  # where the throw-away cluster's home is made
    scratch.mkdir()
    env = up_env(tmp_path / "home", free_port(), ORCHESTRATOR_TOKEN="run-admin-token", TMPDIR=str(scratch))
    ran = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "run", str(echo)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "hello" in ran.stdout, ran.stdout
    # Its Redis, logs and lock went with it; the result stays in RESULTS_DIR.
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("mloc-run-")], list(scratch.iterdir())
    task_id = ran.stdout.split()[2]
    assert (tmp_path / "home" / "results" / task_id / "responses.json").is_file()


def test_up_on_a_port_another_process_listens_on_names_the_port_and_the_fix(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = up_env(tmp_path / "home", port)
        command = [sys.executable, "-m", "mloc.cli", "up", "--workers", "0"]
        ran = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert ran.returncode != 0
    said = ran.stdout + ran.stderr
    assert f"error: port {port} on 127.0.0.1 is in use by another process" in said, said
    assert "choose another port with PORT / MLOC_PORT (`mloc up --port N`)" in said
    assert "Traceback" not in said
    # Nothing was started first: no Redis, no restore line, nothing to stop.
    assert "fresh start" not in said and "stopping" not in said, said
    assert not (tmp_path / "home" / "redis").exists()
