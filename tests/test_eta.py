"""A waiting task's queue position and start estimate, on a real cluster: replayed from the running
tasks and the usual durations of past tasks of the same kind."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.orchestrator import eta
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.settings import Settings
from mloc.spec import validate
from tests.support import fleet


def echo(sleep: float, topic: str = "tasks.echo") -> dict[str, Any]:
    return {"taskType": "echo", "topic": topic, "hyperparameters": {"sleep_sec": sleep}}


def wait_started(client: Client, task_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (record := client.task(task_id))["started_at"] is None:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    return record


def test_a_waiting_task_knows_its_place_and_about_when_it_starts(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "2"}])
    client = client_for(cluster)
    # History: how long this kind of task takes.
    for answer in [client.submit(echo(1.0)) for _ in range(2)]:
        assert client.wait(answer["task_id"], timeout=30)["state"] == "succeeded"

    ids = [client.submit(echo(1.0))["task_id"] for _ in range(6)]
    asked: list[float] = []  # when each estimate was read: it counts from then
    waiting = []
    for task_id in ids[2:]:
        asked.append(time.time())
        waiting.append(client.task(task_id))
    assert [w["state"] for w in waiting] == ["pending"] * 4
    queues = [w["queue"] for w in waiting]
    assert [q["position"] for q in queues] == [1, 2, 3, 4]
    assert [q["ahead"] for q in queues] == [0, 1, 2, 3]
    assert all(q["basis"] == "history" for q in queues)
    etas = [q["eta_sec"] for q in queues]
    told = [at + eta for at, eta in zip(asked, etas, strict=True)]
    # Two slots, each task about a second: the first two start as the running two end (within about a
    # second of being asked), the next two about a second later. In order, but for the rounding of
    # estimates to 0.1 s.
    in_order = all(later >= sooner - 0.15 for sooner, later in itertools.pairwise(told))
    assert in_order and etas[0] <= 1.6 and 0.5 <= told[3] - told[0] <= 1.6, (etas, asked)
    starts = [wait_started(client, task_id)["started_at"] for task_id in ids[2:]]
    errors = [abs(start - at) for start, at in zip(starts, told, strict=True)]
    assert max(errors) < 1.5, (starts, told)

    # The list shows each waiting task's place.
    listed = client.http.get("/api/v1/tasks", params={"state": "pending"}).json()["items"]
    assert all(item.get("queue_position") is None or item["queue_position"] >= 1 for item in listed)


def test_gpu_tasks_ahead_are_replayed_on_the_gpus_not_the_slots(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "8", "MLOC_WORKER_GPUS": "NVIDIA L4:4:24576"}])
    client = client_for(cluster)

    def whole_worker(timeout: float | None = None) -> dict[str, Any]:
        task = echo(30.0) | {"resources": {"hardware": {"gpu": {"count": 4}}}}
        return task | ({"timeout_sec": timeout} if timeout else {})

    running = client.submit(whole_worker(timeout=30))["task_id"]
    wait_started(client, running)
    ahead = client.submit(whole_worker())["task_id"]
    mine = client.submit(whole_worker())["task_id"]
    queue = client.task(mine)["queue"]
    # Seven slots are free all along: counted in slots, both would start when the running task ends
    # (by its 30 s timeout). On the GPUs, the one ahead takes all four then, for a run of a kind never
    # seen (60 s), and this one starts after it.
    assert queue["ahead"] == 1, queue
    assert 85 < queue["eta_sec"] <= 90, queue
    assert queue["basis"] == "no history; 4 GPUs free on local-1 then, as its tasks end", queue
    for task_id in (mine, ahead, running):
        client.cancel(task_id)


def test_a_big_task_in_a_stream_of_small_ones_is_told_when_its_backfill_hold_lets_it_start(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(
        1,
        env={"MLOC_BACKFILL_AFTER_SEC": "20"},
        worker_env=[{"MLOC_WORKER_SLOTS": "16", "MLOC_WORKER_GPUS": "NVIDIA L4:4:24576"}],
    )
    client = client_for(cluster)

    def gpus(count: int, timeout: float | None = None) -> dict[str, Any]:
        task = echo(60.0) | {"resources": {"hardware": {"gpu": {"count": count}}}}
        return task | ({"timeout_sec": timeout} if timeout else {})

    running = [client.submit(gpus(1, timeout=30))["task_id"] for _ in range(4)]
    for task_id in running:
        wait_started(client, task_id)
    big = client.submit(gpus(4))["task_id"]
    small = [client.submit(gpus(1))["task_id"] for _ in range(8)]
    queue = client.task(big)["queue"]
    # The four running tasks end by their 30 s timeouts. Taken as a pass takes them, the eight one-GPU
    # tasks behind would get those GPUs (the big one does not fit while one is busy) for two rounds of a
    # kind never seen (60 s each): a start at about +150 s. But by then the big task has waited the
    # 20 s after which a pass gives it a hold, so the GPUs freed from +30 s are kept for it.
    assert 27 < queue["eta_sec"] <= 31, queue
    assert "local-1 held for it once it has waited 20s" in queue["basis"], queue
    # A small one behind waits for the big one's run: kept off the held GPUs until then.
    assert client.task(small[0])["queue"]["eta_sec"] > 85
    for task_id in (*small, big, *running):
        client.cancel(task_id)


def test_another_users_task_behind_a_backlog_is_told_when_fair_share_lets_it_in(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "2"}])
    client = client_for(cluster)

    def owned(owner: str) -> dict[str, Any]:
        return echo(1.0) | {"metadata": {"owner": owner}}

    for answer in [client.submit(owned("alice")) for _ in range(2)]:  # history: about 1 s each
        assert client.wait(answer["task_id"], timeout=30)["state"] == "succeeded"
    backlog = [task["task_id"] for task in client.submit_bulk([owned("alice") for _ in range(10)])["tasks"]]
    bob = client.submit(owned("bob"))["task_id"]
    submitted = time.time()
    queue = client.task(bob)["queue"]
    # Ninth in the queue on two slots of 1 s tasks: about 5 s in queue order. But alice holds both
    # slots and bob nothing, so a pass gives bob the first slot that frees: within about a second.
    assert queue["position"] >= 7 and queue["eta_sec"] <= 1.3, queue
    started = wait_started(client, bob)["started_at"] - submitted
    assert abs(started - queue["eta_sec"]) < 1.0, (started, queue)
    for task_id in backlog:
        if client.task(task_id)["state"] == "pending":
            client.cancel(task_id)


def test_an_estimate_behind_more_tasks_than_it_replays_says_so(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eta, "AHEAD_LIMIT", 2)

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(fleet.registration("w1", slots=1, gpus=0, cpu=8000, memory=1 << 34))
        answers = [await orch.submit(validate(echo(30.0)), Principal("admin", admin=True)) for _ in range(5)]
        assert answers[0]["worker_id"] == "w1" and all(a["state"] == "pending" for a in answers[1:])
        first, last = [await orch.store.get(answer["task_id"]) for answer in (answers[1], answers[-1])]
        shown = await orch.queue_estimate(last)
        assert shown is not None and shown["ahead"] == 2, shown
        assert "; only the first 2 of the 3 tasks waiting ahead were counted;" in shown["basis"], shown
        near = await orch.queue_estimate(first)
        assert near is not None and "only the first" not in near["basis"], near
        await r.aclose()

    asyncio.run(scenario())


def test_show_prints_the_queue_line(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "1"}])
    client = client_for(cluster)
    client.submit(echo(5.0))
    behind = client.submit(echo(0.1, topic="tasks.other"))["task_id"]
    shown = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "show", behind],
        env={"MLOC_API_URL": cluster.api_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "position 1, 0 ahead on its workers, starts in about" in shown.stdout
    # Nothing says when the running task ends: it is counted as a kind never seen, and the line says so.
    assert "(no history; 1 task has no known end on local-1 (counted as 1m from now))" in shown.stdout


@pytest.mark.parametrize("seconds, text", [(12, "12s"), (600, "10 min"), (7200, "2.0 h")])
def test_durations_read_naturally(seconds: float, text: str) -> None:
    from mloc.cli.tasks import _duration

    assert _duration(seconds) == text
