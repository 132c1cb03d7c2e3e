"""mloc.orchestrator.groups: a replica group's parent settles in the orchestrator, from what its shards'
own transitions marked, with the reaper's sweep as the fallback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.orchestrator import groups
from mloc.state import TaskState
from mloc.store import Reservation, TaskStore
from mloc.workers import WorkerRegistry
from tests.support.fleet import echo_record, registration

Scenario = Callable[[aioredis.Redis, TaskStore, str, list[str]], Awaitable[None]]


def run(redis_url: str, scenario: Scenario, shards: int = 2) -> None:
    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await WorkerRegistry(r).register(registration("w1", slots=10))
        store = TaskStore(r)
        parent = echo_record(store)
        children = [echo_record(store) for _ in range(shards)]
        parent.group_size, parent.children = shards, [child.task_id for child in children]
        for index, child in enumerate(children):
            child.parent_id, child.replica = parent.task_id, index
            child.labels = {groups.OFFSET_LABEL: str(2 * index)}
        await store.insert([parent, *children])
        try:
            await scenario(r, store, parent.task_id, parent.children)
        finally:
            await r.aclose()

    asyncio.run(main())


async def start(store: TaskStore, task_id: str) -> None:
    assert (await store.transition(task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}"))).ok
    assert (await store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)).ok


async def succeed(store: TaskStore, task_id: str, outputs: list[str]) -> None:
    items = [{"index": i, "output": text} for i, text in enumerate(outputs)]
    result = {"ok": True, "items": items, "usage": {"num_requests": len(items)}}
    assert (await store.transition(task_id, moves.SUCCEED, expect_worker="w1", release=True, result=result)).ok


def test_the_parent_runs_with_its_first_shard_and_succeeds_with_the_merge(redis_url: str, tmp_path: Path) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, parent: str, shards: list[str]) -> None:
        assert await r.smembers(keys.GROUPS_OPEN) == {parent}
        await start(store, shards[0])
        assert await r.smembers(keys.GROUPS_TO_SETTLE) == {parent}  # marked by the shard's own move
        assert await groups.settle_marked(store, tmp_path) == 1
        assert await r.hget(keys.task(parent), "state") == "running"
        await start(store, shards[1])
        await succeed(store, shards[1], ["c", "d"])
        await succeed(store, shards[0], ["a", "b"])
        await groups.settle_marked(store, tmp_path)
        record = await store.get(parent)
        assert record.state == TaskState.SUCCEEDED and record.usage == {"num_requests": 4}
        merged = await store.result(parent)
        assert [item["output"] for item in merged["items"]] == ["a", "b", "c", "d"]
        assert json.loads((tmp_path / parent / "responses.json").read_text()) == merged
        assert not await r.exists(keys.GROUPS_OPEN) and not await r.exists(keys.GROUPS_TO_SETTLE)

    run(redis_url, scenario)


def test_shards_that_all_end_before_the_parent_is_seen_running_still_take_allowed_moves(
    redis_url: str, tmp_path: Path
) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, parent: str, shards: list[str]) -> None:
        for shard, outputs in zip(shards, (["a"], ["b"]), strict=True):
            await start(store, shard)
            await succeed(store, shard, outputs)
        await groups.settle_marked(store, tmp_path)
        moved = [(e["from"], e["to"], e["move"]) for _, e in await r.xrange(keys.EVENTS) if e["task"] == parent]
        # pending -> succeeded is not in the table: the parent starts and ends in one step instead.
        assert moved == [("pending", "running", "group_start"), ("running", "succeeded", "group_succeed")]

    run(redis_url, scenario)


def test_a_failed_shard_fails_the_parent_and_cancels_the_shards_still_going(redis_url: str, tmp_path: Path) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, parent: str, shards: list[str]) -> None:
        await start(store, shards[0])
        await store.transition(shards[0], moves.FAIL, release=True, fields={"reason": "out of tokens"})
        await groups.settle_marked(store, tmp_path)
        record = await store.get(parent)
        assert record.state == TaskState.FAILED and record.reason_code == "replica_failed"
        assert record.reason == f"replica 0 ({shards[0]}) failed: out of tokens"
        assert await r.hget(keys.task(shards[1]), "state") == "cancelled"
        assert {shard: await r.hget(keys.task(shard), "state") for shard in shards[2:]} == {
            shard: "cancelled" for shard in shards[2:]
        }

    run(redis_url, scenario, shards=3)


def test_the_sweep_settles_a_group_whose_mark_was_lost(redis_url: str, tmp_path: Path) -> None:
    async def scenario(r: aioredis.Redis, store: TaskStore, parent: str, shards: list[str]) -> None:
        for shard in shards:
            await start(store, shard)
            await succeed(store, shard, ["x"])
        await r.delete(keys.GROUPS_TO_SETTLE)  # as if the orchestrator died after taking the mark
        assert await groups.settle_marked(store, tmp_path) == 0
        assert await r.hget(keys.task(parent), "state") == "pending"
        assert await groups.sweep(store, tmp_path) == 0
        assert await r.hget(keys.task(parent), "state") == "succeeded"
        assert not await r.exists(keys.GROUPS_OPEN)

    run(redis_url, scenario)
