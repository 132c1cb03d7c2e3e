"""mloc.requeue: which budget a hand-back spends, when a task is out of it, the backoff it waits, and
the one hand-back of everything a worker holds."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.requeue import Backoff, hand_back, requeue, verdict
from mloc.state import Reason, TaskState
from mloc.store import Reservation, TaskStore
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration


def decide(*, started: bool = True, code: Reason = Reason.WORKER_LOST, **counts: int):  # type: ignore[no-untyped-def]
    return verdict(
        started=started,
        reason_code=code,
        reason="worker w1 lost",
        attempts=counts.get("attempts", 1),
        max_attempts=counts.get("max_attempts", 1),
        requeues=counts.get("requeues", 0),
        max_requeues=counts.get("max_requeues", 20),
    )


# ---------------------------------------------------------------- the decision
def test_a_task_handed_back_before_it_started_spends_nothing() -> None:
    for code in (Reason.WORKER_SHUTDOWN, Reason.EXECUTOR_CRASHED):
        v = decide(started=False, code=code, attempts=9, requeues=99, max_requeues=1)
        assert (v.move, v.retry, v.exhausted, v.requeues) == (moves.REQUEUE, 0, False, None)
        assert v.pending_reason == "requeued: waiting for the scheduler"


def test_a_lost_worker_spends_a_requeue_never_an_attempt() -> None:
    # Attempts are long used up (5 starts of a task with 1 attempt): worker loss does not count them.
    v = decide(code=Reason.WORKER_LOST, attempts=5, max_attempts=1, requeues=4)
    assert (v.move, v.retry, v.exhausted, v.requeues) == (moves.REQUEUE, 5, False, 5)
    assert v.reason_code == Reason.WORKER_LOST
    assert "requeue 5 of 20 after worker loss" in v.reason and v.pending_reason.startswith("requeue 5 of 20")
    for code in (Reason.WORKER_SHUTDOWN, Reason.WORKER_RESTARTED):
        assert decide(code=code, attempts=5, max_attempts=1).requeues == 1


def test_past_the_requeue_cap_the_task_fails_with_its_own_reason() -> None:
    v = decide(attempts=21, requeues=20, max_requeues=20)
    assert (v.move, v.exhausted, v.reason_code) == (moves.GIVE_UP, True, Reason.REQUEUES_EXHAUSTED)
    assert "requeued 20 times after worker loss" in v.reason and "MLOC_MAX_REQUEUES (20)" in v.reason
    assert decide(max_requeues=0).move == moves.GIVE_UP


def test_an_executor_crash_spends_an_attempt_and_requeues_do_not_count_against_it() -> None:
    # 4 starts, 3 of them ended by a lost worker: this crash is the first of the task's own failures.
    first = decide(code=Reason.EXECUTOR_CRASHED, attempts=4, max_attempts=2, requeues=3)
    assert (first.move, first.retry, first.requeues) == (moves.REQUEUE, 1, None)
    assert "(1 of 2 attempts used)" in first.reason and first.pending_reason.startswith("retry 1 of 1 after")
    last = decide(code=Reason.EXECUTOR_CRASHED, attempts=5, max_attempts=2, requeues=3)
    assert (last.move, last.reason_code) == (moves.GIVE_UP, Reason.EXECUTOR_CRASHED)
    assert "no retries left (2 of 2 attempts used)" in last.reason


# ---------------------------------------------------------------- in Redis
async def placed_and_started(store: TaskStore, task_id: str) -> int:
    assert (await store.transition(task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))).ok
    started = await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
    assert started.ok
    return started.attempt


def test_a_task_outlives_more_lost_workers_than_its_attempts_until_the_cap(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        record = echo_record(store, max_attempts=1)
        await store.insert([record])
        task_id = record.task_id
        no_wait = Backoff(base_sec=0)
        progress = '{"step": 2, "total": 20}'
        for lost in (1, 2, 3):
            attempt = await placed_and_started(store, task_id)
            await r.hset(keys.task(task_id), "progress", progress)
            back = await requeue(
                store, task_id, worker_id="w1", reason_code=Reason.WORKER_LOST, reason="w1 lost", backoff=no_wait,
                max_requeues=3,
            )  # fmt: skip
            assert back.ok and back.state == TaskState.PENDING, back
            shown = await store.get(task_id)
            assert (shown.attempts, shown.requeues, shown.reason_code) == (attempt, lost, "worker_lost")
            # The lost attempt's progress is not the next one's, and its next wait counts from now.
            assert await r.hget(keys.task(task_id), "progress") is None
            assert shown.requeued_at is not None and shown.requeued_at >= shown.created_at
        await placed_and_started(store, task_id)
        await r.hset(keys.task(task_id), "progress", progress)
        out = await requeue(
            store, task_id, worker_id="w1", reason_code=Reason.WORKER_LOST, reason="w1 lost", max_requeues=3
        )
        assert out.state == TaskState.FAILED
        shown = await store.get(task_id)
        assert (shown.state, shown.reason_code, shown.requeues, shown.attempts) == (
            "failed",
            "requeues_exhausted",
            3,
            4,
        )
        assert shown.finished_at is not None and "requeued 3 times after worker loss" in (shown.reason or "")
        assert await r.hget(keys.task(task_id), "progress") == progress  # where the last attempt got to
        assert await r.hget(keys.worker("w1"), "slots_free") == "4"
        assert await r.zscore(keys.PENDING, task_id) is None and await r.zscore(keys.RETRY_WAIT, task_id) is None
        await r.aclose()

    asyncio.run(scenario())


def test_a_crash_after_lost_workers_still_has_its_attempts(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        record = echo_record(store, max_attempts=2)
        await store.insert([record])
        task_id, no_wait = record.task_id, Backoff(base_sec=0)
        for code in (Reason.WORKER_LOST, Reason.WORKER_LOST, Reason.EXECUTOR_CRASHED):
            attempt = await placed_and_started(store, task_id)
            back = await requeue(
                store, task_id, worker_id="w1", reason_code=code, reason=str(code), attempt=attempt, backoff=no_wait
            )
            assert back.state == TaskState.PENDING
        await placed_and_started(store, task_id)
        out = await requeue(
            store, task_id, worker_id="w1", reason_code=Reason.EXECUTOR_CRASHED, reason="died", attempt=4
        )
        assert out.state == TaskState.FAILED
        shown = await store.get(task_id)
        assert shown.reason_code == "executor_crashed" and "no retries left (2 of 2 attempts used)" in (
            shown.reason or ""
        )
        await r.aclose()

    asyncio.run(scenario())


def test_the_wait_grows_with_the_budget_the_requeue_spends(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        record = echo_record(store, max_attempts=5)
        await store.insert([record])
        task_id, policy = record.task_id, Backoff(base_sec=10, max_sec=1000)
        waits = []
        for code in (Reason.WORKER_LOST, Reason.WORKER_LOST, Reason.EXECUTOR_CRASHED):
            await placed_and_started(store, task_id)
            before = time.time()
            await requeue(store, task_id, worker_id="w1", reason_code=code, reason="x", backoff=policy)
            waits.append(float(await r.hget(keys.task(task_id), "retry_at")) - before)
            await r.hset(keys.task(task_id), "retry_at", "0")  # due now, so the next placement goes through
            await r.zrem(keys.RETRY_WAIT, task_id)
        # Requeues 1 and 2 wait 10 s and 20 s; the crash is the task's first failure: 10 s again.
        for wait, wanted in zip(waits, (10, 20, 10), strict=True):
            assert wanted <= wait <= wanted * 1.1 + 0.5, waits
        await r.aclose()

    asyncio.run(scenario())


def test_hand_back_requeues_what_a_worker_holds_but_keeps_what_it_runs(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        records = [echo_record(store) for _ in range(3)]
        await store.insert(records)
        running, assigned, gone = (rec.task_id for rec in records)
        await placed_and_started(store, running)
        for task_id in (assigned, gone):
            await store.transition(task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))
        await store.transition(gone, moves.CANCEL, release=True)
        await r.sadd(keys.worker_tasks("w1"), gone)  # a stale entry: the worker no longer holds it
        handed = await hand_back(
            store, "w1", reason_code=Reason.WORKER_SHUTDOWN, reason="worker w1 shut down", keep={running}
        )
        assert (handed.requeued, handed.failed, handed.dropped) == ([assigned], [], [gone])
        # The operator's log says so too, as each task's own log does.
        said = [r.getMessage() for r in caplog.records if r.name == "mloc.requeue"]
        assert said == [f"worker w1: 1 task(s) requeued (worker w1 shut down): {assigned}"], said
        assert await r.hget(keys.task(assigned), "state") == "pending"
        assert await r.hget(keys.task(running), "state") == "running"
        assert await r.smembers(keys.worker_tasks("w1")) == {running}
        assert not await r.exists(keys.worker_stream("w1"))
        await r.aclose()

    with caplog.at_level(logging.INFO, logger="mloc.requeue"):
        asyncio.run(scenario())


def test_a_task_being_cancelled_is_cancelled_when_its_worker_goes_not_requeued(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        record = echo_record(store)
        await store.insert([record])
        await placed_and_started(store, record.task_id)
        assert (await store.transition(record.task_id, moves.REQUEST_CANCEL, fields={"cancel_requested": "1"})).ok
        # A second worker could not take it back: it is no longer running.
        assert not (await store.transition(record.task_id, moves.REQUEUE, release=True)).ok
        handed = await hand_back(store, "w1", reason_code=Reason.WORKER_LOST, reason="worker w1 lost")
        assert (handed.requeued, handed.failed, handed.cancelled) == ([], [], [record.task_id])
        state, code, reason, finished = await r.hmget(
            keys.task(record.task_id), "state", "reason_code", "reason", "finished_at"
        )
        assert (state, code) == ("cancelled", "cancelled_by_user") and finished
        assert reason == "worker w1 lost; it was being cancelled, so it is cancelled"
        assert not await r.smembers(keys.worker_tasks("w1"))
        await r.aclose()

    asyncio.run(scenario())


def test_a_task_being_cancelled_counts_its_run_as_cancelled_whatever_its_worker_called_it(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        await WorkerRegistry(r).register(registration("w1"))
        record = echo_record(store)
        await store.insert([record])
        await placed_and_started(store, record.task_id)
        assert (await store.transition(record.task_id, moves.REQUEST_CANCEL, fields={"cancel_requested": "1"})).ok
        # A stopping worker hands its task back with what the run used, labelled as a failed run.
        run = {"tasks": 1.0, "tasks.echo": 1.0, "tasks.echo.failed": 1.0, "state.failed": 1.0, "wall_sec": 2.0}
        ended = await requeue(
            store,
            record.task_id,
            worker_id="w1",
            reason_code=Reason.WORKER_SHUTDOWN,
            reason="worker w1 stopped while the task ran",
            final_usage=run,
            owner=record.owner,
        )
        assert ended.ok and ended.state == TaskState.CANCELLED
        days = await r.zrange(keys.usage_days(record.owner), 0, -1)
        counted = await r.hgetall(keys.usage_day(record.owner, days[-1]))
        assert float(counted["tasks.echo.cancelled"]) == 1 and float(counted["state.cancelled"]) == 1, counted
        assert "tasks.echo.failed" not in counted and "state.failed" not in counted
        assert float(counted["tasks"]) == 1 and float(counted["wall_sec"]) == 2
        await r.aclose()

    asyncio.run(scenario())
