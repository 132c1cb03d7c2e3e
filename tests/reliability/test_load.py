"""Load: 10,000 no-op tasks over 4 workers finish exactly once, and the orchestrator's memory stays bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from mloc import keys
from mloc.localcluster import LocalCluster
from tests.reliability.conftest import (
    FAULT_ENV,
    EventWatcher,
    audit_tasks,
    capacity_problems,
    rss_bytes,
    wait_all_terminal,
)

TOTAL = 10_000
SINGLE = 500  # submitted one request each, concurrently; the rest through the bulk endpoint in chunks
CHUNK = 500
MiB = 1024 * 1024


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append(rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def usage_of(r: redis.Redis, owner: str, days: set[str]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for day in days:
        for name, value in r.hgetall(keys.usage_day(owner, day)).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def test_ten_thousand_tasks_complete_exactly_once_with_bounded_memory(
    make_cluster: Callable[..., LocalCluster], redis_url: str, tmp_path: Path
) -> None:
    cluster = make_cluster(4, env={**FAULT_ENV, "LOG_LEVEL": "WARNING", "MLOC_WORKER_SLOTS": "16"})
    assert cluster.orchestrator is not None
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    api = httpx.Client(base_url=cluster.api_url, timeout=120)
    # Warm up (imports, connection pools, first placements) before the baseline is taken.
    warm = [t["task_id"] for t in api.post("/api/v1/tasks/bulk", json=[{"taskType": "echo"}] * 50).json()["tasks"]]
    wait_all_terminal(r, warm, 60)
    time.sleep(1)
    before = rss_bytes(cluster.orchestrator.pid)
    days = {datetime.now(UTC).strftime("%Y-%m-%d")}
    usage_before = usage_of(r, "admin", days)

    ids: list[str] = []
    with EventWatcher(redis_url) as watcher, RssSampler(cluster.orchestrator.pid) as sampler:
        started = time.perf_counter()

        def single(n: int) -> str:
            response = api.post("/api/v1/tasks", content=f"taskType: echo\npayload: {n}\n")
            assert response.status_code == 201, response.text
            return str(response.json()["task_id"])

        with ThreadPoolExecutor(8) as pool:
            singles = pool.map(single, range(SINGLE))
            for offset in range(SINGLE, TOTAL, CHUNK):
                batch = [{"taskType": "echo", "payload": n} for n in range(offset, min(TOTAL, offset + CHUNK))]
                response = api.post("/api/v1/tasks/bulk", json={"tasks": batch})
                assert response.status_code == 201, response.text
                ids += [t["task_id"] for t in response.json()["tasks"]]
            ids += list(singles)
        submitted = time.perf_counter() - started
        wait_all_terminal(r, ids, 240)
        elapsed = time.perf_counter() - started
    time.sleep(2)  # let the orchestrator settle after the burst
    after = rss_bytes(cluster.orchestrator.pid)
    days.add(datetime.now(UTC).strftime("%Y-%m-%d"))
    api.close()

    assert len(set(ids)) == TOTAL
    report = audit_tasks(r, ids, watcher=watcher, results_dir=tmp_path / "results")
    assert watcher.missed() == 0
    assert report.problems == [], report.problems[:10]
    assert report.states == {"succeeded": TOTAL} and report.attempts == {1: TOTAL}
    assigned = watcher.count("assigned")
    assert all(assigned[t] == 1 for t in ids), "a task was placed more than once"
    # Usage is written in the same atomic step as the final transition: counted once per task.
    usage = usage_of(r, "admin", days)
    assert usage["state.succeeded"] - usage_before.get("state.succeeded", 0) == TOTAL
    assert usage["tasks"] - usage_before.get("tasks", 0) == TOTAL
    assert capacity_problems(r) == []
    peak = max(sampler.samples)
    print(
        f"\n{TOTAL} echo tasks over 4 workers: submitted in {submitted:.1f}s, all succeeded in {elapsed:.1f}s "
        f"({TOTAL / elapsed:.0f} tasks/s); orchestrator RSS {before / MiB:.0f} MiB before, "
        f"{peak / MiB:.0f} MiB peak, {after / MiB:.0f} MiB after (+{(after - before) / MiB:.1f} MiB)"
    )
    assert peak - before < 150 * MiB
    assert after - before < 60 * MiB
