"""Executor processes live no longer than their worker: a worker killed with SIGKILL in the middle of a
task takes its executor process (and whatever that started) with it within a second, so the memory
and GPU it held are free for the requeued attempt. Before, an executor in the middle of a generation
ran on for as long as the generation took."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("inference")


def long_generation(model: Path) -> bytes:
    """A real model busy in generation for far longer than the test waits."""
    prompts = ", ".join(['"Once upon a time"'] * 64)
    return (
        f"taskType: inference\nmodel: {{source: {{type: local, identifier: '{model}'}}, engine: transformers}}\n"
        f"inference: {{max_tokens: 4000, temperature: 1.0, prompts: [{prompts}]}}\n"
    ).encode()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_an_executor_process_dies_within_a_second_of_its_worker(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    model = build_tiny_causal_lm(tmp_path / "model")
    cluster = make_cluster(workers=1)
    client = client_for(cluster)
    task_id = client.submit(long_generation(model))["task_id"]
    deadline = time.monotonic() + 120
    while client.task(task_id)["state"] != "running":
        assert time.monotonic() < deadline, client.task(task_id)
        time.sleep(0.1)
    time.sleep(3)  # past the model load, into the generation
    worker = cluster.worker_procs["local-1"]
    hosts = [pid for pid in _children(worker.pid) if "mloc.worker.host" in _cmdline(pid)]
    assert len(hosts) == 1, [(pid, _cmdline(pid)) for pid in _children(worker.pid)]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    killed = time.monotonic()
    while _running(hosts[0]):
        assert time.monotonic() - killed < 1.0, "the executor process outlived its worker by more than a second"
        time.sleep(0.01)
