"""The worker's task runner (mloc.worker.runner.TaskRunner, through the Worker that mixes it in),
one assignment at a time: real Redis, the real orchestrator placing real echo tasks, and the stream
entries the transition script wrote, handed to the runner as its consume loop would."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.records import ADMIN, Assignment, WorkerStatus
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason, TaskState
from mloc.worker.worker import Worker
from tests.support.redislink import LossyLink

ALICE = Principal("alice", admin=False)
# Echo without a pause runs on the worker's event loop, its start and end recorded in one step after
# it ran; with a pause it runs in a thread, its start recorded before it runs.
INSTANT, THREAD = 0.0, 0.05


class Rig:
    def __init__(self, redis: aioredis.Redis, orch: Orchestrator, workers: dict[str, Worker]) -> None:
        self.redis, self.orch, self.workers = redis, orch, workers

    async def submit(self, sleep_sec: float = INSTANT) -> str:
        doc = {"taskType": "echo", "payload": {"hello": "world"}, "hyperparameters": {"sleep_sec": sleep_sec}}
        answer = await self.orch.submit(validate(doc), ALICE)
        assert answer["state"] == "assigned", answer
        return str(answer["task_id"])

    async def entry(self, worker_id: str) -> tuple[str, dict[str, str]]:
        """The next entry on the worker's stream, read as its consume loop reads it."""
        reply = await self.redis.xreadgroup(keys.WORKER_GROUP, worker_id, {keys.worker_stream(worker_id): ">"}, count=1)
        ((_, entries),) = reply
        entry_id, fields = entries[0]
        return entry_id, fields

    async def entry_for(self, task_id: str) -> tuple[str, dict[str, str]]:
        worker_id = (await self.orch.store.get(task_id)).worker_id
        return await self.entry(worker_id or "")

    async def unacknowledged(self, worker_id: str) -> int:
        return int((await self.redis.xpending(keys.worker_stream(worker_id), keys.WORKER_GROUP))["pending"])

    async def moves(self, task_id: str) -> list[tuple[str, str]]:
        """The task's state changes, in order, from the events stream."""
        events = await self.redis.xrange(keys.EVENTS)
        return [(e["from"], e["to"]) for _, e in events if e["task"] == task_id]


def run(
    redis_url: str,
    tmp_path: Path,
    scenario: Callable[[Rig], Awaitable[None]],
    workers: int = 1,
    *,
    worker_url: str | None = None,
    slots: int = 2,
) -> None:
    """``worker_url``: where the workers reach Redis, when not where the rest does."""

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        wr = aioredis.Redis.from_url(worker_url, decode_responses=True) if worker_url else r
        settings: dict[str, Any] = {
            "RESULTS_DIR": str(tmp_path / "results"),
            "MLOC_MODELS_DIR": str(tmp_path / "models"),
            "MLOC_HOME": str(tmp_path / "home"),
            "TASK_TOPICS": "tasks.*",
            "MLOC_WORKER_GPUS": "",
            "MLOC_WORKER_SLOTS": str(slots),
            "HEARTBEAT_TTL_SEC": "60",
        }
        started: dict[str, Worker] = {}
        try:
            for i in range(1, workers + 1):
                worker = Worker(Settings(**settings, WORKER_ID=f"w{i}"), wr)
                await worker.register()
                started[worker.worker_id] = worker
            await scenario(Rig(r, Orchestrator(r, Settings(**settings)), started))
        finally:
            for worker in started.values():
                await worker.pool.close()
            await r.aclose()
            if wr is not r:
                await wr.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("sleep_sec", [INSTANT, THREAD], ids=["on-the-loop", "in-a-thread"])
def test_an_assignment_is_started_fenced_on_its_attempt_then_finished(
    redis_url: str, tmp_path: Path, sleep_sec: float
) -> None:
    async def scenario(rig: Rig) -> None:
        task_id = await rig.submit(sleep_sec)
        entry_id, fields = await rig.entry("w1")
        sent = Assignment.decode(fields)
        assert (sent.task_id, sent.owner, sent.gpus, sent.attempt) == (task_id, "alice", (), 1)
        await rig.workers["w1"]._handle(entry_id, fields)

        record = await rig.orch.store.get(task_id)
        assert record.state == TaskState.SUCCEEDED and record.attempts == 1 and record.worker_id == "w1"
        assert record.started_at and record.finished_at and record.started_at <= record.finished_at
        assert await rig.moves(task_id) == [("pending", "assigned"), ("assigned", "running"), ("running", "succeeded")]
        result = await rig.orch.store.result(task_id)
        assert result["payload"] == {"hello": "world"} and result["attempt"] == 1 and result["worker_id"] == "w1"
        assert (tmp_path / "results" / task_id / "responses.json").is_file()
        # Acknowledged and deleted with the outcome; the capacity it held is free again.
        assert await rig.unacknowledged("w1") == 0 and await rig.redis.xlen(keys.worker_stream("w1")) == 0
        assert await rig.redis.hget(keys.worker("w1"), "slots_free") == "2"

    run(redis_url, tmp_path, scenario)


@pytest.mark.parametrize("sleep_sec", [INSTANT, THREAD], ids=["on-the-loop", "in-a-thread"])
def test_an_assignment_delivered_twice_runs_its_task_once(redis_url: str, tmp_path: Path, sleep_sec: float) -> None:
    async def scenario(rig: Rig) -> None:
        task_id = await rig.submit(sleep_sec)
        entry_id, fields = await rig.entry("w1")
        await rig.workers["w1"]._handle(entry_id, fields)
        first = await rig.orch.store.get(task_id)
        await rig.workers["w1"]._handle(entry_id, fields)
        again = await rig.orch.store.get(task_id)
        assert again.state == TaskState.SUCCEEDED and again.attempts == 1
        assert again.finished_at == first.finished_at
        assert len(await rig.moves(task_id)) == 3
        assert (tmp_path / "results" / task_id / "responses.json").is_file()

    run(redis_url, tmp_path, scenario)


@pytest.mark.parametrize("sleep_sec", [INSTANT, THREAD], ids=["on-the-loop", "in-a-thread"])
def test_a_start_whose_answer_was_lost_runs_its_task_once(redis_url: str, tmp_path: Path, sleep_sec: float) -> None:
    """Redis applied the worker's start and the answer never came (Redis killed between the two):
    the worker's next try is refused, as the task is running already; the worker sees that the start
    is its own and runs the task, rather than leave it running for ever with no one running it."""
    with LossyLink(int(redis_url.rsplit(":", 1)[1].split("/")[0])) as link:

        async def scenario(rig: Rig) -> None:
            # A first task loads the worker's scripts: else Redis would refuse the lost request (NOSCRIPT).
            await rig.workers["w1"]._handle(*await rig.entry_for(await rig.submit(sleep_sec)))
            task_id = await rig.submit(sleep_sec)
            entry_id, fields = await rig.entry("w1")
            link.lose_answer_to(b"started_at")
            await rig.workers["w1"]._handle(entry_id, fields)
            assert link.lost.is_set()
            record = await rig.orch.store.get(task_id)
            assert record.state == TaskState.SUCCEEDED and record.attempts == 1, record
            assert await rig.moves(task_id) == [
                ("pending", "assigned"),
                ("assigned", "running"),
                ("running", "succeeded"),
            ]
            assert (await rig.orch.store.result(task_id))["attempt"] == 1
            assert await rig.unacknowledged("w1") == 0
            assert await rig.redis.hget(keys.worker("w1"), "slots_free") == "2"

        run(redis_url, tmp_path, scenario, worker_url=link.url)


def test_tasks_a_worker_holds_but_is_not_handling_are_handed_back(redis_url: str, tmp_path: Path) -> None:
    """The worker's sweep: a task Redis says it holds, found at two sweeps in a row not handled there
    (its assignment read, or its start recorded, and the answer lost), is requeued without spending an
    attempt; a task it is running is left alone."""

    async def scenario(rig: Rig) -> None:
        worker = rig.workers["w1"]
        unread = await rig.submit(THREAD)
        await rig.entry("w1")  # read from the stream, as by a read whose answer never came
        unstarted = await rig.submit(THREAD)
        entry_id, _ = await rig.entry("w1")
        # Its start recorded, as the worker's own move writes it, and then nothing runs it.
        assert (await worker.store.transition(unstarted, moves.START, expect_worker="w1", new_attempt=True)).ok
        await worker._ack(entry_id)
        kept = await rig.submit(1.0)
        handling = asyncio.create_task(worker._handle(*await rig.entry("w1")))
        while (await rig.orch.store.get(kept)).state != TaskState.RUNNING:
            await asyncio.sleep(0.01)

        assert await worker.sweep() == []  # seen once: a task between its read and its start looks so too
        assert await rig.unacknowledged("w1") == 2  # the entry read without an answer, and the running one's
        assert await worker.sweep() == sorted([unread, unstarted])
        # The lost read's entry goes with its task; the running task's stays for its handler.
        assert await rig.unacknowledged("w1") == 1
        assert [e["task"] for _, e in await rig.redis.xrange(keys.worker_stream("w1"))] == [kept]
        for task_id, attempts, requeues in ((unread, 0, None), (unstarted, 1, "1")):
            record = await rig.orch.store.get(task_id)
            assert record.state == TaskState.PENDING and not record.worker_id, record
            assert record.attempts == attempts and record.reason_code == Reason.ORPHANED
            assert record.reason and "held it but was not running it" in record.reason
            assert await rig.redis.hget(keys.task(task_id), "requeues") == requeues
        assert await worker.sweep() == []

        await handling
        assert await rig.unacknowledged("w1") == 0
        record = await rig.orch.store.get(kept)
        assert record.state == TaskState.SUCCEEDED and record.attempts == 1
        assert await rig.moves(kept) == [("pending", "assigned"), ("assigned", "running"), ("running", "succeeded")]
        assert await rig.redis.hget(keys.worker("w1"), "slots_free") == "3"

    run(redis_url, tmp_path, scenario, slots=3)


def test_an_assignment_read_by_another_worker_runs_nothing(redis_url: str, tmp_path: Path) -> None:
    """Fenced on the worker: a worker that reads an assignment the task's record does not give it
    (it was placed elsewhere since) records nothing."""

    async def scenario(rig: Rig) -> None:
        for sleep_sec in (INSTANT, THREAD):
            task_id = await rig.submit(sleep_sec)
            owner = (await rig.orch.store.get(task_id)).worker_id
            other = "w2" if owner == "w1" else "w1"
            entry_id, fields = await rig.entry(owner or "")
            await rig.workers[other]._handle(entry_id, fields)
            record = await rig.orch.store.get(task_id)
            assert record.state == TaskState.ASSIGNED and record.attempts == 0 and record.worker_id == owner
            assert not (tmp_path / "results" / task_id).exists()
            await rig.workers[owner or ""]._handle(entry_id, fields)
            assert (await rig.orch.store.get(task_id)).state == TaskState.SUCCEEDED

    run(redis_url, tmp_path, scenario, workers=2)


def test_an_assignment_announcing_another_attempt_runs_nothing(redis_url: str, tmp_path: Path) -> None:
    """Fenced on the attempt: work recorded in one step after it ran is recorded only for the
    attempt its assignment announced."""

    async def scenario(rig: Rig) -> None:
        task_id = await rig.submit(INSTANT)
        entry_id, fields = await rig.entry("w1")
        await rig.workers["w1"]._handle(entry_id, {**fields, "attempt": "2"})
        record = await rig.orch.store.get(task_id)
        assert record.state == TaskState.ASSIGNED and record.attempts == 0
        assert not (tmp_path / "results" / task_id).exists()
        assert await rig.moves(task_id) == [("pending", "assigned")]

    run(redis_url, tmp_path, scenario)


@pytest.mark.parametrize("sleep_sec", [INSTANT, THREAD], ids=["on-the-loop", "in-a-thread"])
def test_a_task_cancelled_before_its_worker_read_the_assignment_is_skipped(
    redis_url: str, tmp_path: Path, sleep_sec: float
) -> None:
    async def scenario(rig: Rig) -> None:
        task_id = await rig.submit(sleep_sec)
        await cancel(rig.orch.store, task_id, by="alice")
        entry_id, fields = await rig.entry("w1")
        await rig.workers["w1"]._handle(entry_id, fields)
        record = await rig.orch.store.get(task_id)
        assert record.state == TaskState.CANCELLED and record.attempts == 0
        assert record.reason_code == Reason.CANCELLED_BY_USER
        assert await rig.moves(task_id) == [("pending", "assigned"), ("assigned", "cancelled")]
        assert not (tmp_path / "results" / task_id).exists()
        assert await rig.unacknowledged("w1") == 0
        assert await rig.redis.hget(keys.worker("w1"), "slots_free") == "2"

    run(redis_url, tmp_path, scenario)


def test_a_malformed_assignment_fails_its_task_with_the_reason_and_is_acknowledged(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(rig: Rig) -> None:
        task_id = await rig.submit()
        entry_id, fields = await rig.entry("w1")
        with caplog.at_level(logging.ERROR, logger="mloc.worker.runner"):
            await rig.workers["w1"]._handle(entry_id, {**fields, "body": '{"spec": {"spec": {}}'})
        record = await rig.orch.store.get(task_id)
        assert record.state == TaskState.FAILED and record.attempts == 0
        assert record.reason_code == Reason.ASSIGNMENT_UNREADABLE
        assert record.reason and record.reason.startswith(f"assignment of task {task_id} is unreadable: its body is")
        assert "run the same version on both" in record.reason
        assert [r.getMessage() for r in caplog.records] == [record.reason]
        # Not read again, and the worker's capacity is not held by a task that will never run.
        assert await rig.unacknowledged("w1") == 0
        assert await rig.redis.hget(keys.worker("w1"), "slots_free") == "2"
        assert await rig.redis.hget(keys.worker("w1"), "status") == WorkerStatus.ACTIVE

    run(redis_url, tmp_path, scenario)


def test_an_entry_without_a_task_is_acknowledged_and_logged(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(rig: Rig) -> None:
        stream = keys.worker_stream("w1")
        await rig.redis.xadd(stream, {"body": "{}"})
        entry_id, fields = await rig.entry("w1")
        with caplog.at_level(logging.ERROR, logger="mloc.worker.runner"):
            await rig.workers["w1"]._handle(entry_id, fields)
        assert [r.getMessage() for r in caplog.records] == [
            "assignment without a task id is unreadable: the entry has no 'task' field; the orchestrator that "
            "sent it may run another MLOC version than this worker: run the same version on both"
        ]
        assert await rig.unacknowledged("w1") == 0 and await rig.redis.xlen(stream) == 0

    run(redis_url, tmp_path, scenario)


def test_the_owner_is_admin_only_for_the_admin(redis_url: str, tmp_path: Path) -> None:
    """The assignment carries the task's owner; the record says who submitted it, which the worker's
    model-path check reads (the admin's tasks may name any path)."""

    async def scenario(rig: Rig) -> None:
        answer = await rig.orch.submit(validate({"taskType": "echo"}), Principal(ADMIN, admin=True))
        _, fields = await rig.entry("w1")
        assert Assignment.decode(fields).owner == ADMIN
        assert await rig.redis.hget(keys.task(answer["task_id"]), "submitted_by") == ADMIN

    run(redis_url, tmp_path, scenario)


def test_identical_instant_tasks_share_one_validated_document_and_each_gets_its_own_result(
    redis_url: str, tmp_path: Path
) -> None:
    async def scenario(rig: Rig) -> None:
        worker = rig.workers["w1"]
        first, second = await rig.submit(), await rig.submit()
        entries = [await rig.entry("w1") for _ in range(2)]
        assert entries[0][1]["body"] == entries[1][1]["body"]  # the same task, sent twice
        documents = [worker._instant(Assignment.decode(fields)) for _, fields in entries]
        assert documents[0] is not None and documents[0] is documents[1]
        for entry_id, fields in entries:
            await worker._handle(entry_id, fields)
        for task_id in (first, second):
            assert (await rig.orch.store.get(task_id)).state == TaskState.SUCCEEDED
            assert (await rig.orch.store.result(task_id))["payload"] == {"hello": "world"}
            assert (tmp_path / "results" / task_id / "responses.json").is_file()
        # Another document is validated on its own, and one that runs in a thread is known as such too.
        threaded = await rig.submit(THREAD)
        _, fields = await rig.entry_for(threaded)
        assert worker._instant(Assignment.decode(fields)) is None
        assert len(worker._instant_documents) == 2

    run(redis_url, tmp_path, scenario, slots=3)


def test_the_consume_loop_sends_an_instant_tasks_end_before_its_next_read(redis_url: str, tmp_path: Path) -> None:
    """A task that ends at once is recorded one hop sooner when its end reaches Redis before the
    worker's next (blocking) read of its stream: the order is read from Redis's MONITOR."""

    async def scenario(rig: Rig) -> None:
        worker = rig.workers["w1"]
        stream = keys.worker_stream("w1")
        seen: list[tuple[str, str]] = []  # (command, what it names) as Redis ran them

        async def watch() -> None:
            async with watcher_redis.monitor() as monitor:
                watching.set()
                async for command in monitor.listen():
                    name = command["command"].partition(" ")[0].upper()
                    if name == "XREADGROUP" and stream in command["command"]:
                        seen.append(("read", ""))
                    elif name in ("EVAL", "EVALSHA"):
                        seen.append(("script", command["command"]))

        def reads() -> int:
            return sum(1 for kind, _ in seen if kind == "read")

        watcher_redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        watching = asyncio.Event()
        watcher = asyncio.create_task(watch())
        await watching.wait()
        consume = asyncio.create_task(worker._consume_loop())
        try:
            while reads() < 1:  # blocked on the empty stream
                await asyncio.sleep(0.01)
            task_id = await rig.submit()
            while reads() < 2:
                await asyncio.sleep(0.01)
            assert (await rig.orch.store.get(task_id)).state == TaskState.SUCCEEDED
            after_first = seen[[kind for kind, _ in seen].index("read") + 1 :]
            # The worker's start-and-end call is the one that names the task and its end.
            order = [
                "end" if kind == "script" else kind
                for kind, named in after_first
                if kind == "read" or (task_id in named and TaskState.SUCCEEDED in named)
            ]
            assert order and order[0] == "end", seen
        finally:
            worker.stopping.set()
            await asyncio.wait_for(consume, timeout=5)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await watcher_redis.aclose()

    run(redis_url, tmp_path, scenario)


def test_the_consume_loop_reads_on_while_a_task_that_takes_time_runs(redis_url: str, tmp_path: Path) -> None:
    """Only ends that come at once are waited for before the next read: an instant task assigned
    while a slower one runs on the same worker ends long before it."""

    async def scenario(rig: Rig) -> None:
        worker = rig.workers["w1"]
        consume = asyncio.create_task(worker._consume_loop())
        try:
            slow = await rig.submit(3.0)
            while (await rig.orch.store.get(slow)).state != TaskState.RUNNING:
                await asyncio.sleep(0.01)
            quick = await rig.submit()
            async with asyncio.timeout(2.5):
                while (await rig.orch.store.get(quick)).state != TaskState.SUCCEEDED:
                    await asyncio.sleep(0.01)
            assert (await rig.orch.store.get(slow)).state == TaskState.RUNNING
        finally:
            worker.stopping.set()
            await asyncio.wait_for(consume, timeout=5)
            await asyncio.gather(*worker._tasks, return_exceptions=True)

    run(redis_url, tmp_path, scenario)


def test_how_much_was_counted_is_noted_only_for_the_task_type_that_reads_it(tmp_path: Path) -> None:
    """A dataset inference task's next run reads how many bytes of its result lines an ended run had
    counted; no other type reads it, so the worker looks at no other type's folder (a stat per task)."""
    from mloc.spec.dataset import COUNTED_BYTES, RESULT_LINES
    from mloc.worker.runner import _note_counted

    lines = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'
    for task_type in ("inference", "rag", "echo"):
        (tmp_path / task_type).mkdir()
        (tmp_path / task_type / RESULT_LINES).write_bytes(lines)
        asyncio.run(_note_counted(task_type, tmp_path / task_type))
    assert (tmp_path / "inference" / COUNTED_BYTES).read_text() == str(len(lines))
    assert not (tmp_path / "rag" / COUNTED_BYTES).exists()  # rag writes result lines, never resumes them
    assert not (tmp_path / "echo" / COUNTED_BYTES).exists()
    assert sorted(p.name for p in (tmp_path / "inference").iterdir()) == sorted([RESULT_LINES, COUNTED_BYTES])
