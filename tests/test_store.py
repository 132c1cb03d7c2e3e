"""Task state in Redis: compare-and-set transitions, fencing and capacity that is never oversubscribed."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.errors import InvalidTransition
from mloc.state import ALLOWED, TaskState
from mloc.store import Reservation, TaskStore, require
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration


async def new_task(store: TaskStore, owner: str = "alice") -> str:
    record = echo_record(store, owner, max_attempts=2)
    await store.insert([record])
    return record.task_id


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_transition_table_has_no_way_out_of_a_terminal_state() -> None:
    for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
        assert ALLOWED[state] == frozenset()


def test_a_task_completes_once_even_if_delivered_twice(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store, reg = TaskStore(r), WorkerRegistry(r)
        await reg.register(registration("w1"))
        task = await new_task(store)
        placed = await store.transition(task, moves.PLACE, reserve=Reservation("w1", 1000, 0, [], "{}"))
        assert placed.ok
        first = await store.transition(task, moves.START, expect_worker="w1", new_attempt=True)
        second = await store.transition(task, moves.START, expect_worker="w1", new_attempt=True)
        assert first.ok and first.attempt == 1
        assert not second.ok and second.error == "state" and second.detail == "running"
        done = await store.transition(
            task,
            moves.SUCCEED,
            expect_worker="w1",
            expect_attempt=1,
            release=True,
            result={"ok": True},
            usage={"tasks": 1},
            owner="alice",
        )
        again = await store.transition(
            task,
            moves.SUCCEED,
            expect_worker="w1",
            expect_attempt=1,
            release=True,
            result={"ok": True},
            usage={"tasks": 1},
            owner="alice",
        )
        assert done.ok and not again.ok
        assert await r.hget(keys.worker("w1"), "cpu_free") == "4000"
        day = [k async for k in r.scan_iter(keys.usage_day("alice", "*"))]
        assert await r.hget(day[0], "tasks") == "1"
        with pytest.raises(InvalidTransition, match="is succeeded"):
            require(again, task, TaskState.SUCCEEDED)
        await r.aclose()

    run(scenario())


def test_a_stale_worker_cannot_finish_a_requeued_task(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store, reg = TaskStore(r), WorkerRegistry(r)
        for w in ("w1", "w2"):
            await reg.register(registration(w))
        task = await new_task(store)
        await store.transition(task, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))
        await store.transition(task, moves.START, expect_worker="w1", new_attempt=True)
        requeued = await store.transition(
            task, moves.REQUEUE, expect_worker="w1", release=True, fields={"worker_id": ""}
        )
        assert requeued.ok
        await store.transition(task, moves.PLACE, reserve=Reservation("w2", 0, 0, [], "{}"))
        await store.transition(task, moves.START, expect_worker="w2", new_attempt=True)
        stale = await store.transition(task, moves.SUCCEED, expect_worker="w1", expect_attempt=1)
        assert not stale.ok and stale.error == "fenced"
        fresh = await store.transition(task, moves.SUCCEED, expect_worker="w2", expect_attempt=2, release=True)
        assert fresh.ok
        await r.aclose()

    run(scenario())


def test_concurrent_reservations_never_oversubscribe_gpus(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store, reg = TaskStore(r), WorkerRegistry(r)
        await reg.register(registration("w1", gpus=2, slots=100))
        tasks = [await new_task(store) for _ in range(20)]
        # Every task asks for GPU 0 or 1 at once; only two reservations may win.
        outcomes = await asyncio.gather(
            *(
                store.transition(t, moves.PLACE, reserve=Reservation("w1", 0, 0, [i % 2], json.dumps({})))
                for i, t in enumerate(tasks)
            )
        )
        assert sum(o.ok for o in outcomes) == 2
        assert {o.detail for o in outcomes if not o.ok} == {"gpu 0", "gpu 1"}
        assert await r.scard(keys.worker_free_gpus("w1")) == 0
        assert await r.xlen(keys.worker_stream("w1")) == 2
        await r.aclose()

    run(scenario())


def test_listing_pages_and_filters(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        ids = [await new_task(store, owner="alice" if i % 2 else "bob") for i in range(7)]
        await store.transition(ids[0], moves.CANCEL)
        items, total = await store.page(page=1, page_size=3)
        assert total == 7 and len(items) == 3
        items, total = await store.page(page=2, page_size=3, owner="alice")
        assert total == 3 and len(items) == 0
        items, total = await store.page(page=1, page_size=10, state=TaskState.CANCELLED)
        assert [i.task_id for i in items] == [ids[0]]
        items, total = await store.page(page=1, page_size=10, state=TaskState.PENDING, owner="bob")
        assert total == 3 and all(i.owner == "bob" for i in items)
        await r.aclose()

    run(scenario())
