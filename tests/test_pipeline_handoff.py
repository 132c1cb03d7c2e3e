"""Outputs handed along on a real cluster: a training task's merged model evaluated and used for
inference by the training task's name, gates on eval scores deciding which steps run, a collection
queried by the name of the task that indexed it (on the worker whose disk holds it), and workers
advertising the eval harness tasks whose data they hold, so a task naming others is refused at submit."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
ROWS = [
    {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), str(i), "zero"], "answer": i % 4}
    for i in range(6)
]


def task(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mloc/v1", "kind": "Task", "metadata": {"name": name}, "spec": spec}


def wait_all(client: Client, ids: list[str], timeout: float = 600) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = [client.task(task_id) for task_id in ids]
        if all(r["state"] in ("succeeded", "failed", "cancelled") for r in records):
            return {r["name"]: r for r in records}
        assert time.monotonic() < deadline, [(r["name"], r["state"], r["pending_reason"]) for r in records]
        time.sleep(0.5)


@pytest.mark.extra("train", "eval", "inference")
def test_a_merged_model_is_evaluated_and_used_and_gates_on_its_scores_decide_what_runs(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "2"}])
    client = client_for(cluster)
    arith = {"custom": [{"name": "arith", "path": str(data), "type": "multiple_choice"}], "batch_size": 4}
    merged = {"source": {"from": "tune"}, "engine": "transformers"}
    steps = [
        task(
            "tune",
            {
                "taskType": "sft",
                "model": {"source": TINY["source"], "adapter": {"r": 4, "lora_alpha": 8}},
                "dataset": {"examples": [{"prompt": "Question: 2 plus 2?\nAnswer:", "completion": " 4"}] * 4},
                "hyperparameters": {"max_steps": 2, "batch_size": 2, "merge_adapter": True, "save_steps": 10},
            },
        ),
        task("base", {"taskType": "eval", "model": TINY, "eval": arith}),
        task("tuned", {"taskType": "eval", "model": merged, "eval": arith}),
        task(
            "answer",
            {
                "taskType": "inference",
                "model": merged,
                "inference": {"max_tokens": 3, "temperature": 0, "prompts": ["Question: 2 plus 2?\nAnswer:"]},
                "when": {"from": "tuned", "score": "arith/acc", "min": 0},
            },
        ),
        task("if-better", {"taskType": "echo", "payload": 1, "when": {"from": "tuned", "score": "arith/acc", "beats": "base"}}),
        task("never", {"taskType": "echo", "payload": 2, "when": {"from": "base", "score": "arith/acc", "min": 1.01}}),
        task("after-never", {"taskType": "echo", "payload": 5, "dependsOn": ["never"]}),
    ]  # fmt: skip
    answer = client.submit_bulk(steps)
    ids = {t["name"]: t["task_id"] for t in answer["tasks"]}
    assert client.task(ids["if-better"])["waiting_on"] == [ids["tuned"], ids["base"]]
    records = wait_all(client, list(ids.values()))

    tune = records["tune"]
    assert tune["state"] == "succeeded", tune["reason"]
    folder = tune["artifacts"]["merged_model"]["path"]
    assert Path(folder, "config.json").is_file()
    for name in ("base", "tuned", "answer"):
        assert records[name]["state"] == "succeeded", (name, records[name]["reason"])
    # The worker loaded the merged folder for the steps that named the training task.
    assert client.task(ids["tuned"])["spec"]["spec"]["model"]["source"] == {"type": "task", "identifier": ids["tune"]}
    assert client.result(ids["tuned"])["model"] != client.result(ids["base"])["model"]
    assert len(client.result(ids["answer"])["items"]) == 1
    # The step its gate let through says so in its log, with the score that did.
    passed = [e for e in client.logs(ids["answer"])["lines"] if e.get("event") == "condition_met"]
    assert [e["text"] for e in passed] == [
        f"condition met: tuned ({ids['tuned'][:8]})'s arith/acc is "
        f"{client.result(ids['tuned'])['scores']['arith']['acc']:.4g}, at least min 0"
    ], passed
    base_acc = client.result(ids["base"])["scores"]["arith"]["acc"]
    tuned_acc = client.result(ids["tuned"])["scores"]["arith"]["acc"]

    better = records["if-better"]
    if tuned_acc > base_acc:
        assert better["state"] == "succeeded", better["reason"]
    else:
        assert better["state"] == "cancelled" and better["reason_code"] == "condition_not_met"
        assert f"does not beat base ({ids['base'][:8]})'s {base_acc:.4g}" in better["reason"]
    never = records["never"]
    assert never["state"] == "cancelled" and never["reason_code"] == "condition_not_met"
    assert never["reason"] == f"skipped: base ({ids['base'][:8]})'s arith/acc is {base_acc:.4g}, below min 1.01"
    assert never["attempts"] == 0
    with pytest.raises(ApiError) as refused:  # the gate's answer stands
        client.resume(ids["never"])
    assert refused.value.status_code == 409 and "was skipped by a gate (skipped: base" in refused.value.message
    # What waits for a skipped step is skipped with it (the branch not taken), not failed.
    after = records["after-never"]
    assert after["state"] == "cancelled" and after["reason_code"] == "condition_not_met", after
    assert after["reason"] == f"skipped: the task it depends on, never ({ids['never']}), was {never['reason']}"
    # So the pipeline took its branches and succeeded; `mloc pipeline` says which steps were skipped.
    pipeline_id = answer["tasks"][0]["pipeline_id"]
    graph = client.pipeline(pipeline_id)
    assert graph["state"] == "succeeded", graph
    assert {n["name"] for n in graph["tasks"] if n["skipped"]} >= {"never", "after-never"}
    env = {"MLOC_API_URL": cluster.api_url}
    shown = mloc("pipeline", pipeline_id, env=env)
    assert shown.returncode == 0 and f"pipeline {pipeline_id}: succeeded" in shown.stdout, shown
    assert re.search(rf"^  never +{ids['never'][:8]}  skipped +after base +\(skipped: base", shown.stdout, re.M), shown

    # `mloc submit --wait` of steps a gate skips ends well: skipping is the gate's answer, not a failure.
    gated = tmp_path / "gated.yaml"
    gated.write_text(
        f"metadata: {{name: gated}}\nspec: {{taskType: echo, when: {{from: {ids['base']}, score: arith/acc, min: 1.01}}}}\n"
        "---\nmetadata: {name: then}\nspec: {taskType: echo, dependsOn: [gated]}\n"
    )
    waited = mloc("submit", str(gated), "--wait", env=env)
    assert waited.returncode == 0, waited
    assert "0 of 2 tasks succeeded; 2 skipped by a gate (spec.when) that did not pass" in waited.stdout, waited

    # A gate on an eval that already succeeded is decided at once.
    later = client.submit(task("later", {"taskType": "echo", "payload": 3,
                                         "when": {"from": ids["base"], "score": "arith/acc", "max": 1}}))  # fmt: skip
    assert wait_all(client, [later["task_id"]], timeout=60)["later"]["state"] == "succeeded"
    # A score the eval will not have is refused at submit, naming the ones it has.
    with pytest.raises(ApiError) as caught:
        client.submit(task("typo", {"taskType": "echo", "payload": 4,
                                    "when": {"from": ids["tuned"], "score": "arith/accuracy", "min": 0}}))  # fmt: skip
    assert caught.value.status_code == 422
    assert f"'{ids['tuned']}' scores arith by acc, acc_norm, not 'accuracy'" in caught.value.message


@pytest.mark.extra("rag", "inference")
def test_a_collection_is_queried_by_the_name_of_the_task_that_indexed_it_where_it_lives(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(
        2,
        worker_env=[
            {"MLOC_VECTORS_DIR": str(tmp_path / "vectors-1")},
            {"MLOC_VECTORS_DIR": str(tmp_path / "vectors-2")},
        ],
    )
    client = client_for(cluster)
    stores = {w["worker_id"]: w["capabilities"]["rag_inference"]["vector_stores"] for w in client.workers()["items"]}
    assert stores["local-1"] != stores["local-2"]
    common = {"taskType": "rag_inference", "model": TINY, "inference": {"max_tokens": 3, "temperature": 0}}
    documents = [
        {"text": "The MLOC support desk is open from 9:00 to 17:00 CET.", "metadata": {"source": "desk"}},
        {"text": "Every MLOC worker sends a heartbeat every 30 seconds.", "metadata": {"source": "heartbeats"}},
    ]
    index = {**common, "documents": documents, "questions": ["When is the desk open?"],
             "hyperparameters": {"collection": "handbook", "retrieval_k": 1}}  # fmt: skip
    ask = {**common, "questions": ["How often does a worker send a heartbeat?"],
           "hyperparameters": {"collection": {"from": "index"}, "retrieval_k": 1}}  # fmt: skip
    answer = client.submit_bulk([task("index", index), task("ask", ask)])
    ids = {t["name"]: t["task_id"] for t in answer["tasks"]}
    records = wait_all(client, list(ids.values()))
    assert records["index"]["state"] == "succeeded", records["index"]["reason"]
    assert records["ask"]["state"] == "succeeded", records["ask"]["reason"]
    where = records["index"]["worker_id"]
    store = client.result(ids["index"])["vector_store"]
    assert stores[where] == [store]
    # Placed where the collection is, because it needed that worker's vector store.
    assert records["ask"]["worker_id"] == where
    assert ["vector_stores", store] in client.task(ids["ask"])["request"]["needs"]
    result = client.result(ids["ask"])
    assert result["collection"] == "handbook" and result["index"]["sync"] == "query"
    assert result["answers"][0]["sources"][0]["source"] == "heartbeats"


@pytest.mark.extra("eval")
def test_workers_advertise_the_harness_tasks_they_hold_and_others_are_refused_at_submit(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cache = tmp_path / "hf-datasets"
    (cache / "Rowan___hellaswag" / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)
    cluster = make_cluster(1, worker_env=[{"HF_DATASETS_CACHE": str(cache), "MLOC_EVAL_HARNESS_TASKS": "squadv2"}])
    client = client_for(cluster)
    held = client.workers()["items"][0]["capabilities"]["eval"]["harness_tasks"]
    assert "hellaswag" in held and "squadv2" in held and "arc_easy" not in held

    def harness(*names: str) -> dict[str, Any]:
        return task("harness", {"taskType": "eval", "model": TINY, "eval": {"tasks": list(names), "limit": 2}})

    assert client.submit(harness("hellaswag", "squadv2"), dry_run=True)["would_place_on"] == ["local-1"]
    with pytest.raises(ApiError) as caught:
        client.submit(harness("hellaswag", "arc_easy"))
    assert caught.value.status_code == 422
    assert caught.value.message.startswith(
        "spec.eval.tasks: no registered worker can run this task: no worker holds the data of harness task(s) "
        "'arc_easy' (workers that run eval tasks, with the harness data they hold: local-1: "
    )
    assert "TaskManager().load(['arc_easy'])" in caught.value.message
    assert caught.value.details[0]["path"] == "spec.eval.tasks[1]"
    with pytest.raises(ApiError, match="'arc_easy'"):
        client.submit_bulk([harness("hellaswag"), harness("arc_easy")])
    assert client.tasks()["total"] == 0
