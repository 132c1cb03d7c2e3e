"""A worker counts a model as warm only while an idle executor holds it: a task placed there for that
model starts without loading it. While the one executor that holds it runs a task, the worker does not
say so, or the next task for that model would be placed beside it (and load a second copy) while another
worker stands idle."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("inference")


def generation(model: Path, prompts: int, max_tokens: int) -> bytes:
    listed = ", ".join(['"Once upon a time"'] * prompts)
    return (
        f"taskType: inference\nmodel: {{source: {{type: local, identifier: '{model}'}}, engine: transformers}}\n"
        f"inference: {{max_tokens: {max_tokens}, temperature: 1.0, prompts: [{listed}]}}\n"
    ).encode()


def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_model_busy_in_its_only_executor_is_not_warm_for_the_next_task(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    model = build_tiny_causal_lm(tmp_path / "tiny")
    cluster = make_cluster(2)
    client = client_for(cluster)
    first = client.submit(generation(model, 2, 2))
    assert client.wait(first["task_id"], timeout=120)["state"] == "succeeded"
    holder = first["worker_id"]
    other = next(w["worker_id"] for w in client.workers()["items"] if w["worker_id"] != holder)
    until(lambda: bool(client.worker(holder)["warm_models"]), "the first worker to report its idle executor's model")

    # The warm worker gets the next task for the model, which takes its idle executor...
    # Minutes of work on a fast machine (4,096 completions), so it still runs when it is cancelled below.
    busy = client.submit(generation(model, 4096, 480))
    assert busy["worker_id"] == holder
    until(lambda: client.task(busy["task_id"])["state"] == "running", "the long task to start")
    # ...and from its next heartbeat on, no longer says it holds the model ready.
    until(lambda: not client.worker(holder)["warm_models"], "the busy worker to stop reporting the model warm", 15)
    third = client.submit(generation(model, 2, 2))
    assert third["worker_id"] == other, (third, holder)
    assert client.wait(third["task_id"], timeout=120)["state"] == "succeeded"
    client.cancel(busy["task_id"])
    assert client.wait(busy["task_id"], timeout=60)["state"] == "cancelled"
    # The idle executor holds the model again, ready for the next task: warm again.
    until(lambda: bool(client.worker(holder)["warm_models"]), "the worker to report the model warm again", 15)
