"""Redis and the orchestrator killed and started again under load: no acknowledged task is lost, none
runs to completion twice, and every process finds its way back without help."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from mloc import keys
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.conftest import FAST_ENV, RedisServer
from tests.reliability.conftest import (
    FAULT_ENV,
    EventWatcher,
    audit_tasks,
    capacity_problems,
    restart_orchestrator,
    wait_all_terminal,
)
from tests.support.redislink import LossyLink

TASK = b"taskType: echo\nretries: 20\nhyperparameters: {sleep_sec: 0.3}\n"


class Submitter:
    """Submits tasks at a steady pace from a thread; remembers which submits were acknowledged."""

    def __init__(self, api_url: str, pace_sec: float = 0.03) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=30)
        self.pace_sec = pace_sec
        self.acked: list[str] = []
        self.refused: list[str] = []
        self.acked_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.pace_sec):
            try:
                response = self.http.post("/api/v1/tasks", content=TASK, headers={"Content-Type": "text/yaml"})
            except httpx.HTTPError as exc:
                self.refused.append(type(exc).__name__)
                continue
            if response.status_code == 201:
                self.acked.append(response.json()["task_id"])
                self.acked_at.append(time.monotonic())
            else:
                assert response.status_code == 503, response.text  # a clear "unavailable", never a 500
                self.refused.append(str(response.status_code))

    def __enter__(self) -> Submitter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.http.close()

    def acked_after(self, moment: float) -> int:
        return sum(1 for at in self.acked_at if at > moment)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(aof_redis: RedisServer, tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(
        home=tmp_path / "home",
        workers=4,
        redis_url=aof_redis.url,
        results_dir=tmp_path / "results",
        env={**FAST_ENV, **FAULT_ENV},
        log_dir=tmp_path / "logs",
    )
    local.start(timeout=60)
    yield local
    local.stop()


def wait_state(r: redis.Redis, task_id: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while r.hget(keys.task(task_id), "state") != state:
        assert time.monotonic() < deadline, (
            f"task {task_id} is not {state} after {timeout}s: {r.hgetall(keys.task(task_id))}"
        )
        time.sleep(0.05)


def active_workers(r: redis.Redis) -> set[str]:
    return {w for w in r.zrange(keys.WORKERS, 0, -1) if r.hget(keys.worker(w), "status") == "active"}


def test_no_acknowledged_task_is_lost_when_redis_is_killed_and_restarted(
    cluster: LocalCluster, aof_redis: RedisServer, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(aof_redis.url, decode_responses=True, retry_on_timeout=True)
    with EventWatcher(aof_redis.url) as watcher:  # read until every task has ended
        with Submitter(cluster.api_url) as load:
            time.sleep(3)
            assert aof_redis.proc is not None
            aof_redis.proc.send_signal(signal.SIGKILL)  # no shutdown save: only the fsynced AOF survives
            aof_redis.proc.wait()
            down_at = time.monotonic()
            time.sleep(2)
            aof_redis.start()
            back_at = time.monotonic()
            time.sleep(4)
        assert load.acked_after(back_at) > 0, "no submit was acknowledged after Redis came back"
        ids = load.acked
        counts = wait_all_terminal(r, ids, 90, watcher)
    assert counts == {"succeeded": len(ids)}, counts
    report = audit_tasks(r, ids, results_dir=tmp_path / "results")
    assert report.problems == [], report.problems[:10]
    succeeded = watcher.count("succeeded")
    assert all(succeeded[t] <= 1 for t in ids), "a task succeeded twice"
    # Orchestrator and workers reconnected by themselves: ready, all workers heartbeating as active.
    assert httpx.get(f"{cluster.api_url}/readyz").status_code == 200
    assert active_workers(r) == set(cluster.worker_procs)
    assert all(proc.poll() is None for proc in [cluster.orchestrator, *cluster.worker_procs.values()] if proc)
    time.sleep(1)
    assert capacity_problems(r) == []
    # The workers' control channels came back too: a running task can still be cancelled.
    http = httpx.Client(base_url=cluster.api_url, timeout=30)
    long = http.post("/api/v1/tasks", content=b"taskType: echo\nhyperparameters: {sleep_sec: 60, steps: 240}\n").json()
    wait_state(r, long["task_id"], "running", 20)
    assert http.post(f"/api/v1/tasks/{long['task_id']}/cancel").json()["state"] == "cancelling"
    wait_state(r, long["task_id"], "cancelled", 10)
    http.close()
    print(
        f"\n{len(ids)} acknowledged ({load.acked_after(back_at)} after the restart), {len(load.refused)} refused "
        f"during the {back_at - down_at:.1f}s outage: {sorted(set(load.refused))}; "
        f"attempts {dict(sorted(report.attempts.items()))}"
    )


def test_orchestrator_killed_under_load_loses_and_duplicates_nothing(cluster: LocalCluster, redis_url: str) -> None:
    r = redis.Redis.from_url(cluster.redis_url or "", decode_responses=True)
    assert cluster.orchestrator is not None
    # The watcher reads until every task has ended: it must see every move, the last ones included.
    with EventWatcher(cluster.redis_url or "") as watcher:
        with Submitter(cluster.api_url) as load:
            time.sleep(3)
            cluster.orchestrator.send_signal(signal.SIGKILL)
            cluster.orchestrator.wait()
            before_restart = len(load.acked)
            time.sleep(1)
            restart_orchestrator(cluster)
            back_at = time.monotonic()
            time.sleep(3)
        assert before_restart > 0 and load.acked_after(back_at) > 0
        # Every task that reached Redis, acknowledged or not (a submit cut off by the kill), ends once.
        stored = r.zrange(keys.TASKS_ALL, 0, -1)
        assert set(load.acked) <= set(stored)
        counts = wait_all_terminal(r, stored, 90, watcher)
    assert counts == {"succeeded": len(stored)}, counts
    report = audit_tasks(r, stored, watcher=watcher)
    assert watcher.missed() == 0
    assert report.problems == [], report.problems[:10]
    assert capacity_problems(r) == []
    print(
        f"\n{len(stored)} stored, {len(load.acked)} acknowledged, {len(load.refused)} refused while the "
        f"orchestrator was down; attempts {dict(sorted(report.attempts.items()))}"
    )


def test_tasks_finishing_while_redis_refuses_writes_are_not_stranded(
    make_cluster: Callable[..., LocalCluster], redis_url: str
) -> None:
    cluster = make_cluster(1, env=FAULT_ENV, worker_env=[{"MLOC_WORKER_SLOTS": "4"}])
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        task = {"taskType": "echo", "retries": 5, "hyperparameters": {"sleep_sec": 1.0}}
        ids = [t["task_id"] for t in http.post("/api/v1/tasks/bulk", json=[task] * 8).json()["tasks"]]
        wait_state(r, ids[0], "running", 20)
        # Redis at its memory limit answers every write with OOM (a RedisError that no retry clears) while
        # the first four finish and the next four are handed out; then it has room again.
        r.config_set("maxmemory", 1)
        time.sleep(1.5)
        r.config_set("maxmemory", 0)
        counts = wait_all_terminal(r, ids, 15)
    assert counts == {"succeeded": len(ids)}, counts
    assert capacity_problems(r) == []


def test_a_worker_told_to_stop_while_redis_is_gone_stops_within_seconds(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    local = LocalCluster(
        home=tmp_path / "home",
        workers=1,
        redis_url=server.url,
        results_dir=tmp_path / "results",
        env=FAST_ENV,
        log_dir=tmp_path / "logs",
    )
    try:
        local.start(timeout=60)
        worker = local.worker_procs["local-1"]
        server.stop()
        time.sleep(1)  # its reads are failing and being retried now
        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        took = time.monotonic() - asked
        # Its own records it leaves to the reaper rather than retry them for half a minute each.
        assert took < 10, f"the worker took {took:.1f}s to stop"
        assert worker.returncode == 0
        said = (tmp_path / "logs" / "local-1.log").read_text()
        assert "Redis is unavailable while stopping" in said and "worker local-1 stopped" in said, said[-2000:]
    finally:
        local.stop()
        server.stop()


def test_a_worker_whose_link_to_redis_is_cut_says_so_and_carries_on_once_it_is_back(
    redis_url: str, tmp_path: Path
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with LossyLink(port) as link:
        local = LocalCluster(
            home=tmp_path / "home",
            workers=0,
            redis_url=redis_url,
            results_dir=tmp_path / "results",
            env=FAST_ENV | {"HEARTBEAT_TTL_SEC": "60"},
            log_dir=tmp_path / "logs",
        )
        try:
            local.start(timeout=60)
            local.add_worker("cut-off", {"REDIS_URL": link.url})
            local.wait_ready(60)
            log = tmp_path / "logs" / "cut-off.log"
            link.cut.set()  # nothing passes, nothing closes: its writes wait on a silent connection
            deadline = time.monotonic() + 40
            while "heartbeat: Redis did not answer within 10s (network?); trying again" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            link.cut.clear()
            # Back: it heartbeats again and runs what it is given.
            client = Client(local.api_url)
            task_id = client.submit(b"taskType: echo\n")["task_id"]
            assert client.wait(task_id, timeout=60)["state"] == "succeeded"
            assert client.task(task_id)["worker_id"] == "cut-off"
        finally:
            local.stop()


def test_health_checks_answer_at_once_while_redis_is_away(tmp_path: Path) -> None:
    """A liveness probe is answered within its timeout whatever Redis does; readiness says it is away."""
    server = RedisServer(tmp_path / "redis").start()
    local = LocalCluster(
        home=tmp_path / "home", workers=0, redis_url=server.url, env=FAST_ENV, log_dir=tmp_path / "logs"
    )
    try:
        local.start(timeout=60)
        assert httpx.get(local.api_url + "/readyz", timeout=10).status_code == 200
        server.stop()
        for path, status, said in (("/healthz", 200, "unreachable"), ("/readyz", 503, "redis unreachable")):
            asked = time.monotonic()
            answer = httpx.get(local.api_url + path, timeout=10)
            took = time.monotonic() - asked
            assert took < 3, f"{path} took {took:.1f}s with Redis away"
            assert answer.status_code == status and said in answer.text, answer.text
    finally:
        local.stop()
        server.stop()
