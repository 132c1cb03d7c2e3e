"""The typed records and messages of mloc.records: each encoder against its decoder, in memory and
through a real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc import keys
from mloc.cli.waiting import progress_text
from mloc.records import (
    ADMIN,
    HEARTBEATING,
    Assignment,
    AssignmentError,
    NewTask,
    OrchestratorRecord,
    Registration,
    TaskRecord,
    WorkerRecord,
    WorkerStatus,
    WorkerView,
    heartbeat_fields,
)
from mloc.state import TaskState
from mloc.store import TaskStore
from mloc.workers import WorkerRegistry

TASK_ID = "0b1c2d3e-0000-4000-8000-000000000000"
DOCUMENT = {
    "apiVersion": "mloc/v1",
    "kind": "EchoTask",
    "metadata": {"name": "hello", "labels": {"team": "eval"}},
    "spec": {"taskType": "echo", "timeout_sec": 30, "payload": {"text": "héllo"}},
}


def new_task(**changes: Any) -> NewTask:
    fields: dict[str, Any] = {
        "task_id": TASK_ID,
        "name": "hello",
        "owner": "alice",
        "task_type": "echo",
        "kind": "EchoTask",
        "topic": "tasks.echo",
        "priority": 3,
        "max_attempts": 2,
        "created_at": 1_700_000_000.25,
        "document": DOCUMENT,
        "request": {"task_type": "echo", "topic": "tasks.echo", "cpu": 500},
        "labels": {"team": "eval"},
    }
    return NewTask(**{**fields, **changes})


def registration(**changes: Any) -> Registration:
    fields: dict[str, Any] = {
        "worker_id": "w1",
        "hostname": "host-1",
        "pid": 4242,
        "topics": ["tasks.*"],
        "tags": ["eu", "spot"],
        "task_types": ["echo", "inference"],
        "capabilities": {"inference": {"engines": ["transformers"]}},
        "hardware": {"gpus": [{"index": 0, "name": "NVIDIA L4", "memory_bytes": 24 << 30}], "cpu_milli": 8000},
        "cpu_milli": 8000,
        "memory_bytes": 32 << 30,
        "slots": 3,
        "version": "1.2.3",
    }
    return Registration(**{**fields, **changes})


# -------------------------------------------------------------------------------------------- task
def test_a_new_task_reads_back_as_the_record_the_api_shows() -> None:
    record = TaskRecord.from_hash(new_task(submitted_by=ADMIN, retry_backoff_sec=2.0).to_hash())
    assert record.task_id == TASK_ID and record.state == TaskState.PENDING
    assert (record.name, record.owner, record.task_type, record.kind, record.topic) == (
        "hello",
        "alice",
        "echo",
        "EchoTask",
        "tasks.echo",
    )
    assert (record.priority, record.attempts, record.max_attempts) == (3, 0, 2)
    assert record.created_at == record.updated_at == 1_700_000_000.25
    assert record.spec == DOCUMENT and record.labels == {"team": "eval"}
    assert record.request == {"task_type": "echo", "topic": "tasks.echo", "cpu": 500}
    assert record.pending_reason == "waiting for the scheduler" and not record.unschedulable
    assert record.parent_id is None and record.replica is None and record.children == []


def test_optional_fields_are_stored_only_when_set() -> None:
    plain = new_task().to_hash()
    assert not {"submitted_by", "retry_backoff_sec", "parent_id", "replica", "group_size", "children"} & set(plain)
    assert plain["created_ms"] == "1700000000250"
    shard = new_task(parent_id="p", replica=1, submitted_by="bob", retry_backoff_sec=1, retry_backoff_max_sec=60.0)
    h = shard.to_hash()
    assert (h["parent_id"], h["replica"], h["submitted_by"]) == ("p", "1", "bob")
    assert (h["retry_backoff_sec"], h["retry_backoff_max_sec"]) == ("1.0", "60.0")
    parent = TaskRecord.from_hash(new_task(group_size=2, children=["a", "b"], unschedulable=True).to_hash())
    assert parent.children == ["a", "b"] and parent.unschedulable


def test_an_ended_tasks_progress_keeps_its_count_but_not_its_eta() -> None:
    reported = {"step": 7, "total": 20, "percent": 35.0, "elapsed_sec": 14.0, "eta_sec": 26.0}
    for state in TaskState:
        h = {**new_task().to_hash(), "state": state.value, "progress": json.dumps(reported)}
        progress = TaskRecord.from_hash(h).progress
        assert progress is not None and (progress["step"], progress["percent"]) == (7, 35.0)
        assert ("eta_sec" in progress) is not state.terminal, state
        # What `mloc show` prints: "7/20 (35.0%), ETA 26.0 s" while it runs, no ETA once it has ended.
        assert progress_text(progress).endswith("(35.0%)") is state.terminal


def test_a_dataset_tasks_progress_is_told_in_rows_not_steps() -> None:
    # Its message counts the rows already; without one, the count is said in its unit.
    told = {"step": 4000, "total": None, "unit": "rows", "message": "4,000 rows done in 2 chunk(s)"}
    assert progress_text(told) == "4,000 rows done in 2 chunk(s)"
    assert progress_text({"step": 4000, "unit": "rows"}) == "4,000 rows"
    assert progress_text({"step": 12, "message": "loss 0.31"}) == "step 12: loss 0.31"  # a training run's


def test_a_new_task_stored_and_read_back_through_redis(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        task = new_task(submitted_by="alice", retry_backoff_sec=0.5)
        await store.insert([task])
        assert await store.get(task.task_id) == TaskRecord.from_hash(task.to_hash())
        assert await r.hget(keys.task(task.task_id), "submitted_by") == "alice"
        assert await r.zscore(keys.pending_of("alice"), task.task_id) is not None
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------ worker
def test_a_registration_reads_back_as_the_view_and_the_record() -> None:
    reg = registration()
    view = WorkerView.from_hash(reg.to_hash(now=100.5), free_gpus={"0"})
    assert view.status == WorkerStatus.ACTIVE and view.last_heartbeat == view.registered_at == 100.5
    assert (view.topics, view.tags, view.task_types) == (["tasks.*"], {"eu", "spot"}, {"echo", "inference"})
    assert view.capabilities == reg.capabilities and view.hardware == reg.hardware
    assert view.gpus == reg.hardware["gpus"] and view.free_gpus == {0}
    assert (view.cpu_total, view.cpu_free, view.mem_total, view.mem_free) == (8000, 8000, 32 << 30, 32 << 30)
    assert (view.slots_total, view.slots_free, view.warm_models) == (3, 3, set())
    assert (view.hostname, view.pid, view.version) == ("host-1", 4242, "1.2.3")
    record = WorkerRecord.of(view, now=110.0, tasks=["t2", "t1"])
    assert record.status == WorkerStatus.ACTIVE and record.heartbeat_age_sec == 9.5
    assert record.capacity == {"cpu_milli": 8000, "memory_bytes": 32 << 30, "gpus": 1, "slots": 3}
    assert record.free == {"cpu_milli": 8000, "memory_bytes": 32 << 30, "gpus": [0], "slots": 3}
    assert record.tasks == ["t1", "t2"] and record.tags == ["eu", "spot"]
    assert json.loads(record.model_dump_json())["status"] == "active"


def test_worker_status_values_and_an_unknown_one() -> None:
    assert [s.value for s in WorkerStatus] == [
        "active",
        "draining",
        "restarting",
        "offline",
        "lost",
        "unresponsive",
        "unknown",
    ]
    assert HEARTBEATING == (WorkerStatus.ACTIVE, WorkerStatus.DRAINING)
    # A status written by a newer MLOC is shown, not a crash of the listing.
    h = registration().to_hash(now=1.0) | {"status": "hibernating"}
    assert WorkerView.from_hash(h).status == WorkerStatus.UNKNOWN


def test_the_registry_snapshot_and_records_read_what_the_worker_wrote(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        registry = WorkerRegistry(r)
        await registry.register(registration(), now=100.0)
        await registry.register(registration(worker_id="w2", hardware={"gpus": []}), now=100.0)
        fields = heartbeat_fields({"transformers:gemma", "vllm:qwen"}, {"org/m", "s3://b/m.gguf"})
        assert await registry.heartbeat("w1", fields) == "ok"
        (w1, w2) = sorted(await registry.snapshot(), key=lambda v: v.worker_id)
        h = await r.hgetall(keys.worker("w1"))
        assert w1 == WorkerView.from_hash(h, free_gpus=await r.smembers(keys.worker_free_gpus("w1")))
        assert w1.warm_models == {"transformers:gemma", "vllm:qwen"} and w1.free_gpus == {0}
        assert w1.held_models == {"org/m", "s3://b/m.gguf"} and w2.held_models == set()
        assert w2.gpus == [] and w2.free_gpus == set()
        (record,) = await registry.records(["w1"])
        assert record.warm_models == ["transformers:gemma", "vllm:qwen"] and record.free["gpus"] == [0]
        assert record.held_models == ["org/m", "s3://b/m.gguf"]
        # What changes between registrations is read again at every snapshot; the rest when the
        # worker registers anew, which the registry counts.
        seen = registry.registrations
        await r.hset(keys.worker("w1"), mapping={"slots_free": "1", "status": WorkerStatus.DRAINING.value})
        w1 = next(v for v in await registry.snapshot() if v.worker_id == "w1")
        assert (w1.slots_free, w1.status) == (1, WorkerStatus.DRAINING) and registry.registrations == seen
        await registry.register(registration(tags=["us"]), now=200.0)
        w1 = next(v for v in await registry.snapshot() if v.worker_id == "w1")
        assert w1.tags == {"us"} and w1.slots_free == 3 and registry.registrations == seen + 1
        await registry.set_status("w2", WorkerStatus.OFFLINE)
        assert await registry.heartbeat("w2") == "offline"
        await r.aclose()

    asyncio.run(scenario())


# -------------------------------------------------------------------------------------- assignment
def test_an_assignment_round_trips_through_its_stream_entry() -> None:
    sent = Assignment(TASK_ID, "alice", (0, 2), DOCUMENT)
    entry = {"task": TASK_ID, "body": sent.encode(), "attempt": "3"}
    got = Assignment.decode(entry)
    assert got == Assignment(TASK_ID, "alice", (0, 2), DOCUMENT, attempt=3)
    assert (got.task_type, got.labels, got.timeout_sec) == ("echo", {"team": "eval"}, 30.0)
    # A script that does not announce the attempt still delivers a readable assignment.
    assert Assignment.decode({"task": TASK_ID, "body": sent.encode()}).attempt is None


def test_an_assignment_in_the_shape_older_orchestrators_wrote_still_reads() -> None:
    body = f'{{"spec":{json.dumps(DOCUMENT)},"owner":"alice","gpus":[]}}'
    got = Assignment.decode({"task": TASK_ID, "body": body, "attempt": "1"})
    assert got.document == DOCUMENT and got.gpus == () and got.owner == "alice"


def body(**changes: Any) -> str:
    return json.dumps({"spec": DOCUMENT, "owner": "alice", "gpus": [0], **changes})


@pytest.mark.parametrize(
    ("entry", "fault"),
    [
        ({"body": body()}, "without a task id is unreadable: the entry has no 'task' field"),
        ({"task": TASK_ID, "body": "{not json"}, "its body is not JSON"),
        ({"task": TASK_ID}, "its body is not JSON"),
        ({"task": TASK_ID, "body": "[1, 2]"}, "its body is not a JSON object"),
        ({"task": TASK_ID, "body": json.dumps({"spec": DOCUMENT})}, "its body lacks owner, gpus"),
        ({"task": TASK_ID, "body": body(owner=7)}, "its owner is not a string"),
        ({"task": TASK_ID, "body": body(gpus=["0"])}, "its gpus are not a list of GPU indexes"),
        ({"task": TASK_ID, "body": body(spec={"spec": {}})}, "its document has no spec.taskType"),
        (
            {"task": TASK_ID, "body": body(spec={**DOCUMENT, "metadata": {"labels": "team=eval"}})},
            "metadata.labels is not a mapping",
        ),
        (
            {"task": TASK_ID, "body": body(spec={**DOCUMENT, "spec": {"taskType": "echo", "timeout_sec": "9"}})},
            "spec.timeout_sec is not a number",
        ),
        ({"task": TASK_ID, "body": body(), "attempt": "two"}, "its attempt 'two' is not a number"),
    ],
)
def test_a_malformed_assignment_is_refused_naming_what_is_wrong(entry: dict[str, str], fault: str) -> None:
    with pytest.raises(AssignmentError) as caught:
        Assignment.decode(entry)
    message = str(caught.value)
    assert fault in message
    assert ("task" not in entry) or f"assignment of task {TASK_ID} is unreadable" in message
    assert message.endswith("run the same version on both")


# ----------------------------------------------------------------------------------- orchestrators
def test_an_orchestrator_record_round_trips_and_an_unreadable_one_is_passed_over() -> None:
    sent = OrchestratorRecord(
        orchestrator_id="3f9a0c2e71b4",
        host="gpu-head-1",
        pid=4121,
        port=8000,
        started_at=1_772_442_847.5,
        version="1.2.3",
        settings={"MLOC_TASK_RETENTION_SEC": 600.0, "HEARTBEAT_TTL_SEC": 120.0},
        token="0123456789ab",
        refresh_sec=5.0,
        refreshed_at=1_772_442_852.5,
    )
    assert OrchestratorRecord.decode(sent.encode()) == sent
    assert (
        sent.named() == "orchestrator 3f9a0c2e71b4 on gpu-head-1 (pid 4121, port 8000, started 2026-03-02 09:14:07 UTC)"
    )
    # The fields a reader can do without: left out, they take their defaults.
    written = json.loads(sent.encode())
    for name in ("version", "token", "refresh_sec", "refreshed_at"):
        del written[name]
    assert OrchestratorRecord.decode(json.dumps(written)) == OrchestratorRecord(
        "3f9a0c2e71b4", "gpu-head-1", 4121, 8000, 1_772_442_847.5, "", sent.settings, "", 0.0, 0.0
    )
    for unreadable in ("{not json", "[1]", json.dumps({**written, "pid": "four"}), json.dumps({"host": "h"})):
        assert OrchestratorRecord.decode(unreadable) is None


def test_a_resumed_tasks_usage_adds_its_runs_figure_by_figure() -> None:
    from mloc.records import runs_usage

    assert runs_usage(None, '{"wall_sec": 2.5}') == {"wall_sec": 2.5}
    assert runs_usage("{}", None) is None
    before = '{"wall_sec": 10.0, "train_steps": 40, "train_samples": 160}'
    last = '{"wall_sec": 2.5, "train_steps": 60, "train_tokens": 900}'
    assert runs_usage(before, last) == {"wall_sec": 12.5, "train_steps": 100, "train_samples": 160, "train_tokens": 900}
    assert runs_usage(before, None) == {"wall_sec": 10.0, "train_steps": 40, "train_samples": 160}


def test_steps_a_later_run_trained_again_are_that_runs_in_the_metrics() -> None:
    from mloc.records import current_metrics

    # Run 1 logged steps 1-6 and saved at 4; run 2 continued from checkpoint-4; run 3 from checkpoint-6.
    first = [{"step": step, "loss": 10 - step, "run": 1} for step in range(1, 7)]
    second = [{"step": step, "loss": 5 - step / 10, "run": 2} for step in (5, 6, 7)]
    third = [{"step": 7, "loss": 0.5, "run": 3}, {"step": 7, "eval_loss": 0.6, "run": 3}]
    kept = current_metrics(first + second + third)
    assert [(row["step"], row["run"]) for row in kept] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
        (5, 2),
        (6, 2),
        (7, 3),
        (7, 3),
    ]
    # Entries written before runs were named count as the first run's.
    assert current_metrics([{"step": 1}, {"step": 2}]) == [{"step": 1}, {"step": 2}]
