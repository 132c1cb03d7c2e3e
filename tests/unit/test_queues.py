"""mloc.orchestrator.queues: the waiting tasks a scheduling pass reads from the owners' queues, in
real Redis, with records stored as the orchestrator stores them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.orchestrator.placement import WaitCode
from mloc.orchestrator.queues import PendingQueues, UserLimits
from mloc.orchestrator.standing import Standings
from mloc.records import PENDING_CODE
from mloc.store import Reservation, TaskStore
from mloc.transition import pending_score
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration

Scenario = Callable[[aioredis.Redis, TaskStore, PendingQueues], Awaitable[None]]


def on_queues(redis_url: str, scenario: Scenario) -> None:
    """Run ``scenario`` on a store and the queues over it, as an orchestrator makes them."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = TaskStore(r)
        try:
            await scenario(r, store, PendingQueues(store, Standings(r, half_life_sec=3600), UserLimits(tasks=5)))
        finally:
            await r.aclose()

    asyncio.run(run())


def test_a_pass_reads_each_owners_queue_in_order_with_their_limits(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        records = [echo_record(store, owner) for owner in ("bob", "alice", "bob")]
        for record in records:
            await store.insert([record])
        await r.hset(keys.user_quota("bob"), "tasks", "1")
        owners = await queues.read(100)
        assert [o.name for o in owners] == ["alice", "bob"]
        alice, bob = owners
        assert [t.task_id for t in bob.waiting] == [records[0].task_id, records[2].task_id]
        assert [t.task_id for t in alice.waiting] == [records[1].task_id]
        # Bob's own quota, Alice's the default; neither holds anything yet.
        assert (bob.max_tasks, alice.max_tasks, bob.tasks, bob.gpus) == (1, 5, 0, 0)
        assert all(t.req_json and t.owner == o.name for o in owners for t in o.waiting)

    on_queues(redis_url, scenario)


def test_tasks_made_in_one_millisecond_queue_in_the_order_they_were_made(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        # Made back to back, many share a millisecond; their random ids alone would order them.
        records = [echo_record(store, "erin") for _ in range(50)]
        await store.insert(records)
        stored = [int(await r.hget(keys.task(record.task_id), "created_ms")) for record in records]
        assert stored == sorted(set(stored))
        (erin,) = await queues.read(100)
        assert [t.task_id for t in erin.waiting] == [record.task_id for record in records]

    on_queues(redis_url, scenario)


def test_tasks_queue_in_the_order_redis_stored_them_whichever_clock_made_them(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        # Two orchestrators: one's burst runs its order ahead of its clock; the other's clock is
        # 5 s behind. Each next task queues behind the last stored, at every priority's own place.
        other = TaskStore(r)
        burst = [echo_record(store, "hal") for _ in range(30)]
        await store.insert(burst)
        behind = echo_record(other, "hal")
        behind.created_at -= 5.0
        urgent = echo_record(other, "hal", priority=1)
        urgent.created_at -= 5.0
        await other.insert([behind])
        await other.insert([urgent])
        (hal,) = await queues.read(100)
        order = [urgent.task_id, *(record.task_id for record in burst), behind.task_id]
        assert [t.task_id for t in hal.waiting] == order
        last = int(await r.hget(keys.task(burst[-1].task_id), "created_ms"))
        assert int(await r.hget(keys.task(behind.task_id), "created_ms")) == last + 1
        # The real time of the submit is kept as made; only the order moved on.
        assert float(await r.hget(keys.task(behind.task_id), "created_at")) == behind.created_at
        for record, priority in ((behind, 0), (urgent, 1)):
            ms = int(await r.hget(keys.task(record.task_id), "created_ms"))
            assert await r.zscore(keys.PENDING, record.task_id) == pending_score(priority, ms)
        # A record that keeps its place (a chunk cut late keeps its parent's) is stored at it, ahead of the
        # burst, and moves the order on for nobody.
        kept = replace(echo_record(other, "hal"), order_ms=int(burst[0].created_at * 1000) - 1)
        await other.insert([kept])
        assert int(await r.hget(keys.task(kept.task_id), "created_ms")) == kept.order_ms
        (hal,) = await queues.read(100)
        assert [t.task_id for t in hal.waiting][:2] == [urgent.task_id, kept.task_id]
        assert await r.get(keys.QUEUE_ORDER) == await r.hget(keys.task(urgent.task_id), "created_ms")

    on_queues(redis_url, scenario)


def test_the_highest_and_lowest_priorities_keep_every_millisecond_apart(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        # A low and a high one first: each priority is a queue of its own within the owner's.
        made = {p: [echo_record(store, "fay", priority=p) for _ in range(20)] for p in (-1000, 1000)}
        await store.insert(made[-1000] + made[1000])
        (fay,) = await queues.read(100)
        assert [t.task_id for t in fay.waiting] == [record.task_id for record in made[1000] + made[-1000]]

    on_queues(redis_url, scenario)


def test_tasks_queued_with_an_older_priority_weight_are_scored_again_on_the_first_read(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        older, newer = echo_record(store, "gus", priority=1), echo_record(store, "gus", priority=2)
        await store.insert([older, newer])
        # As an MLOC that weighed a priority as 10**13 ms queued it: ahead of the newer, higher one.
        older_ms = int(await r.hget(keys.task(older.task_id), "created_ms"))
        old_score = -1 * 10**13 + older_ms
        for index in (keys.PENDING, keys.pending_of("gus")):
            await r.zadd(index, {older.task_id: old_score})
        (gus,) = await queues.read(100)
        assert [t.task_id for t in gus.waiting] == [newer.task_id, older.task_id]
        right = pending_score(1, older_ms)
        assert (
            await r.zscore(keys.PENDING, older.task_id)
            == await r.zscore(keys.pending_of("gus"), older.task_id)
            == right
        )

    on_queues(redis_url, scenario)


def test_a_task_no_longer_pending_is_dropped_from_both_indexes_and_an_empty_owner_with_it(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        record = echo_record(store, "carol")
        await store.insert([record])
        # An index left behind by a write that did not finish: the record moved on, its entries stayed.
        await r.hset(keys.task(record.task_id), "state", "cancelled")
        assert [o.waiting for o in await queues.read(100)] == [[]]
        assert await r.zscore(keys.PENDING, record.task_id) is None
        assert await r.zscore(keys.pending_of("carol"), record.task_id) is None
        assert not await r.sismember(keys.PENDING_OWNERS, "carol")
        assert await queues.read(100) == []

    on_queues(redis_url, scenario)


def test_a_task_queued_without_an_owners_queue_gets_one_on_the_first_read(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        record = echo_record(store, "dave")
        await store.insert([record])
        # As an older MLOC queued it: in PENDING only.
        await r.zrem(keys.pending_of("dave"), record.task_id)
        await r.srem(keys.PENDING_OWNERS, "dave")
        owners = await queues.read(100)
        assert [(o.name, [t.task_id for t in o.waiting]) for o in owners] == [("dave", [record.task_id])]

    on_queues(redis_url, scenario)


def test_retries_join_the_queue_when_due_and_the_next_one_is_remembered(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        soon, later = echo_record(store, "erin"), echo_record(store, "erin")
        await store.insert([soon])
        await store.insert([later])
        await WorkerRegistry(r).register(registration("w1"))
        now = time.time()
        for record, at in ((soon, now - 1), (later, now + 600)):
            assert (await store.transition(record.task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))).ok
            assert (await store.transition(record.task_id, moves.REQUEUE, release=True, retry_at=at)).ok
        assert await queues.read(100) == []  # both wait out their backoff
        assert await queues.promote_retries() == 1
        assert queues.next_retry_at is not None and abs(queues.next_retry_at - (now + 600)) < 1
        owners = await queues.read(100)
        assert [t.task_id for o in owners for t in o.waiting] == [soon.task_id]

    on_queues(redis_url, scenario)


def test_reasons_are_written_with_whether_the_task_can_ever_run(redis_url: str) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, queues: PendingQueues) -> None:
        a, b = echo_record(store), echo_record(store)
        await store.insert([a])
        await store.insert([b])
        await queues.note_reasons({a.task_id: "no worker has 8 GPUs", b.task_id: "all slots busy"}, {a.task_id: True})
        assert await r.hmget(keys.task(a.task_id), "pending_reason", "unschedulable") == ["no worker has 8 GPUs", "1"]
        assert await r.hmget(keys.task(b.task_id), "pending_reason", "unschedulable") == ["all slots busy", "0"]
        # A quota or budget hold says so in a code of its own, which a reason of room clears again.
        await queues.note_reasons({b.task_id: "user bob at quota"}, {}, {b.task_id: WaitCode.QUOTA})
        assert await r.hget(keys.task(b.task_id), PENDING_CODE) == "quota"
        await queues.note_reasons({b.task_id: "all slots busy"}, {})
        assert await r.hget(keys.task(b.task_id), PENDING_CODE) == ""

    on_queues(redis_url, scenario)
