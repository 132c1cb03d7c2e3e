"""Pipelines: tasks that wait for tasks, on a real cluster (graph order, failure and skip, cancel, an
orchestrator restart in the middle) and at planning (names, cycles, outputs, owners: refused whole)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import yaml

from mloc import keys
from mloc.client import ApiError, Client
from mloc.errors import SpecError
from mloc.localcluster import LocalCluster
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.settings import Settings
from mloc.spec import Document, validate
from tests.reliability.conftest import restart_orchestrator


def echo(name: str, *, after: list[str] | None = None, sleep: float = 0.0, fail: str | None = None,
         skip: bool = False) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"taskType": "echo", "payload": name, "hyperparameters": {"sleep_sec": sleep}}
    if fail:
        spec["hyperparameters"]["fail_message"] = fail
    if after:
        spec["dependsOn"] = after
    if skip:
        spec["onDependencyFailure"] = "skip"
    return {"apiVersion": "mloc/v1", "kind": "EchoTask", "metadata": {"name": name}, "spec": spec}


def wait_all(client: Client, ids: list[str], timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = [client.task(task_id) for task_id in ids]
        if all(r["state"] in ("succeeded", "failed", "cancelled") for r in records):
            return records
        assert time.monotonic() < deadline, [(r["name"], r["state"]) for r in records]
        time.sleep(0.1)


def test_a_diamond_runs_in_order_from_one_multi_document_file(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "4"}])
    client = client_for(cluster)
    graph = [echo("prepare", sleep=0.6), echo("left", after=["prepare"], sleep=0.3),
             echo("right", after=["prepare"], sleep=0.3), echo("join", after=["left", "right"])]  # fmt: skip
    answer = client.http.post(
        "/api/v1/tasks/bulk", content=yaml.safe_dump_all(graph).encode(), headers={"content-type": "text/yaml"}
    )
    assert answer.status_code == 201, answer.text
    tasks = answer.json()["tasks"]
    ids = {t["name"]: t["task_id"] for t in tasks}
    pipeline_id = tasks[0]["pipeline_id"]
    assert tasks[0]["worker_id"] == "local-1" and tasks[3]["worker_id"] is None, tasks
    waiting = client.task(ids["join"])
    assert waiting["state"] == "pending" and waiting["waiting_on"] == [ids["left"], ids["right"]]
    assert waiting["pending_reason"] == f"waiting for left ({ids['left'][:8]}), right ({ids['right'][:8]}) to succeed"

    records = {r["name"]: r for r in wait_all(client, list(ids.values()))}
    assert {r["state"] for r in records.values()} == {"succeeded"}
    assert records["left"]["started_at"] >= records["prepare"]["finished_at"]
    assert records["right"]["started_at"] >= records["prepare"]["finished_at"]
    assert records["join"]["started_at"] >= max(records["left"]["finished_at"], records["right"]["finished_at"])
    assert records["join"]["waiting_on"] == [] and records["join"]["pipeline_id"] == pipeline_id

    shown = client.pipeline(pipeline_id)
    assert shown["state"] == "succeeded"
    assert [(n["name"], n["state"], len(n["depends_on"])) for n in shown["tasks"]] == [
        ("prepare", "succeeded", 0), ("left", "succeeded", 1), ("right", "succeeded", 1), ("join", "succeeded", 2)
    ]  # fmt: skip
    # A task submitted later may wait for an existing one by id.
    later = client.submit(echo("later", after=[ids["join"]]))
    assert wait_all(client, [later["task_id"]])[0]["state"] == "succeeded"


def test_a_failed_step_fails_or_skips_what_waits_for_it(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "row {i}"}}\n' for i in range(30)))
    dataset_step = infer("rows", input={"path": str(rows), "chunk_rows": 10})
    dataset_step["spec"]["dependsOn"] = ["broken"]
    graph = [echo("broken", fail="bad data"), echo("strict", after=["broken"]),
             echo("lenient", after=["broken"], skip=True), echo("downstream", after=["strict"]), dataset_step]  # fmt: skip
    tasks = client.submit_bulk(graph)["tasks"]
    records = {r["name"]: r for r in wait_all(client, [t["task_id"] for t in tasks])}
    assert records["broken"]["state"] == "failed"
    assert records["strict"]["state"] == "failed" and records["strict"]["reason_code"] == "dependency_failed"
    assert f"the task it depends on, broken ({tasks[0]['task_id']}), failed" in records["strict"]["reason"]
    assert "bad data" in records["strict"]["reason"]
    assert records["lenient"]["state"] == "cancelled" and records["lenient"]["reason"].startswith("skipped: ")
    # Each says so in its own log, written with the move; a failed one's reason is read after "failed:".
    strict_said = client.logs(records["strict"]["task_id"])["lines"]
    assert [(e["event"], e["text"]) for e in strict_said] == [("failed", f"failed: {records['strict']['reason']}")]
    assert records["strict"]["reason"].startswith("the task it depends on, broken")
    lenient_said = client.logs(records["lenient"]["task_id"])["lines"]
    assert [(e["event"], e["text"]) for e in lenient_said] == [("cancelled", records["lenient"]["reason"])]
    # The failure travels down the graph.
    assert records["downstream"]["state"] == "failed" and "strict" in records["downstream"]["reason"]
    assert all(r["attempts"] == 0 for name, r in records.items() if name != "broken")  # never placed
    # A dataset task's chunks wait with it: it fails for its dependency, with no resume to offer.
    assert records["rows"]["state"] == "failed" and records["rows"]["reason_code"] == "dependency_failed"
    assert records["rows"]["reason"].startswith("the task it depends on, broken"), records["rows"]["reason"]
    assert "mloc resume" not in records["rows"]["reason"]
    # Each step counts once in its owner's usage, run or not (the dataset step by its chunks, as when run).
    owner = records["broken"]["owner"]
    totals = client.stats(user=owner)["users"][0]["totals"]
    assert (totals["tasks.echo.failed"], totals["tasks.echo.cancelled"]) == (3, 1), totals
    assert totals["tasks.inference.failed"] == len(client.task(records["rows"]["task_id"])["children"]), totals
    # A new task cannot wait for a task that already failed.
    with pytest.raises(ApiError, match="failed, so this task could never run"):
        client.submit(echo("too-late", after=[tasks[0]["task_id"]]))


def test_cancelling_a_pipeline_cancels_what_has_not_run_and_a_restart_loses_nothing(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "row {i}"}}\n' for i in range(30)))
    dataset_step = infer("rows", input={"path": str(rows), "chunk_rows": 10})
    dataset_step["spec"]["dependsOn"] = ["slow"]
    tasks = client.submit_bulk([echo("slow", sleep=30), echo("after", after=["slow"]), dataset_step])["tasks"]
    answer = client.cancel_pipeline(tasks[0]["pipeline_id"])
    assert set(answer["cancelled"]) == {t["task_id"] for t in tasks}
    records = wait_all(client, [t["task_id"] for t in tasks])
    assert [r["state"] for r in records] == ["cancelled", "cancelled", "cancelled"]
    # A dataset step that never left its wait is not offered a resume, and one asked for is refused: it
    # would run without what it waits for.
    assert "mloc resume" not in records[2]["reason"], records[2]["reason"]
    with pytest.raises(ApiError) as refused:
        client.resume(tasks[2]["task_id"])
    assert refused.value.status_code == 409
    assert refused.value.message.startswith(
        f"task {tasks[2]['task_id']} waits for slow ({tasks[0]['task_id'][:8]}), which is cancelled: it would run "
        "without what that makes; submit it again"
    ), refused.value.message

    # The graph lives in Redis: an orchestrator restarted while a step runs still releases the next.
    tasks = client.submit_bulk([echo("first", sleep=2), echo("second", after=["first"])])["tasks"]
    assert cluster.orchestrator is not None
    cluster.orchestrator.kill()
    cluster.orchestrator.wait()
    restart_orchestrator(cluster)
    records = wait_all(client, [t["task_id"] for t in tasks], timeout=60)
    assert [r["state"] for r in records] == ["succeeded", "succeeded"]
    assert records[1]["started_at"] >= records[0]["finished_at"]


# ------------------------------------------------------------------------------------- planning
def plan_of(redis_url: str, documents: list[dict[str, Any]], who: str = "alice", admin: bool = False) -> Any:
    async def run() -> Any:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings())
        try:
            return await orch.submit_graph([validate(d) for d in documents], Principal(who, admin=admin))
        finally:
            await r.aclose()

    return asyncio.run(run())


def stored(sync_redis: redis.Redis) -> int:
    return int(sync_redis.zcard(keys.TASKS_ALL))


INFER = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}


def infer(name: str, **inference: Any) -> dict[str, Any]:
    model = dict(INFER)
    if "adapter" in inference:
        model["adapter"] = inference.pop("adapter")
    spec = {"taskType": "inference", "model": model, "inference": {"max_tokens": 2, **inference}}
    return {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize(
    ("documents", "expected"),
    [
        ([echo("a", after=["b"]), echo("b", after=["a"])], "cycle: a -> b -> a"),
        ([echo("a", after=["a"])], "the task names itself"),
        ([echo("a"), echo("b", after=["nope"])], "'nope' is neither a task of this submission"),
        ([echo("a"), echo("a")], "two tasks are named 'a'"),
        (
            [echo("gen"), infer("use", prompts=["x"], adapter={"from": "gen"})],
            "'gen' is a task of type 'echo', which makes no adapter; name a dpo or grpo or ppo or sft task",
        ),
        (
            [infer("gen", prompts=["x"]), infer("use", input={"from": "gen"})],
            "runs inline prompts and writes no result lines",
        ),
    ],
)
def test_a_bad_graph_is_refused_whole(
    redis_url: str, sync_redis: redis.Redis, documents: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(SpecError, match=expected) as caught:
        plan_of(redis_url, documents)
    assert "nothing was stored" in caught.value.message
    assert stored(sync_redis) == 0


def test_references_become_ids_and_dependencies(redis_url: str, sync_redis: redis.Redis) -> None:
    train = {"apiVersion": "mloc/v1", "kind": "SFTTask", "metadata": {"name": "tune"},
             "spec": {"taskType": "sft", "model": {"source": INFER["source"]},
                      "dataset": {"path": "/data/train.jsonl"}}}  # fmt: skip
    batch = infer("batch", input={"path": "/data/q.jsonl"}, adapter={"from": "tune"})
    # As the admin, who may name any local path.
    answer = plan_of(redis_url, [train, batch, infer("again", input={"from": "batch"})], admin=True)
    ids = [t["task_id"] for t in answer["tasks"]]
    assert [t["depends_on"] for t in answer["tasks"]] == [[], [ids[0]], [ids[1]]]
    spec = validate_stored(sync_redis, ids[1])
    assert spec.spec.model.adapter.path == ids[0] and spec.spec.model.adapter.from_ is None  # type: ignore[attr-defined]
    assert validate_stored(sync_redis, ids[2]).spec.inference.input.task == ids[1]  # type: ignore[attr-defined]
    # The batch step is a chunked dataset task: its chunks wait for the training task, not its parent.
    chunk = sync_redis.hget(keys.task(ids[1]), "children")
    assert chunk and sync_redis.hget(keys.task(eval(chunk)[0]), "waiting_on") == f'["{ids[0]}"]'
    assert sync_redis.zscore(keys.PENDING, ids[1]) is None and sync_redis.zscore(keys.PENDING, ids[0]) is not None


def validate_stored(sync_redis: redis.Redis, task_id: str) -> Document:
    import json

    return validate(json.loads(sync_redis.hget(keys.task(task_id), "spec") or "{}"))


def test_a_task_of_another_user_cannot_be_waited_for(redis_url: str, sync_redis: redis.Redis) -> None:
    mine = plan_of(redis_url, [echo("alices")], who="alice")["tasks"][0]["task_id"]
    before = stored(sync_redis)
    with pytest.raises(SpecError, match="nor a task id of yours"):
        plan_of(redis_url, [echo("bobs", after=[mine])], who="bob")
    assert stored(sync_redis) == before


def test_a_dataset_step_waits_again_when_what_it_waits_for_is_resumed(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    first = tmp_path / "first.jsonl"
    prompts = [f'{{"prompt": "row {i}"}}\n' for i in range(10)]
    first.write_text("".join(prompts[:7]) + '{"prompt": ""}\n' + "".join(prompts[8:]))  # row 7 is empty
    second = tmp_path / "second.jsonl"
    second.write_text("".join(prompts))
    rows = infer("rows", input={"path": str(second), "chunk_rows": 5})
    rows["spec"]["dependsOn"] = ["prep"]
    graph = [infer("prep", input={"path": str(first), "chunk_rows": 5}), rows, echo("report", after=["rows"])]
    tasks = client.submit_bulk(graph)["tasks"]
    ids = {t["name"]: t["task_id"] for t in tasks}
    records = {r["name"]: r for r in wait_all(client, list(ids.values()), timeout=300)}
    assert records["prep"]["state"] == "failed", records["prep"]
    assert [records[n]["reason_code"] for n in ("rows", "report")] == ["dependency_failed"] * 2, records
    chunks = records["rows"]["children"]
    owner = records["prep"]["owner"]
    ended = client.stats(user=owner)["users"][0]["totals"]

    first.write_text("".join(prompts))  # the row fixed
    answer = client.resume(ids["prep"])
    # The dataset step waits again, with its chunks, and so does what waits for it.
    assert [d["name"] for d in answer["dependents_waiting"]] == ["rows", "report"], answer
    waiting = client.task(ids["rows"])
    assert waiting["state"] == "pending" and not waiting["reason"], waiting
    assert waiting["pending_reason"] == f"waiting for prep ({ids['prep'][:8]}) to succeed", waiting
    assert {client.task(c)["state"] for c in chunks} == {"pending"}
    said = [e["text"] for e in client.logs(ids["rows"])["lines"]]
    assert any(text.startswith(f"waits again: prep ({ids['prep'][:8]}) was resumed by ") for text in said), said

    records = {r["name"]: r for r in wait_all(client, list(ids.values()), timeout=300)}
    assert {r["state"] for r in records.values()} == {"succeeded"}, records
    # The same chunks ran, now that prep has succeeded (and the next were cut after them, as usual).
    assert records["rows"]["children"][: len(chunks)] == chunks, records["rows"]["children"]
    assert client.result(ids["rows"])["rows"] == 10
    assert records["rows"]["started_at"] >= records["prep"]["finished_at"]
    # Their ends for a dependency were taken back: each counts once, as it ended in the end.
    totals = client.stats(user=owner)["users"][0]["totals"]
    # (prep's failed chunk stays counted: a resume runs a new chunk in its place.)
    assert ended["tasks.echo.failed"] == 1, ended
    assert totals.get("tasks.inference.failed", 0) == ended["tasks.inference.failed"] - len(chunks), totals
    assert totals.get("tasks.echo.failed", 0) == 0 and totals["tasks.echo.succeeded"] == 1, totals
