"""Two orchestrator processes on one Redis: both schedulers race to place the same queue of tasks.

Workers have two slots each, so most tasks wait and every scheduling pass of either orchestrator competes
for the same pending tasks and the same free slots. Each task must be placed once, run once (one attempt,
one assigned and one running transition in the event stream) and no worker may ever hold more tasks than
its slots.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from mloc import keys
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.conftest import FAST_ENV

SLOTS = 2
WORKERS = ("replica-w1", "replica-w2")


def task(i: int) -> dict:
    return {"taskType": "echo", "payload": i, "hyperparameters": {"sleep_sec": 0.1}}


def tcp_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds (to tell which process sent a command)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_two_orchestrators_never_place_a_task_twice_nor_oversubscribe_a_worker(
    redis_url: str, sync_redis: redis.Redis, tmp_path: Path, client_for: Callable[..., Client]
) -> None:
    env = {**FAST_ENV, "MLOC_SCHEDULE_INTERVAL_SEC": "0.05", "MLOC_WORKER_SLOTS": str(SLOTS)}
    first = LocalCluster(
        home=tmp_path / "a", workers=0, redis_url=redis_url, results_dir=tmp_path / "results", env=env,
        log_dir=tmp_path / "logs-a",
    )  # fmt: skip
    second = LocalCluster(home=tmp_path / "b", workers=0, redis_url=redis_url, env=env, log_dir=tmp_path / "logs-b")
    try:
        first.start(timeout=60)
        second.start(timeout=60)
        for worker in WORKERS:
            first.add_worker(worker)
        first.wait_ready(60)
        clients = [client_for(first), client_for(second)]

        # Capacity watch: a worker's free slots never go below zero, nor its task set above its slots.
        worst: dict[str, tuple[int, int]] = {w: (SLOTS, 0) for w in WORKERS}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for worker in WORKERS:
                    free = int(sync_redis.hget(keys.worker(worker), "slots_free") or SLOTS)
                    held = sync_redis.scard(keys.worker_tasks(worker))
                    low, high = worst[worker]
                    worst[worker] = (min(low, free), max(high, held))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()

        # Which connection asked Redis to place each task (the move "place" sent to the transition script).
        placements: list[int] = []

        def monitor() -> None:
            with redis.Redis.from_url(redis_url).monitor() as feed:
                for command in feed.listen():
                    if stop.is_set():
                        return
                    # A batch of moves is one call: each placement in it counts.
                    count = command["command"].count('{"move":"place"')
                    if count:
                        placements.extend([int(command["client_port"])] * count)

        threading.Thread(target=monitor, daemon=True).start()
        time.sleep(0.2)

        # Singles alternate between the orchestrators; two bulk requests, one to each, arrive at once.
        def singles(offset: int) -> list[str]:
            ids = []
            for i in range(30):
                ids.append(clients[i % 2].submit(json.dumps(task(offset + i)).encode())["task_id"])
            return ids

        def bulk(which: int, offset: int) -> list[str]:
            answer = clients[which].submit_bulk([task(offset + i) for i in range(20)])
            return [item["task_id"] for item in answer["tasks"]]

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(singles, 0), pool.submit(singles, 100), pool.submit(bulk, 0, 200),
                       pool.submit(bulk, 1, 300)]  # fmt: skip
            ids = [task_id for future in futures for task_id in future.result()]
        assert len(ids) == len(set(ids)) == 100

        records = [clients[0].wait(task_id, timeout=120) for task_id in ids]
        stop.set()
        watcher.join()

        assert Counter(r["state"] for r in records) == {"succeeded": 100}, [r.get("reason") for r in records][:5]
        assert {r["attempts"] for r in records} == {1}
        # The event stream has one placement and one start per task, whichever orchestrator placed it.
        moves = Counter(
            (fields["task"], fields["to"]) for _, fields in sync_redis.xrange(keys.EVENTS) if fields["task"] in set(ids)
        )
        assert {moves[(task_id, "assigned")] for task_id in ids} == {1}
        assert {moves[(task_id, "running")] for task_id in ids} == {1}
        assert {clients[1].result(task_id)["attempt"] for task_id in ids} == {1}
        used = Counter(r["worker_id"] for r in records)
        assert set(used) == set(WORKERS) and sum(used.values()) == 100

        for worker in WORKERS:
            low, high = worst[worker]
            assert low >= 0 and high <= SLOTS, (worker, low, high)
            spans = [(r["started_at"], r["finished_at"]) for r in records if r["worker_id"] == worker]
            assert max_overlap(spans) <= SLOTS
            assert int(sync_redis.hget(keys.worker(worker), "slots_free")) == SLOTS  # all released
        # Both orchestrators placed tasks, so their schedulers really raced for the same queue and slots.
        assert first.orchestrator is not None and second.orchestrator is not None
        by_first = sum(port in tcp_ports(first.orchestrator.pid) for port in placements)
        by_second = sum(port in tcp_ports(second.orchestrator.pid) for port in placements)
        assert by_first > 0 and by_second > 0, (by_first, by_second, len(placements))
        assert by_first + by_second == len(placements) >= 100  # failed tries (capacity taken meanwhile) included
    finally:
        second.stop()
        first.stop()
