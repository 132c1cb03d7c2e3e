"""Pending demand by worker shape, for autoscalers: read from real Redis and through a real cluster's /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mloc import keys, moves
from mloc.api import metrics
from mloc.localcluster import LocalCluster
from mloc.orchestrator import demand
from mloc.orchestrator.demand import Demand, Shape, read_demand
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.requeue import requeue
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason, TaskState
from tests.support.api import wait_for
from tests.support.fleet import registration

ADMIN = Principal("admin", admin=True)
TOKEN = "demand-admin-token"
A100 = "NVIDIA A100-SXM4-80GB"
YAML = {"Content-Type": "text/yaml"}


def echo(gpu_type: str | None = None, gpus: int = 0, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"taskType": "echo", **spec}
    if gpus:
        body["resources"] = {"hardware": {"gpu": {"type": gpu_type or "any", "count": gpus}}}
    return body


def named(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mloc/v1", "kind": "EchoTask", "metadata": {"name": name}, "spec": spec}


def run(scenario: Callable[[Orchestrator, aioredis.Redis], Any], redis_url: str) -> Any:
    async def main() -> Any:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_RETRY_BACKOFF_SEC=600))
            return await scenario(orch, r)
        finally:
            await r.aclose()

    return asyncio.run(main())


async def submit(orch: Orchestrator, body: dict[str, Any]) -> str:
    return str((await orch.submit(validate(body), ADMIN))["task_id"])


async def a_retry_in_backoff(orch: Orchestrator, r: aioredis.Redis) -> str:
    """A task placed on worker w1, started there, and handed back after its executor crashed."""
    task_id = await submit(orch, echo(retries=1))
    started = await orch.store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
    assert started.ok, started
    back = await requeue(
        orch.store, task_id, worker_id="w1", reason_code=Reason.EXECUTOR_CRASHED, reason="it crashed", attempt=1
    )
    assert back.ok and back.state == TaskState.PENDING
    assert await r.zscore(keys.RETRY_WAIT, task_id) is not None
    return task_id


def test_demand_counts_queued_tasks_and_retries_by_shape_but_not_tasks_waiting_for_dependencies(
    redis_url: str,
) -> None:
    async def scenario(orch: Orchestrator, r: aioredis.Redis) -> Demand:
        # w1 has no GPU: every GPU task waits, the CPU tasks are placed on it.
        await orch.registry.register(registration("w1"))
        await a_retry_in_backoff(orch, r)
        placed = await submit(orch, echo())
        assert (await orch.store.get(placed)).state == TaskState.ASSIGNED
        for gpu_type in ("A100", "a100", " NVIDIA  A100 "):
            await submit(orch, echo(gpu_type, 1))
        for _ in range(2):
            await submit(orch, echo("a100", 2))
        await submit(orch, echo("any", 1, topic="tasks.batch"))
        # The second step of a pipeline waits for the first, out of the queues: no worker could take it yet.
        steps = [named("prepare", echo("H100", 1)), named("train", echo("L4", 1, dependsOn=["prepare"]))]
        graph = await orch.submit_graph([validate(step) for step in steps], ADMIN)
        assert graph["tasks"][1]["depends_on"]
        return await read_demand(r, limit=1000, batch=2)

    found = run(scenario, redis_url)
    assert dict(found.tasks) == {
        Shape("none", 0, "echo", "tasks.echo"): 1,  # the retry waiting out its backoff
        Shape("a100", 1, "echo", "tasks.echo"): 2,
        Shape("nvidia a100", 1, "echo", "tasks.echo"): 1,
        Shape("a100", 2, "echo", "tasks.echo"): 2,
        Shape("any", 1, "echo", "tasks.batch"): 1,
        Shape("h100", 1, "echo", "tasks.echo"): 1,
    }
    assert found.gpus() == {
        ("a100", "echo", "tasks.echo"): 6,
        ("nvidia a100", "echo", "tasks.echo"): 1,
        ("any", "echo", "tasks.batch"): 1,
        ("h100", "echo", "tasks.echo"): 1,
    }
    assert not found.truncated


def test_a_capped_read_counts_the_head_of_the_queue_and_says_it_was_capped(redis_url: str) -> None:
    async def scenario(orch: Orchestrator, r: aioredis.Redis) -> list[Demand]:
        await orch.registry.register(registration("w1"))
        await a_retry_in_backoff(orch, r)
        for _ in range(4):
            await submit(orch, echo("h100", 1))
        # Everything fits the limit, the retry included; one fewer and the retry (read last) is left out.
        return [await read_demand(r, limit=limit, batch=2) for limit in (5, 4, 3, 0)]

    whole, no_retry, three, nothing = run(scenario, redis_url)
    h100 = Shape("h100", 1, "echo", "tasks.echo")
    assert dict(whole.tasks) == {h100: 4, Shape("none", 0, "echo", "tasks.echo"): 1} and not whole.truncated
    assert dict(no_retry.tasks) == {h100: 4} and no_retry.truncated
    assert dict(three.tasks) == {h100: 3} and three.truncated
    assert dict(nothing.tasks) == {} and nothing.truncated


def test_stale_entries_and_unreadable_requests_are_skipped(redis_url: str) -> None:
    async def scenario(orch: Orchestrator, r: aioredis.Redis) -> Demand:
        await orch.registry.register(registration("w1"))
        kept = await submit(orch, echo("h100", 1))
        garbled = await submit(orch, echo("h100", 1))
        # What an older or damaged record could hold, and a queue entry whose record was forgotten
        # (the scheduler drops such entries only when it next reads that queue).
        await r.hset(keys.task(garbled), "req", "{not json")
        await r.zadd(keys.PENDING, {"forgotten": 1})
        demand = await read_demand(r, limit=100)
        assert await r.hget(keys.task(kept), "state") == TaskState.PENDING
        return demand

    found = run(scenario, redis_url)
    assert dict(found.tasks) == {Shape("h100", 1, "echo", "tasks.echo"): 1}
    assert not found.truncated


def test_shapes_past_the_cap_are_not_exported_one_by_one(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demand, "MAX_SHAPES", 2)

    async def scenario(orch: Orchestrator, r: aioredis.Redis) -> Demand:
        await orch.registry.register(registration("w1"))
        for gpu_type in ("a100", "h100", "a100", "l4", "h100"):
            await submit(orch, echo(gpu_type, 1))
        return await read_demand(r, limit=100)

    found = run(scenario, redis_url)
    assert dict(found.tasks) == {Shape("a100", 1, "echo", "tasks.echo"): 2, Shape("h100", 1, "echo", "tasks.echo"): 2}
    assert found.truncated


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def demand_of(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[tuple[str, ...], float]:
    """One demand family's samples, keyed by their label values in SERIES order."""
    order = metrics.SERIES[name]
    return {tuple(dict(labels)[k] for k in order): v for (sample, labels), v in samples.items() if sample == name}


def post(http: httpx.Client, path: str, docs: list[dict[str, Any]]) -> Any:
    response = http.post(path, content=yaml.safe_dump_all(docs).encode(), headers=YAML)
    assert response.status_code == 201, response.text
    return response.json()


def test_metrics_export_pending_demand_and_busy_workers_from_a_real_cluster(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # One worker with one A100; retries wait ten minutes, so the crashed task stays in its backoff.
    cluster = make_cluster(
        1,
        env={"ORCHESTRATOR_TOKEN": TOKEN, "MLOC_RETRY_BACKOFF_SEC": "600"},
        worker_env=[{"MLOC_WORKER_GPUS": f"{A100}:1:81920"}],
    )
    slow = {"sleep_sec": 60, "steps": 60}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=cluster.api_url, headers=auth, timeout=10) as http:
        running = post(http, "/api/v1/tasks", [echo("a100", 1, hyperparameters=slow)])["task_id"]
        wait_for(http, running, {"running"})
        queued = [post(http, "/api/v1/tasks", [echo("A100", 1, hyperparameters=slow)])["task_id"] for _ in range(2)]
        crashed = post(http, "/api/v1/tasks", [echo(retries=1, hyperparameters={"isolate": True, "crash": True})])
        steps = [
            named("prepare", echo("h100", 2, topic="tasks.big")),
            named("train", echo("l4", 1, dependsOn=["prepare"])),
        ]
        post(http, "/api/v1/tasks/bulk", steps)
        retry = wait_for(http, crashed["task_id"], {"pending"}, timeout=60)
        assert retry["attempts"] == 1 and retry["pending_reason"].startswith("retry 1 of 1"), retry

        samples = samples_of(httpx.get(cluster.api_url + "/metrics", timeout=10).text)
        assert demand_of(samples, metrics.PENDING_DEMAND_TASKS) == {
            ("a100", "1", "echo", "tasks.echo"): 2,
            ("h100", "2", "echo", "tasks.big"): 1,
            ("none", "0", "echo", "tasks.echo"): 1,  # the retry in its backoff
        }
        assert demand_of(samples, metrics.PENDING_DEMAND_GPUS) == {
            ("a100", "echo", "tasks.echo"): 2,
            ("h100", "echo", "tasks.big"): 2,
        }
        assert samples[(metrics.PENDING_DEMAND_TRUNCATED, ())] == 0
        assert samples[(metrics.BUSY_WORKERS, (("model", A100),))] == 1
        # The API agrees: five tasks pending, one of them waiting for another task; three in the queue.
        pending = http.get("/api/v1/tasks", params={"state": "pending", "page_size": 1}).json()["total"]
        assert pending == 5 == sum(demand_of(samples, metrics.PENDING_DEMAND_TASKS).values()) + 1
        assert samples[("mloc_queue_depth", ())] == 3

        # The running task is cancelled: one queued task takes its A100, and the demand follows.
        assert http.post(f"/api/v1/tasks/{running}/cancel").status_code == 200
        wait_for(http, queued[0], {"running"})
        later = samples_of(httpx.get(cluster.api_url + "/metrics", timeout=10).text)
        assert demand_of(later, metrics.PENDING_DEMAND_TASKS)[("a100", "1", "echo", "tasks.echo")] == 1
        assert later[(metrics.BUSY_WORKERS, (("model", A100),))] == 1
        for task_id in queued:
            http.post(f"/api/v1/tasks/{task_id}/cancel")


def test_every_exported_family_is_listed_in_series_with_its_labels(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    # A task that can never be placed, so the demand families have a sample whose labels can be checked.
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        post(http, "/api/v1/tasks", [echo("h100", 1)])
        text = http.get("/metrics").text
    # The classic text format shows a histogram's creation time as a family of its own (<name>_created).
    families = [f for f in text_string_to_metric_families(text) if not f.name.endswith("_created")]
    assert {family.name for family in families} == set(metrics.SERIES)
    for family in families:
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(metrics.SERIES[family.name]), (family.name, sample.labels)
    assert any(family.name == metrics.PENDING_DEMAND_TASKS and family.samples for family in families)


def test_a_pool_scaled_from_zero_sees_its_demand_then_its_busy_worker_and_a_drained_worker_gives_the_task_back(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # What an autoscaler's query adds up for an A100 pool: its busy workers plus the A100 work waiting.
    def pool_query(cluster: LocalCluster) -> tuple[float, float]:
        samples = samples_of(httpx.get(cluster.api_url + "/metrics", timeout=10).text)
        busy = samples.get((metrics.BUSY_WORKERS, (("model", A100),)), 0.0)
        waiting = demand_of(samples, metrics.PENDING_DEMAND_TASKS).get(("a100", "1", "echo", "tasks.echo"), 0.0)
        return busy, waiting

    cluster = make_cluster(1, env={"ORCHESTRATOR_TOKEN": TOKEN})  # a CPU worker only: the A100 pool is at zero
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        task_id = post(http, "/api/v1/tasks", [echo("a100", 1, hyperparameters={"sleep_sec": 60, "steps": 60})])[
            "task_id"
        ]
        assert wait_for(http, task_id, {"pending"})["unschedulable"] is True
        assert pool_query(cluster) == (0, 1)

        # The autoscaler starts a pod: the task runs there, and the pod counts as busy.
        cluster.add_worker("a100-1", {"MLOC_WORKER_GPUS": f"{A100}:1:81920"})
        assert wait_for(http, task_id, {"running"}, timeout=60)["worker_id"] == "a100-1"
        assert pool_query(cluster) == (1, 0)

        # Scaled in (SIGTERM) with the task still running: the worker drains, hands it back, and the
        # task is demand again (queued or in its backoff), so the pool is asked for a pod again.
        cluster.stop_worker("a100-1")
        record = wait_for(http, task_id, {"pending"}, timeout=30)
        assert record["reason_code"] == "worker_shutdown", record
        assert pool_query(cluster) == (0, 1)
        assert http.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
        wait_for(http, task_id, {"cancelled"})
        assert pool_query(cluster) == (0, 0)  # nothing busy, nothing waiting: the pool may go to zero


def test_a_task_its_owners_quota_holds_is_not_demand_and_one_lacking_a_worker_is(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Two L4s on the one worker: bob may hold one task at a time; alice's two-L4 task waits for room.
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_GPUS": "NVIDIA L4:2:23034"}], topics="tasks.gpu")
    slow = {"sleep_sec": 30, "steps": 30}

    def l4(owner: str, count: int) -> dict[str, Any]:
        return {**echo("L4", count, topic="tasks.gpu", hyperparameters=slow), "metadata": {"owner": owner}}

    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        assert http.post("/admin/users", json={"name": "bob", "max_tasks": 1}).status_code == 201
        running = http.post("/api/v1/tasks", json=l4("bob", 1)).json()["task_id"]
        wait_for(http, running, {"running"})
        held = http.post("/api/v1/tasks", json=l4("bob", 1)).json()
        assert held["pending_reason"].startswith("user bob at quota: 1 of 1 concurrent tasks; "), held
        lacking = http.post("/api/v1/tasks", json=l4("alice", 2)).json()
        assert lacking["worker_id"] is None and not lacking["unschedulable"], lacking

        samples = samples_of(http.get("/metrics").text)
        assert demand_of(samples, metrics.PENDING_DEMAND_TASKS) == {("l4", "2", "echo", "tasks.gpu"): 1}
        assert demand_of(samples, metrics.PENDING_DEMAND_GPUS) == {("l4", "echo", "tasks.gpu"): 2}
        assert samples[(metrics.PENDING_HELD, ())] == 1  # counted apart, for a person to see
        assert http.get(f"/api/v1/tasks/{held['task_id']}").json()["pending_code"] == "quota"
        assert http.get(f"/api/v1/tasks/{lacking['task_id']}").json()["pending_code"] is None
        for task_id in (running, held["task_id"], lacking["task_id"]):
            http.post(f"/api/v1/tasks/{task_id}/cancel")


def test_tasks_held_by_quota_or_budget_are_counted_apart(redis_url: str) -> None:
    async def scenario(orch: Orchestrator, r: aioredis.Redis) -> None:
        await orch.registry.register(registration("w1", slots=8, gpus=2))
        await r.hset(keys.user_quota("bob"), mapping={"tasks": "1"})
        first = await submit(orch, {**echo("L4", 1), "metadata": {"owner": "bob"}})
        assert await r.hget(keys.task(first), "state") == "assigned"
        await submit(orch, {**echo("L4", 1), "metadata": {"owner": "bob"}})  # held by bob's quota
        await orch.scheduler.schedule_pending()
        found = await read_demand(r, limit=100)
        assert found.tasks == {} and found.held == 1
        # Placed once the quota allows: the code goes with the reason, and the task is demand no more.
        await r.hset(keys.user_quota("bob"), mapping={"tasks": "0"})
        await orch.scheduler.schedule_pending()
        found = await read_demand(r, limit=100)
        assert found.tasks == {} and found.held == 0

    run(scenario, redis_url)
