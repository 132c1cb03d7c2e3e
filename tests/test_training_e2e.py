"""Training through the whole system: an SFT task with LoRA on a worker, its adapter used by an
inference task that names the SFT task, metrics and progress on the record, and PPO offered only by a
worker whose PPO interpreter can run it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from mloc import keys
from mloc.client import Client
from mloc.errors import MlocError
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("train")

REPO = Path(__file__).resolve().parents[1]
PPO_PYTHON = REPO / ".venv-ppo" / "bin" / "python"


def wait_terminal(client: Client, task_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (record := client.task(task_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, record
        assert not record["unschedulable"], record["pending_reason"]
        time.sleep(0.5)
    return record


def long_sft(model: Path, steps: int) -> str:
    """The tiny SFT template for ``steps`` steps, a metric each step, and no checkpoint but the one a
    cancel or a stop saves."""
    return (
        (REPO / "templates" / "sft_tiny_local.yaml")
        .read_text()
        .replace("/tmp/tiny-llama", str(model))
        .replace("max_steps: 30", f"max_steps: {steps}")
        .replace("logging_steps: 5", "logging_steps: 1")
        .replace("save_steps: 10", f"save_steps: {steps + 1}")
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def test_sft_lora_then_inference_with_the_adapter_by_task_id(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tiny_model: Path, redis_url: str
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    sft = (REPO / "templates" / "sft_tiny_local.yaml").read_text().replace("/tmp/tiny-llama", str(tiny_model))
    trained = wait_terminal(client, client.submit(sft.encode())["task_id"])
    assert trained["state"] == "succeeded", trained
    assert trained["artifacts"]["adapter"]["kind"] == "lora"
    assert Path(trained["artifacts"]["adapter"]["path"]).is_dir()
    assert trained["progress"]["step"] == trained["progress"]["total"] == 30
    assert trained["usage"]["train_samples"] > 0
    metrics = client.metrics(trained["task_id"])["metrics"]
    losses = [float(m["loss"]) for m in metrics if "loss" in m]
    assert [m["step"] for m in metrics] == sorted(m["step"] for m in metrics)
    assert len(losses) >= 3 and losses[-1] < losses[0]

    def inference(adapter: str | None) -> list[str]:
        adapter_line = f", adapter: {{path: {adapter!r}}}" if adapter else ""
        body = (
            "taskType: inference\n"
            f"model: {{source: {{type: local, identifier: {str(tiny_model)!r}}}, engine: transformers{adapter_line}}}\n"
            "inference: {max_tokens: 6, temperature: 0, prompts: ['Question: What is the capital of France?\\nAnswer:']}\n"
        )
        record = wait_terminal(client, client.submit(body.encode())["task_id"])
        assert record["state"] == "succeeded", record
        return [item["output"] for item in client.result(record["task_id"])["items"]]

    assert inference(trained["task_id"]) != inference(None)
    missing = "00000000-0000-4000-8000-000000000000"
    body = (
        "taskType: inference\n"
        f"model: {{source: {{type: local, identifier: {str(tiny_model)!r}}}, engine: transformers, adapter: {{path: {missing!r}}}}}\n"
        "inference: {prompts: ['x']}\n"
    )
    failed = wait_terminal(client, client.submit(body.encode())["task_id"])
    assert failed["state"] == "failed" and "does not exist" in failed["reason"]


def test_ppo_is_offered_only_where_its_interpreter_can_run_it(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    assert PPO_PYTHON.exists(), "run scripts/setup_ppo_env.sh first (CI does)"
    cluster = make_cluster(
        2,
        worker_env=[
            {"MLOC_EXECUTOR_PYTHON": f"ppo={PPO_PYTHON}"},
            {"MLOC_EXECUTOR_PYTHON": f"ppo={REPO / '.venv' / 'bin' / 'python'}"},
        ],
    )
    client = client_for(cluster)
    types = {w["worker_id"]: w["task_types"] for w in client.workers()["items"]}
    assert "ppo" in types["local-1"]
    assert "ppo" not in types["local-2"] and "sft" in types["local-2"]
    dry = client.submit(
        b"taskType: ppo\nmodel: {source: {type: local, identifier: /models/policy}}\n"
        b"dataset: {examples: [{prompt: hi}]}\nhyperparameters: {reward_model: /models/reward}\n",
        dry_run=True,
    )
    assert dry["would_place_on"] == ["local-1"]


def test_a_worker_stopped_mid_training_saves_a_checkpoint_and_another_worker_continues_from_it(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tiny_model: Path
) -> None:
    cluster = make_cluster(2, env={"MLOC_SHUTDOWN_GRACE_SEC": "0.5"})
    client = client_for(cluster)
    # Long enough that the stop lands mid-training: the tiny model trains 200 steps in about a second,
    # and a stop sent after the third step's metric can arrive later than that.
    steps = 1000
    sft = long_sft(tiny_model, steps)
    task_id = client.submit(sft.encode())["task_id"]
    deadline = time.monotonic() + 300
    while len(client.metrics(task_id)["metrics"]) < 3:
        assert time.monotonic() < deadline, client.task(task_id)
        time.sleep(0.1)
    first_worker = client.task(task_id)["worker_id"]
    cluster.stop_worker(first_worker)  # SIGTERM, as `mloc down` and a container's stop send it

    record = wait_terminal(client, task_id)
    said = [line["text"] for line in client.logs(task_id)["lines"]]
    assert record["state"] == "succeeded" and record["worker_id"] != first_worker, (record, said)
    stop = [
        re.fullmatch(
            r"the worker is shutting down at step (\d+): saving a checkpoint and stopping; "
            r"the task goes back to the queue and continues from it",
            text,
        )
        for text in said
    ]
    [stopped] = [int(found.group(1)) for found in stop if found]
    saved = client.result(task_id)["resumed_from_step"]
    assert 3 <= stopped <= saved < steps, said
    assert f"training stopped at step {saved}" in "\n".join(said), said
    assert not [text for text in said if "cancel" in text], said  # nobody cancelled it
    assert f"run 2: resuming from checkpoint-{saved}" in said, said
    # The first run's shutdown is not the task's failure: it spent no attempt of the task's own.
    assert record["usage"]["train_steps"] == steps, record["usage"]


def test_a_cancelled_training_task_resumed_continues_from_its_checkpoint(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tiny_model: Path, redis_url: str
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    steps = 1000  # long enough that the cancel lands mid-training (see the test above)
    sft = long_sft(tiny_model, steps)
    # Two steps after it: what ends when the training is cancelled waits again when it is resumed.
    after = [
        {
            "apiVersion": "mloc/v1",
            "kind": "EchoTask",
            "metadata": {"name": name},
            "spec": {"taskType": "echo", "dependsOn": [parent]},
        }
        for name, parent in (("after", "sft-tiny-local"), ("last", "after"))
    ]
    answer = client.http.post(
        "/api/v1/tasks/bulk",
        content="\n---\n".join([sft, *(json.dumps(doc) for doc in after)]).encode(),
        headers={"content-type": "text/yaml"},
    )
    assert answer.status_code == 201, answer.text
    ids = {task["name"]: task["task_id"] for task in answer.json()["tasks"]}
    task_id = ids["sft-tiny-local"]
    deadline = time.monotonic() + 300
    while not any(float(m.get("loss", "nan")) > 0 for m in client.metrics(task_id)["metrics"][2:]):
        assert time.monotonic() < deadline, client.task(task_id)
        time.sleep(0.1)
    client.cancel(task_id)
    cancelled = wait_terminal(client, task_id)
    assert cancelled["state"] == "cancelled", cancelled
    first = [line["text"] for line in client.logs(task_id)["lines"]]
    assert [
        text for text in first if re.fullmatch(r"cancel received at step \d+: saving a checkpoint and stopping", text)
    ]
    assert [text for text in first if text.startswith("training stopped at step ")], first
    assert not [text for text in first if text.startswith("training finished")], first
    ended = wait_terminal(client, ids["last"])
    assert ended["state"] == "failed" and ended["reason_code"] == "dependency_failed", ended

    said = mloc("resume", task_id, env={"MLOC_API_URL": cluster.api_url})
    found = re.fullmatch(
        rf"resumed {task_id}: it continues from checkpoint-(\d+) \(step (\d+)\) once a worker takes it "
        rf"\(mloc show {task_id}\)\n"
        rf"2 task\(s\) that ended with it wait for it again: after \({ids['after'][:8]}\), last \({ids['last'][:8]}\)\n",
        said.stdout,
    )
    assert found and found.group(1) == found.group(2), said
    saved = int(found.group(1))
    assert 3 <= saved < steps
    # The cancel said where the task stood and how to go on.
    assert cancelled["reason"] == (
        f"cancelled on request; checkpoint-{saved} is kept: `mloc resume {task_id}` continues from it"
    ), cancelled
    with pytest.raises(MlocError, match="only a failed or cancelled task is resumed"):
        client.resume(task_id)  # already waiting: a second resume changes nothing

    resumed = wait_terminal(client, task_id)
    logs = [line["text"] for line in client.logs(task_id)["lines"]]
    assert resumed["state"] == "succeeded", logs
    # The new run has the attempts the task was submitted with; the first run's one stays counted.
    assert resumed["attempts"] == 2 and resumed["max_attempts"] == 1 + cancelled["max_attempts"], resumed
    assert cancelled["finished_at"] <= resumed["resumed_at"] <= resumed["started_at"], resumed
    # Its usage is over both runs: the steps of each, and the time of each.
    assert resumed["usage"]["train_steps"] == steps, resumed["usage"]
    assert (
        resumed["usage"]["wall_sec"]
        > cancelled["usage"]["wall_sec"] + resumed["finished_at"] - resumed["started_at"] - 1
    )
    assert resumed["progress"]["step"] == resumed["progress"]["total"] == steps
    result = client.result(task_id)
    assert result["resumed_from_step"] == saved and result["global_step"] == steps, result
    assert f"resumed by admin: it continues from checkpoint-{saved} (step {saved}) once a worker takes it" in logs
    assert f"run 2: resuming from checkpoint-{saved}" in logs, logs
    # Its metrics go on from the checkpoint, not from the start.
    metrics = client.metrics(task_id)["metrics"]
    metric_steps = [m["step"] for m in metrics]
    assert metric_steps == sorted(set(metric_steps)) and metric_steps[-1] == steps
    assert [m["run"] for m in metrics] == [1] * saved + [2] * (steps - saved), metrics

    with pytest.raises(MlocError, match="only a failed or cancelled task is resumed"):
        client.resume(task_id)
    # The steps after it ran once it had succeeded, each after the one it waits for.
    followers = {name: wait_terminal(client, ids[name]) for name in ("after", "last")}
    assert [record["state"] for record in followers.values()] == ["succeeded", "succeeded"], followers
    assert followers["after"]["started_at"] >= resumed["finished_at"]
    assert followers["last"]["started_at"] >= followers["after"]["finished_at"]
    # Usage counts each task once, as it ended for good, however many runs (or ends) it had.
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    days = [r.hgetall(keys.usage_day("admin", day)) for day in r.zrange(keys.usage_days("admin"), 0, -1)]
    kinds = ("tasks", "tasks.sft.succeeded", "tasks.sft.cancelled", "tasks.echo.succeeded", "tasks.echo.failed")
    counted = {name: sum(float(day.get(name, 0)) for day in days) for name in kinds}
    assert counted == dict(zip(kinds, (3, 1, 0, 2, 0), strict=True)), counted
    for name in ("after", "last"):
        logs = [line["text"] for line in client.logs(ids[name])["lines"]]
        assert f"waits again: sft-tiny-local ({task_id[:8]}) was resumed by admin" in logs, logs
    echo = client.wait(
        client.submit({"taskType": "echo", "hyperparameters": {"fail_message": "no"}})["task_id"], timeout=60
    )
    assert echo["state"] == "failed", echo
    with pytest.raises(MlocError, match="neither a dataset task nor a training task"):
        client.resume(echo["task_id"])
