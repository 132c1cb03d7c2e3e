"""No starvation of big tasks: a hold on a worker for the oldest blocked task, and EASY backfill."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.orchestrator import eta
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.placement import Request
from mloc.orchestrator.users import Principal
from mloc.records import Registration, WorkerStatus
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import TaskState
from tests.support import fleet
from tests.support.api import wait_until

ADMIN = Principal("admin", admin=True)
FOUR_L4 = {"MLOC_WORKER_GPUS": "NVIDIA L4:4:24576", "MLOC_WORKER_SLOTS": "8"}
# "~14:05:10 UTC", with the date when the time is on another UTC day than now.
CLOCK = r"~(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d UTC"


def registration(worker_id: str) -> Registration:
    return fleet.registration(worker_id, slots=8, gpus=4, cpu=64000, memory=1 << 36, gpu_memory=1 << 34)


def echo(gpus: int, *, sleep: float = 0.0, timeout: float | None = None, topic: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "echo",
        "resources": {"hardware": {"gpu": {"count": gpus}}},
        "hyperparameters": {"sleep_sec": sleep, "steps": max(1, int(sleep * 4))},
    }
    if timeout is not None:
        task["timeout_sec"] = timeout
    if topic is not None:
        task["topic"] = topic
    return task


# --------------------------------------------------------------- one orchestrator's pass, in process
AFTER_SEC = 1.0


async def fresh_pass(orch: Orchestrator) -> int:
    """A scheduling pass on a fresh snapshot of the workers: the one kept between passes may be up to
    its age old, predating what the test just did through the store or another orchestrator."""
    orch.scheduler.invalidate()
    return await orch.scheduler.schedule_pending()


def test_the_oldest_blocked_task_holds_the_worker_where_it_starts_soonest_and_every_placement_obeys(
    redis_url: str,
) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        settings = Settings(HEARTBEAT_TTL_SEC=60, MLOC_BACKFILL_AFTER_SEC=AFTER_SEC)
        orch, other = Orchestrator(r, settings), Orchestrator(r, settings)

        async def submit(task: dict[str, Any], by: Orchestrator = orch) -> dict[str, Any]:
            by.scheduler.invalidate()
            return await by.submit(validate(task), ADMIN)

        for worker_id in ("w1", "w2"):
            await orch.registry.register(registration(worker_id))
        # Neither has run yet: each ends by its timeout, w2's first.
        slow = await submit(echo(3, timeout=120))
        soon = await submit(echo(3, timeout=30))
        assert (slow["worker_id"], soon["worker_id"]) == ("w1", "w2")
        big = await submit(echo(4))
        assert big["state"] == "pending"
        assert await fresh_pass(orch) == 0
        assert await r.get(keys.BACKFILL_HOLD) is None  # not waited long enough yet
        # No hold yet, and slots free on both: it still starts only when w2's task gives back its GPUs.
        early = await orch.queue_estimate(await orch.store.get(big["task_id"]))
        assert early is not None and 25 < early["eta_sec"] <= 30, early
        assert early["basis"].endswith("; 3 GPUs free on w2 then, as its tasks end"), early
        await asyncio.sleep(AFTER_SEC + 0.05)
        await fresh_pass(orch)
        hold = json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")
        assert (hold["task_id"], hold["worker_id"]) == (big["task_id"], "w2")
        assert 0 < await r.pttl(keys.BACKFILL_HOLD) <= 15_000  # a dead orchestrator's hold lapses
        reason = await r.hget(keys.task(big["task_id"]), "pending_reason")
        assert re.fullmatch(
            rf"reserved on w2 from {CLOCK} \(in 2\ds\): waiting for 3 GPUs held by {soon['task_id']}", reason
        ), reason

        # Other workers are not held: a task with no known end still goes to w1's free GPU.
        anywhere = await submit(echo(1))
        assert anywhere["worker_id"] == "w1"
        # The held worker takes no work that may outlast the shadow time, whichever orchestrator asks.
        unknown = await submit(echo(1))
        assert unknown["state"] == "pending"
        assert unknown["pending_reason"].startswith(
            f"waiting for capacity: w2 is reserved for older task {big['task_id']}"
        )
        assert "no run history of its kind and no timeout" in unknown["pending_reason"]
        too_long = await submit(echo(1, timeout=300), by=other)
        assert too_long["state"] == "pending"
        assert "this task (usually 5m) would not end by then" in too_long["pending_reason"]
        # Work sure to end before then may use the free GPU meanwhile.
        short = await submit(echo(1, timeout=10), by=other)
        assert short["worker_id"] == "w2"

        # The estimates count the hold: the held task starts at the shadow time (the slots alone would
        # say now), and a task kept off w2 starts nothing there before then.
        shadow_at = json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")["at"]
        shown = await orch.queue_estimate(await orch.store.get(big["task_id"]))
        assert shown is not None and shown["basis"] == "the worker held for it, w2", shown
        assert abs(shown["eta_sec"] - (shadow_at - time.time())) < 2 and shown["eta_sec"] > 20, shown
        # Fresh: the snapshot must hold the short task placed by the other orchestrator.
        views = {view.worker_id: view for view in await orch.scheduler.views(fresh=True)}
        kept = await orch.store.get(unknown["task_id"])
        bearing = await orch.scheduler.backfill.bearing_on(kept.task_id, Request.from_json(kept.request), views)
        assert bearing is not None and (bearing.mine, bearing.keeps_off, bearing.free_at) == (False, True, shadow_at)
        on_w2 = [views["w2"]]
        holdings_of = orch.scheduler.backfill.holdings
        # Without the hold it would take w2's last GPU once the short task gives it back (its timeout).
        unheld = await eta.estimate(
            orch.store, orch.history, on_w2, kept.task_id, kept.request, holdings_of=holdings_of
        )
        assert unheld.eta_sec is not None and 8 < unheld.eta_sec <= 10, unheld
        assert unheld.basis.endswith("; 1 GPU free on w2 then, as its tasks end"), unheld
        kept_off = await eta.estimate(
            orch.store, orch.history, on_w2, kept.task_id, kept.request, bearing, holdings_of=holdings_of
        )
        # On every worker, with the hold replayed on every task: w2 goes to the held task at the shadow
        # time, for its run (a kind never seen: 60 s), so this one takes w1's GPU when its task ends.
        seen = await orch.queue_estimate(kept)
        assert seen is not None and 55 < seen["eta_sec"] <= 61, seen
        assert seen["basis"].endswith("; 1 GPU free on w1 then, as its tasks end"), seen
        assert kept_off.eta_sec is not None and kept_off.eta_sec > 20, kept_off
        assert "not on w2 before the older task held there starts" in kept_off.basis
        shorter = await orch.store.get(short["task_id"])
        admitted = await orch.scheduler.backfill.bearing_on(shorter.task_id, Request.from_json(shorter.request), views)
        assert admitted is not None and not admitted.keeps_off
        # A later pass keeps the hold; the others now wait for a free GPU anywhere.
        await fresh_pass(orch)
        assert json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")["task_id"] == big["task_id"]
        record = await orch.store.get(unknown["task_id"])
        assert record.state == "pending" and (record.pending_reason or "").startswith("waiting for capacity: 0/2")

        # Cancelled: the hold goes.
        for task_id in (unknown["task_id"], too_long["task_id"], big["task_id"]):
            await cancel(orch.store, task_id, by="admin")
        await fresh_pass(orch)
        assert await r.get(keys.BACKFILL_HOLD) is None

        # A new one holds w2 again; when w2's tasks end it is placed there and the hold goes.
        big = await submit(echo(4))
        await asyncio.sleep(AFTER_SEC + 0.05)
        await fresh_pass(orch)
        assert json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")["worker_id"] == "w2"
        for task_id in (soon["task_id"], short["task_id"]):
            assert (await orch.store.transition(task_id, moves.START, expect_worker="w2", new_attempt=True)).ok
            assert (await orch.store.transition(task_id, moves.finish(TaskState.SUCCEEDED), release=True)).ok
        await fresh_pass(orch)
        assert await r.hget(keys.task(big["task_id"]), "worker_id") == "w2"
        assert await r.get(keys.BACKFILL_HOLD) is None

        # No longer fits any worker (both stop taking work): no hold.
        waiting = await submit(echo(4))
        await asyncio.sleep(AFTER_SEC + 0.05)
        await fresh_pass(orch)
        assert json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")["task_id"] == waiting["task_id"]
        for worker_id in ("w1", "w2"):
            await orch.registry.set_status(worker_id, WorkerStatus.DRAINING)
        await fresh_pass(orch)
        assert await r.get(keys.BACKFILL_HOLD) is None
        await r.aclose()

    asyncio.run(scenario())


def test_no_hold_when_reservations_are_off(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_BACKFILL_AFTER_SEC=0))
        await orch.registry.register(registration("w1"))
        await orch.submit(validate(echo(3, timeout=60)), ADMIN)
        big = await orch.submit(validate(echo(4)), ADMIN)
        await asyncio.sleep(0.1)
        await fresh_pass(orch)
        assert await r.get(keys.BACKFILL_HOLD) is None
        orch.scheduler.invalidate()
        assert (await orch.submit(validate(echo(1)), ADMIN))["worker_id"] == "w1"
        reason = (await orch.store.get(big["task_id"])).pending_reason or ""
        assert reason.startswith("waiting for capacity: 0/1 worker fit")
        await r.aclose()

    asyncio.run(scenario())


def test_every_waiting_task_of_an_identical_request_gets_its_own_current_reason(redis_url: str) -> None:
    """A pass tries one of several identical requests; the others still get a current reason: the
    same one where the fleet is full, each its own where the hold keeps them off a worker."""

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_BACKFILL_AFTER_SEC=AFTER_SEC))
        await orch.registry.register(registration("w1"))
        await orch.submit(validate(echo(3, timeout=60)), ADMIN)
        big = await orch.submit(validate(echo(4)), ADMIN)
        await asyncio.sleep(AFTER_SEC + 0.05)
        await fresh_pass(orch)
        assert json.loads(await r.get(keys.BACKFILL_HOLD) or "{}")["task_id"] == big["task_id"]
        # Same request (the timeout lies in the spec, not the request), so a pass tries only the first.
        kept_off = [await orch.submit(validate(echo(1, timeout=t)), ADMIN) for t in (None, 300)]
        for task in kept_off:
            await r.hset(keys.task(task["task_id"]), "pending_reason", "stale")
        await fresh_pass(orch)
        reasons = [(await orch.store.get(task["task_id"])).pending_reason or "" for task in kept_off]
        assert "no run history of its kind and no timeout" in reasons[0], reasons
        assert "this task (usually 5m) would not end by then" in reasons[1], reasons
        # The fleet full: every one of them says so.
        filler = await orch.submit(validate(echo(1, timeout=10)), ADMIN)
        assert filler["worker_id"] == "w1"
        for task in kept_off:
            await r.hset(keys.task(task["task_id"]), "pending_reason", "stale")
        await fresh_pass(orch)
        for task in kept_off:
            reason = (await orch.store.get(task["task_id"])).pending_reason or ""
            assert reason.startswith("waiting for capacity: 0/1 worker fit"), reason
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------------- real orchestrator and worker processes
SHORT_SEC = (0.8, 1.2, 0.9, 1.1, 1.0)  # a stream of 1-GPU tasks of mixed lengths, so they end apart
THRESHOLD_SEC = 2.0
SLACK_SEC = 1.5


class Stream:
    """Keeps a few 1-GPU tasks waiting at all times, from a thread, until stopped."""

    def __init__(self, cluster: LocalCluster, waiting: int = 3) -> None:
        self.client = Client(cluster.api_url)
        self.waiting = waiting
        self.ids: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.client.close()

    def _run(self) -> None:
        submitted = 0
        while not self.stop.is_set():
            pending = self.client.tasks(state="pending", page_size=100)["items"]
            for _ in range(self.waiting - sum(item["task_id"] in self.ids for item in pending)):
                sleep = SHORT_SEC[submitted % len(SHORT_SEC)]
                self.ids.add(self.client.submit(echo(1, sleep=sleep))["task_id"])
                submitted += 1
            self.stop.wait(0.05)


def busy(client: Client, stream: Stream) -> None:
    """Return once the stream holds every GPU of the worker."""
    deadline = time.monotonic() + 30
    while len(client.worker("local-1")["free"]["gpus"]) > 0 or len(stream.ids) < 8:
        assert time.monotonic() < deadline, client.worker("local-1")
        time.sleep(0.1)


def test_a_stream_of_one_gpu_tasks_never_keeps_a_four_gpu_task_out_past_the_threshold(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_BACKFILL_AFTER_SEC": str(THRESHOLD_SEC)}, worker_env=[FOUR_L4])
    client = client_for(cluster)
    with Stream(cluster) as stream:
        busy(client, stream)
        waits = []
        for _ in range(2):
            big = client.submit(echo(4, sleep=0.3))
            assert big["state"] == "pending"
            record = wait_until(client, big["task_id"], lambda rec: rec["started_at"] is not None, 30)
            waits.append(record["started_at"] - record["created_at"])
            assert client.wait(big["task_id"], timeout=30)["state"] == "succeeded"
        # The stream still had work waiting at the end: the big task did not get in for lack of it.
        assert client.tasks(state="pending", page_size=100)["total"] >= 1
    # Held from the threshold on: it starts once the 1-GPU tasks running then end (each at most
    # 1.2 s), with slack for the passes and the processes (about 3.1 s in all here).
    assert all(wait <= THRESHOLD_SEC + max(SHORT_SEC) + SLACK_SEC for wait in waits), waits


def test_without_reservations_the_same_stream_starves_the_four_gpu_task(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    """The test above can fail: with reservations off, the big task waits as long as the stream runs."""
    cluster = make_cluster(1, env={"MLOC_BACKFILL_AFTER_SEC": "0"}, worker_env=[FOUR_L4])
    client = client_for(cluster)
    with Stream(cluster) as stream:
        busy(client, stream)
        big = client.submit(echo(4, sleep=0.3))
        time.sleep(3 * (THRESHOLD_SEC + max(SHORT_SEC) + SLACK_SEC))
        record = client.task(big["task_id"])
        assert record["state"] == "pending", record
        assert record["pending_reason"].startswith("waiting for capacity")
        client.cancel(big["task_id"])


def test_a_short_task_with_history_is_backfilled_onto_the_held_worker_and_a_long_one_is_not(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, env={"MLOC_BACKFILL_AFTER_SEC": "1"}, worker_env=[FOUR_L4])
    client = client_for(cluster)
    # History: how long a short task takes.
    for answer in [client.submit(echo(1, sleep=0.3, topic="tasks.short")) for _ in range(2)]:
        assert client.wait(answer["task_id"], timeout=30)["state"] == "succeeded"
    holder = client.submit(echo(3, sleep=8, topic="tasks.hold"))
    wait_until(client, holder["task_id"], lambda rec: rec["progress"] is not None)
    big = client.submit(echo(4, sleep=0.3, topic="tasks.big"))
    held = wait_until(client, big["task_id"], lambda rec: rec["pending_reason"].startswith("reserved"), 10)
    assert re.fullmatch(
        rf"reserved on local-1 from {CLOCK} \(in \d+s\): waiting for 3 GPUs held by {holder['task_id']}",
        held["pending_reason"],
    ), held["pending_reason"]

    unknown = client.submit(echo(1, sleep=0.3, topic="tasks.new"))
    too_long = client.submit(echo(1, sleep=0.3, topic="tasks.new", timeout=600))
    short = client.submit(echo(1, sleep=0.3, topic="tasks.short"))
    assert short["worker_id"] == "local-1"
    for answer in (unknown, too_long):
        assert answer["state"] == "pending"
        assert f"local-1 is reserved for older task {big['task_id']}" in answer["pending_reason"]
    done = client.wait(short["task_id"], timeout=30)
    assert done["state"] == "succeeded"
    assert client.task(big["task_id"])["state"] == "pending"  # the short one ran while it waited

    records = {t: client.wait(t, timeout=60) for t in (big["task_id"], unknown["task_id"], too_long["task_id"])}
    assert all(rec["state"] == "succeeded" for rec in records.values())
    started = records[big["task_id"]]["started_at"]
    assert done["finished_at"] < started
    assert client.task(holder["task_id"])["finished_at"] <= started
    assert all(records[t]["started_at"] > started for t in (unknown["task_id"], too_long["task_id"]))
