"""The orchestrator and the worker, started from their entry points, keep what start-up made out of the
cyclic collector's passes and collect their youngest generation every ``heap.YOUNG_THRESHOLD``
allocations (see :mod:`mloc.heap`)."""

from __future__ import annotations

import gc
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest

from mloc import heap
from tests.conftest import free_port, process_env

# Run before the entry point: prints the collector's state once start-up has frozen what it made
# (the freeze is heap.settle's last step, so the threshold is set by then).
WATCH = """
import gc, json, threading, time
def watch():
    while not gc.get_freeze_count():
        time.sleep(0.02)
    print('GC ' + json.dumps({'frozen': gc.get_freeze_count(), 'threshold': gc.get_threshold()}), flush=True)
threading.Thread(target=watch, daemon=True).start()
from %s import main
main()
"""


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def _collector_state(module: str, env: dict[str, str], cwd: Path) -> dict[str, object]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCH % module],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=90)
            except queue.Empty:
                pytest.fail(f"{module} never froze its start-up objects (exit code {proc.poll()})")
            if line.startswith("GC "):
                state: dict[str, object] = json.loads(line[3:])
                return state
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("node", ["worker", "orchestrator"])
def test_a_started_process_freezes_its_start_up_and_collects_young_objects_less_often(
    node: str, redis_url: str, tmp_path: Path
) -> None:
    if node == "worker":
        module = "mloc.worker.listener"
        env = process_env(
            MLOC_LOG_FILE="",
            REDIS_URL=redis_url,
            WORKER_ID="w-heap",
            TASK_TOPICS="tasks.echo",
            RESULTS_DIR=str(tmp_path / "results"),
        )
    else:
        module = "mloc.orchestrator.server"
        env = process_env(MLOC_LOG_FILE="", REDIS_URL=redis_url, PORT=str(free_port()))
    state = _collector_state(module, env | {"MLOC_HOME": str(tmp_path / "home")}, tmp_path)
    # Start-up makes tens of thousands of objects (modules, the app, the settings): all frozen.
    assert isinstance(state["frozen"], int) and state["frozen"] > 10_000, state
    # The older generations' thresholds are CPython's, as in this process.
    assert state["threshold"] == [heap.YOUNG_THRESHOLD, *gc.get_threshold()[1:]], state


def test_settle_leaves_the_older_generations_thresholds_as_they_were() -> None:
    code = (
        "import gc; gc.set_threshold(700, 13, 17); from mloc import heap; heap.settle(); "
        "print(gc.get_threshold(), gc.get_freeze_count() > 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == f"({heap.YOUNG_THRESHOLD}, 13, 17) True"
