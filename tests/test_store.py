"""Task state in Redis: compare-and-set transitions, fencing and capacity that is never oversubscribed."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.errors import InvalidTransition
from mloc.state import ALLOWED, TaskState
from mloc.store import BATCH_SIZE, Apply, Change, Coalescer, Reservation, TaskStore, require
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration


async def new_task(store: TaskStore, owner: str = "alice") -> str:
    record = echo_record(store, owner, max_attempts=2)
    await store.insert([record])
    return record.task_id


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_transition_table_leaves_a_terminal_state_only_for_a_resume() -> None:
    assert ALLOWED[TaskState.SUCCEEDED] == frozenset()
    for state in (TaskState.FAILED, TaskState.CANCELLED):
        assert ALLOWED[state] == {TaskState.RUNNING, TaskState.PENDING}
        assert [move.name for move in moves.ALL if state in move.sources] == ["group_resume", "resume", "rewait"]


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
        items, total, _ = await store.page(page=1, page_size=3)
        assert total == 7 and len(items) == 3
        items, total, _ = await store.page(page=2, page_size=3, owner="alice")
        assert total == 3 and len(items) == 0
        items, total, _ = await store.page(page=1, page_size=10, state=TaskState.CANCELLED)
        assert [i.task_id for i in items] == [ids[0]]
        items, total, _ = await store.page(page=1, page_size=10, state=TaskState.PENDING, owner="bob")
        assert total == 3 and all(i.owner == "bob" for i in items)
        await r.aclose()

    run(scenario())


def test_walking_with_cursors_lists_each_task_once_while_tasks_come_and_go(redis_url: str) -> None:
    async def walk(store: TaskStore, **filters: object) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            items, _, after = await store.page(page=1, page_size=3, after=after, **filters)  # type: ignore[arg-type]
            seen += [i.task_id for i in items]
            if after is None:
                return seen
            # Between pages: a new task arrives (newer than every page), and one just read leaves pending.
            await new_task(store, owner="alice")
            await store.transition(items[0].task_id, moves.CANCEL)

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        ids = [await new_task(store, owner="alice" if i % 2 else "bob") for i in range(10)]
        # Newest first, each once, none skipped: offsets would repeat or skip one at each page break.
        assert await walk(store) == ids[::-1]

        async def now(**filters: object) -> list[str]:
            items, _, _ = await store.page(page=1, page_size=500, **filters)  # type: ignore[arg-type]
            return [i.task_id for i in items]

        for filters in ({"state": TaskState.PENDING}, {"task_type": "echo", "owner": "alice"}):
            before = await now(**filters)
            assert await walk(store, **filters) == before, filters

        # A task and its parts share their place (score): the walk splits them by id across pages.
        family = await new_task(store, owner="carol")
        parts = []
        for index in range(5):
            record = echo_record(store, "carol", max_attempts=1)
            record.parent_id, record.replica = family, index
            record.order_ms = int(await r.hget(keys.task(family), "created_ms"))  # its parent's place, as a chunk's
            await store.insert([record])
            parts.append(record.task_id)
        listed: list[str] = []
        after = None
        while True:
            items, total, after = await store.page(page=1, page_size=2, owner="carol", children=True, after=after)
            listed += [i.task_id for i in items]
            if after is None:
                break
        assert sorted(listed) == sorted([family, *parts]) and total == 6
        await r.aclose()

    run(scenario())


def test_a_bulk_larger_than_a_script_call_is_stored_whole_in_the_order_given(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        existing = echo_record(store, "alice")
        existing.name = "first"
        await store.insert([existing])
        records = [echo_record(store, owner) for owner in ("alice", "bob") * (BATCH_SIZE + 7)]
        records[BATCH_SIZE + 1].parent_id, records[BATCH_SIZE + 1].replica = existing.task_id, 0
        # The same id again, in the second script call: the stored task is left as it was.
        again = echo_record(store, "alice")
        again.task_id, again.name = existing.task_id, "second"
        records.insert(BATCH_SIZE + 3, again)
        await store.insert(records)

        assert await r.hget(keys.task(existing.task_id), "name") == "first"
        new = [rec.task_id for rec in records if rec is not again]
        assert await r.zcard(keys.TASKS_ALL) == len(new) + 1
        for owner in ("alice", "bob"):
            mine = [rec.task_id for rec in records if rec.owner == owner and rec is not again]
            first = [existing.task_id] if owner == "alice" else []
            # Each owner's queue holds its tasks in the order the bulk gave them, across script calls.
            assert await r.zrange(keys.pending_of(owner), 0, -1) == first + mine
        assert await r.zrange(keys.PENDING, 0, -1) == [existing.task_id, *new]
        assert await r.zrange(keys.tasks_in_state(TaskState.PENDING), 0, -1) == [existing.task_id, *new]
        assert await r.zrange(keys.TASKS_CHILDREN, 0, -1) == [records[BATCH_SIZE + 1].task_id]
        pipe = r.pipeline(transaction=False)
        for task_id in new:
            pipe.hget(keys.task(task_id), "created_ms")
        orders = [int(order) for order in await pipe.execute()]
        assert orders == sorted(orders) and len(set(orders)) == len(orders)
        await r.aclose()

    run(scenario())


def test_listing_leaves_out_the_parts_of_a_task_unless_asked(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        whole = [await new_task(store, owner=owner) for owner in ("alice", "bob", "alice")]
        parts = []
        for index in range(5):
            record = echo_record(store, "alice", max_attempts=1)
            record.parent_id, record.replica = whole[0], index
            await store.insert([record])
            parts.append(record.task_id)
        await store.transition(parts[0], moves.CANCEL)
        await store.transition(whole[1], moves.CANCEL)
        later = await new_task(store, owner="alice")  # newest: listed first

        items, total, _ = await store.page(page=1, page_size=2)
        assert total == 4 and [i.task_id for i in items] == [later, whole[2]]
        items, total, _ = await store.page(page=2, page_size=2)
        assert total == 4 and [i.task_id for i in items] == [whole[1], whole[0]]
        items, total, _ = await store.page(page=1, page_size=10, owner="alice")
        assert total == 3 and [i.task_id for i in items] == [later, whole[2], whole[0]]
        items, total, _ = await store.page(page=1, page_size=10, state=TaskState.CANCELLED)
        assert total == 1 and [i.task_id for i in items] == [whole[1]]
        items, total, _ = await store.page(page=1, page_size=10, state=TaskState.PENDING, owner="alice")
        assert total == 3
        items, total, _ = await store.page(page=1, page_size=10, task_type="echo")
        assert total == 4

        items, total, _ = await store.page(page=1, page_size=20, children=True)
        assert total == 9 and {i.task_id for i in items} == {*whole, *parts, later}
        items, total, _ = await store.page(page=1, page_size=10, state=TaskState.CANCELLED, children=True)
        assert {i.task_id for i in items} == {parts[0], whole[1]}
        items, total, _ = await store.page(page=1, page_size=10, owner="alice", children=True, task_type="echo")
        assert total == 8
        await r.aclose()

    run(scenario())


async def _evalsha_calls(r: aioredis.Redis) -> int:
    # Script calls that ran (a first call of a script is refused as unknown, then sent again).
    stats = (await r.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0)) - int(stats.get("rejected_calls", 0))


def test_many_moves_in_one_call_each_as_apply_would_make_it(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store, reg = TaskStore(r), WorkerRegistry(r)
        await reg.register(registration("w1"))  # 4 slots
        tasks = [await new_task(store) for _ in range(6)]
        new = echo_record(store, "bob", max_attempts=2)  # created and placed in the same call
        place = [Apply(task, Change(moves.PLACE, reserve=Reservation("w1", 100, 0, [], "{}"))) for task in tasks[:5]]
        before = await _evalsha_calls(r)
        outcomes = await store.apply_many(
            [
                *place,
                Apply(new.task_id, Change(moves.PLACE, reserve=Reservation("w1", 100, 0, [], "{}")), create=new),
                Apply("no-such-task", Change(moves.START, expect_worker="w1")),
            ]
        )
        # One call per kind of item (moves, and creates with their move), in the order given back.
        assert await _evalsha_calls(r) - before == 2
        assert [o.ok for o in outcomes] == [True, True, True, True, False, False, False]
        assert [o.error for o in outcomes[4:]] == ["capacity", "capacity", "missing"]
        assert (await store.get(new.task_id)).state == TaskState.PENDING  # stored, waiting for room
        assert (await r.hget(keys.worker("w1"), "slots_free")) == "0"
        # A move the table forbids is refused before anything is sent, the allowed ones with it too.
        forbidden = moves.Move("succeed_unstarted", TaskState.SUCCEEDED, frozenset({TaskState.PENDING}))
        with pytest.raises(InvalidTransition, match="pending -> succeeded"):
            await store.apply_many([Apply(tasks[4], Change(moves.CANCEL)), Apply(tasks[5], Change(forbidden))])
        assert [(await store.get(task)).state for task in tasks[4:]] == [TaskState.PENDING, TaskState.PENDING]

    run(scenario())


def test_concurrent_moves_go_to_redis_together(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store, reg = TaskStore(r), WorkerRegistry(r)
        await reg.register(registration("w1"))
        tasks = [await new_task(store) for _ in range(3)]
        mover = Coalescer(store)
        before = await _evalsha_calls(r)
        placed = await asyncio.gather(
            *(mover.apply(task, Change(moves.PLACE, reserve=Reservation("w1", 100, 0, [], "{}"))) for task in tasks)
        )
        assert [o.ok for o in placed] == [True, True, True]
        assert await _evalsha_calls(r) - before == 1
        # Each caller gets its own outcome, and its own error for a move the table forbids.
        forbidden = moves.Move("succeed_unstarted", TaskState.SUCCEEDED, frozenset({TaskState.PENDING}))
        with pytest.raises(InvalidTransition):
            await mover.apply(tasks[0], Change(forbidden))
        started = await mover.apply(tasks[0], Change(moves.START, expect_worker="w1", new_attempt=True))
        assert started.ok and started.attempt == 1
        # Redis away: every waiting caller hears it, and the next batch goes through once it is back.
        await r.config_set("maxmemory", "1")
        await r.config_set("maxmemory-policy", "noeviction")
        results = await asyncio.gather(
            *(mover.apply(task, Change(moves.START, expect_worker="w1", new_attempt=True)) for task in tasks[1:]),
            return_exceptions=True,
        )
        await r.config_set("maxmemory", "0")
        assert all(isinstance(result, aioredis.ResponseError) for result in results), results
        again = await mover.apply(tasks[1], Change(moves.START, expect_worker="w1", new_attempt=True))
        assert again.ok

    run(scenario())
