"""Retries wait out an exponential backoff before they are placed again, with one orchestrator or several."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.requeue import BACKOFF_JITTER, Backoff, requeue
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason, TaskState
from mloc.store import Reservation, utc_day
from mloc.workers import WorkerRegistry
from tests.support.fleet import registration

ADMIN = Principal("admin", admin=True)


def orchestrator(r: aioredis.Redis, **env: Any) -> Orchestrator:
    return Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, **env))


async def start_on_worker(orch: Orchestrator, task_id: str) -> int:
    """What a worker does when it takes the task: the attempt starts."""
    worker = await orch.redis.hget(keys.task(task_id), "worker_id")
    started = await orch.store.transition(task_id, moves.START, expect_worker=worker, new_attempt=True)
    assert started.ok, started
    return started.attempt


def test_backoff_doubles_per_retry_is_capped_and_jittered_upwards_only() -> None:
    policy = Backoff(base_sec=2.0, max_sec=10.0)
    for retry, wanted in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (30, 10.0)]:
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(wanted <= d <= wanted * (1 + BACKOFF_JITTER) for d in delays), (retry, delays[:5])
        assert max(delays) > min(delays)  # jitter spreads tasks that failed together
    assert Backoff(base_sec=0, max_sec=10).delay(3) == 0.0


def test_a_retry_is_not_placed_before_its_backoff_and_says_when_it_will_be(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = orchestrator(r, MLOC_RETRY_BACKOFF_SEC=0.6, MLOC_RETRY_BACKOFF_MAX_SEC=100)
        await orch.registry.register(registration("w1"))
        answer = await orch.submit(validate({"taskType": "echo", "retries": 2}), ADMIN)
        task_id = answer["task_id"]
        assert answer["worker_id"] == "w1"
        gaps = []
        for retry in (1, 2):
            await start_on_worker(orch, task_id)
            back = await requeue(
                orch.store,
                task_id,
                worker_id="w1",
                reason_code=Reason.EXECUTOR_CRASHED,
                reason="its executor crashed",
                attempt=retry,
            )
            requeued_at = time.time()
            assert back.ok and back.state == TaskState.PENDING
            record = await orch.store.get(task_id)
            assert record.pending_reason is not None
            assert record.pending_reason.startswith(f"retry {retry} of 2 after its executor crashed; eligible in ")
            assert await r.zscore(keys.PENDING, task_id) is None  # not placeable yet
            assert await r.zscore(keys.RETRY_WAIT, task_id) is not None
            assert await orch.scheduler.schedule_pending() == 0
            # Even a placement that bypasses the queues is refused inside Redis.
            early = await orch.store.transition(task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))
            assert not early.ok and early.error == "backoff"
            assert orch.scheduler.queues.next_retry_at is not None
            while await orch.scheduler.schedule_pending() == 0:
                await asyncio.sleep(0.01)
            gaps.append(time.time() - requeued_at)
            assert await r.hget(keys.task(task_id), "state") == "assigned"
        # retry 1 waits 0.6 s, retry 2 waits 1.2 s (plus at most 10% jitter and the polling step).
        assert 0.6 <= gaps[0] < 0.6 * 1.1 + 0.15, gaps
        assert 1.2 <= gaps[1] < 1.2 * 1.1 + 0.15, gaps
        await start_on_worker(orch, task_id)
        last = await requeue(
            orch.store,
            task_id,
            worker_id="w1",
            reason_code=Reason.EXECUTOR_CRASHED,
            reason="its executor crashed",
            attempt=3,
        )
        assert last.state == TaskState.FAILED
        assert await r.zscore(keys.RETRY_WAIT, task_id) is None
        record = await orch.store.get(task_id)
        assert record.reason_code == "executor_crashed" and "3 of 3 attempts" in (record.reason or "")
        await r.aclose()

    asyncio.run(scenario())


def test_spec_backoff_overrides_the_setting_and_zero_retries_at_once(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = orchestrator(r, MLOC_RETRY_BACKOFF_SEC=300)
        await orch.registry.register(registration("w1"))
        now_task = (await orch.submit(validate({"taskType": "echo", "retry_backoff_sec": 0}), ADMIN))["task_id"]
        slow_task = (await orch.submit(validate({"taskType": "echo"}), ADMIN))["task_id"]
        for task_id in (now_task, slow_task):
            await start_on_worker(orch, task_id)
            await requeue(orch.store, task_id, worker_id="w1", reason_code=Reason.WORKER_LOST, reason="lost")
        assert await r.zscore(keys.PENDING, now_task) is not None
        slow_at = float(await r.hget(keys.task(slow_task), "retry_at"))
        assert 300 <= slow_at - time.time() <= 330
        assert await orch.scheduler.schedule_pending() == 1
        assert await r.hget(keys.task(now_task), "state") == "assigned"
        assert await r.hget(keys.task(slow_task), "state") == "pending"
        # Cancelling a task that waits out its backoff takes it out of the retry index.
        await cancel(orch.store, slow_task, by="admin")
        assert await r.zscore(keys.RETRY_WAIT, slow_task) is None
        await r.aclose()

    asyncio.run(scenario())


def test_a_task_handed_back_before_it_started_is_placeable_at_once(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = orchestrator(r, MLOC_RETRY_BACKOFF_SEC=300)
        await orch.registry.register(registration("w1"))
        task_id = (await orch.submit(validate({"taskType": "echo"}), ADMIN))["task_id"]
        back = await requeue(
            orch.store, task_id, worker_id="w1", reason_code=Reason.WORKER_SHUTDOWN, reason="worker w1 shut down"
        )
        assert back.ok and await r.zscore(keys.PENDING, task_id) is not None
        assert (await orch.store.get(task_id)).pending_reason == "requeued: waiting for the scheduler"
        assert await orch.scheduler.schedule_pending() == 1
        await r.aclose()

    asyncio.run(scenario())


def test_two_orchestrators_place_each_due_retry_once_and_never_early(redis_url: str) -> None:
    async def scenario() -> None:
        clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
        orchs = [orchestrator(c, MLOC_RETRY_BACKOFF_SEC=0.3, MLOC_RETRY_BACKOFF_MAX_SEC=100) for c in clients]
        await WorkerRegistry(clients[0]).register(registration("w1", slots=100))
        ids = [(await orchs[0].submit(validate({"taskType": "echo"}), ADMIN))["task_id"] for _ in range(40)]
        for task_id in ids:
            await start_on_worker(orchs[0], task_id)
        await clients[0].delete(keys.worker_stream("w1"))
        for task_id in ids:
            await requeue(orchs[0].store, task_id, worker_id="w1", reason_code=Reason.WORKER_LOST, reason="x")
        due = {task_id: float(await clients[0].hget(keys.task(task_id), "retry_at")) for task_id in ids}

        async def keep_scheduling(orch: Orchestrator) -> None:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                await orch.scheduler.schedule_pending()
                await asyncio.sleep(0.005)

        await asyncio.gather(*(keep_scheduling(o) for o in orchs))
        rows = await clients[0].xrange(keys.worker_stream("w1"))
        assert sorted(fields["task"] for _, fields in rows) == sorted(ids)  # each placed exactly once
        for task_id in ids:
            record = await clients[0].hgetall(keys.task(task_id))
            assert record["state"] == "assigned"
            assert float(record["assigned_at"]) >= due[task_id]
        assert await clients[0].zcard(keys.RETRY_WAIT) == 0 and await clients[0].zcard(keys.PENDING) == 0
        for c in clients:
            await c.aclose()

    asyncio.run(scenario())


def crash_events(r: redis.Redis, task_id: str) -> list[tuple[str, float]]:
    return [(fields["to"], float(fields["ts"])) for _, fields in r.xrange(keys.EVENTS) if fields["task"] == task_id]


def test_a_crashed_executor_is_retried_after_its_backoff_even_when_the_scheduler_is_idle(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], redis_url: str
) -> None:
    # A 30 s scheduling interval: the retry must be placed by the backoff timer, not by a regular pass.
    cluster = make_cluster(1, env={"MLOC_SCHEDULE_INTERVAL_SEC": "30"})
    client = client_for(cluster)
    answer = client.submit(
        b"taskType: echo\nretries: 2\nretry_backoff_sec: 1.0\nhyperparameters: {isolate: true, crash: true}\n"
    )
    task_id = answer["task_id"]
    seen_reason = None
    deadline = time.monotonic() + 60
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = client.task(task_id)
        if record["state"] == "pending" and record.get("pending_reason") and seen_reason is None:
            seen_reason = record["pending_reason"]
        if record["state"] == "failed":
            break
        time.sleep(0.02)
    assert record["state"] == "failed", record
    assert record["reason_code"] == "executor_crashed" and "SIGKILL" in record["reason"]
    assert "no retries left (3 of 3 attempts used)" in record["reason"]
    assert seen_reason is not None and seen_reason.startswith("retry 1 of 2 after the executor process died")
    assert "; eligible in " in seen_reason
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    events = crash_events(r, task_id)
    requeues = [ts for to, ts in events if to == "pending"]
    placements = [ts for to, ts in events if to == "assigned"]
    assert len(requeues) == 2 and len(placements) == 3, events
    waits = [placements[1] - requeues[0], placements[2] - requeues[1]]
    assert 1.0 <= waits[0] < 1.0 * 1.1 + 0.5, waits
    assert 2.0 <= waits[1] < 2.0 * 1.1 + 0.5, waits
    # The attempt that ended the task is accounted like any failure; the retried ones add the time
    # they used, but no task. Each is counted on the UTC day its end was recorded (its event's time),
    # and around midnight the three ends need not share a day.
    starts = [ts for to, ts in events if to == "running"]
    ends = [ts for to, ts in events if to in ("pending", "failed")]
    daily: dict[str, float] = {}
    for day in {utc_day(ts) for ts in ends}:
        for name, value in r.hgetall(keys.usage_day("admin", day)).items():
            daily[name] = daily.get(name, 0.0) + float(value)
    assert daily["tasks.echo.failed"] == 1 and daily["tasks"] == 1, daily
    windows = [end - start for start, end in zip(starts, ends, strict=True)]
    assert len(windows) == 3 and daily["wall_sec"] >= 0.9 * sum(windows) - 0.05, (daily, windows)
    assert cluster.worker_procs["local-1"].poll() is None
