"""Cordoning a worker from the control plane: no new task is placed on it, what it runs finishes
there, uncordon (or a restart) places tasks on it again; over real HTTP with real workers."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from mloc import keys
from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster
from tests.support.api import wait_until
from tests.support.cli import mloc

TOKEN = "cordon-admin"
SLEEPY = {"taskType": "echo", "hyperparameters": {"sleep_sec": 3, "steps": 3}}


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(2, env={"ORCHESTRATOR_TOKEN": TOKEN})


def _worker_of(client: Client, task_id: str) -> str:
    record = wait_until(client, task_id, lambda r: r["state"] in ("running", "succeeded") and bool(r.get("worker_id")))
    return str(record["worker_id"])


def test_a_cordoned_worker_takes_nothing_new_and_finishes_what_it_runs(cluster: LocalCluster) -> None:
    admin = Client(cluster.api_url, TOKEN)
    running = admin.submit(SLEEPY)["task_id"]
    busy = _worker_of(admin, running)
    other = ({"local-1", "local-2"} - {busy}).pop()

    answer = admin.cordon_worker(busy)
    assert answer == {"ok": True, "worker_id": busy, "cordoned": True, "status": "draining", "was": "active"}
    shown = admin.worker(busy)
    assert shown["status"] == "draining" and shown["cordoned"] is True
    # Every new task goes to the other worker; the running one ends where it runs.
    placed = {_worker_of(admin, admin.submit({"taskType": "echo"})["task_id"]) for _ in range(6)}
    assert placed == {other}
    assert admin.wait(running, timeout=60)["state"] == "succeeded"
    assert admin.task(running)["worker_id"] == busy

    again = admin.cordon_worker(busy)  # asking twice is no error
    assert again["was"] == "draining"
    admin.cordon_worker(busy, on=False)
    assert admin.worker(busy)["status"] == "active" and admin.worker(busy)["cordoned"] is False
    deadline = time.monotonic() + 30
    seen: set[str] = set()
    while seen != {"local-1", "local-2"}:
        assert time.monotonic() < deadline, seen
        seen.add(_worker_of(admin, admin.submit(SLEEPY | {"hyperparameters": {"sleep_sec": 0.5}})["task_id"]))


def test_with_every_worker_cordoned_a_task_waits_and_says_why(cluster: LocalCluster) -> None:
    admin = Client(cluster.api_url, TOKEN)
    for worker in ("local-1", "local-2"):
        admin.cordon_worker(worker)
    task_id = admin.submit({"taskType": "echo"})["task_id"]
    record = wait_until(admin, task_id, lambda r: bool(r.get("pending_reason")))
    assert record["state"] == "pending" and not record.get("unschedulable")
    assert record["pending_reason"].startswith("no worker takes new tasks: 2 draining (local-1, local-2)")
    assert "mloc workers uncordon ID" in record["pending_reason"]
    admin.cordon_worker("local-2", on=False)
    assert admin.wait(task_id, timeout=60)["worker_id"] == "local-2"


def test_only_the_admin_cordons_and_only_a_live_worker(cluster: LocalCluster) -> None:
    admin = Client(cluster.api_url, TOKEN)
    user = Client(cluster.api_url, admin.add_user("carla")["token"])
    with pytest.raises(ApiError) as refused:
        user.cordon_worker("local-1")
    assert refused.value.status_code == 403
    with pytest.raises(ApiError) as missing:
        admin.cordon_worker("no-such-worker")
    assert missing.value.status_code == 404
    assert admin.cordon_worker("local-1", on=False)["was"] == "active"  # not cordoned: nothing to undo
    with pytest.raises(ApiError, match=r"is draining \(it is stopping by itself\); .* only a cordoned one uncordoned"):
        _uncordon_stopping(admin, cluster)
    cluster.stop_worker("local-1")
    with pytest.raises(ApiError, match="worker local-1 is offline; only an active worker can be cordoned"):
        admin.cordon_worker("local-1")


def _uncordon_stopping(admin: Client, cluster: LocalCluster) -> None:
    """A worker draining because it stops is not the admin's to put back."""
    redis.Redis.from_url(cluster.redis_url).hset(keys.worker("local-2"), "status", "draining")
    try:
        admin.cordon_worker("local-2", on=False)
    finally:
        redis.Redis.from_url(cluster.redis_url).hset(keys.worker("local-2"), "status", "active")


def test_the_cli_cordons_and_lists_it(cluster: LocalCluster) -> None:
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": TOKEN}
    done = mloc("workers", "cordon", "local-1", env=env)
    assert done.returncode == 0 and done.stdout.strip() == "worker local-1 cordoned: no new task is placed on it"
    again = mloc("workers", "cordon", "local-1", env=env)
    assert again.stdout.strip() == "worker local-1 already cordoned: no new task is placed on it"
    [row] = [line for line in mloc("workers", env=env).stdout.splitlines() if line.lstrip().startswith("local-1 ")]
    assert "draining (cordoned)" in row
    undone = mloc("workers", "uncordon", "local-1", env=env)
    assert undone.stdout.strip() == "worker local-1 uncordoned: tasks are placed on it again"
    missing = mloc("workers", "cordon", "nope", env=env)
    assert missing.returncode == 2 and "worker nope not found" in missing.stderr
