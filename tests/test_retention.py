"""Bounded memory: task logs expire by age, and finished tasks are removed after their retention."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.artifacts import ArtifactStore
from mloc.localcluster import LocalCluster
from mloc.orchestrator import pipelines
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.reaper import forget_finished
from mloc.orchestrator.users import Principal
from mloc.removals import FolderSweeper, StoreSweeper
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import TaskState
from tests.conftest import free_port

ADMIN = Principal("admin", admin=True)
# Ends a task that is still waiting, so a test can make finished tasks without a worker.
FAIL_WAITING = moves.Move("fail_waiting", TaskState.FAILED, frozenset({TaskState.PENDING}))


def sleeper(seconds: float, steps: int, owner: str = "alice") -> dict[str, object]:
    return {"taskType": "echo", "metadata": {"owner": owner}, "hyperparameters": {"sleep_sec": seconds, "steps": steps}}


def wait_state(http: httpx.Client, task_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/tasks/{task_id}").json()
        if body.get("state") == state:
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never became {state}: {body}")


def test_forget_finished_removes_everything_of_old_finished_tasks_only(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        ids = [(await orch.submit(validate(sleeper(0, 1)), ADMIN))["task_id"] for _ in range(5)]
        old, recent, waiting = ids[:3], ids[3], ids[4]
        now = time.time()
        for task_id in [*old, recent]:
            ended = now + (500 if task_id == recent else 0)
            done = await orch.store.transition(
                task_id,
                moves.CANCEL if task_id == old[2] else FAIL_WAITING,
                fields={"finished_at": repr(ended)},
                result={"ok": False},
            )
            assert done.ok
            await r.xadd(keys.task_logs(task_id), {"message": "a line"})
            await r.rpush(keys.task_metrics(task_id), "{}")
        # Seen from 1000 s in the future with a 600 s retention: the cut-off is now + 400.
        removed = await forget_finished(orch.store, older_than_sec=600, now=now + 1000)
        assert sorted(removed) == sorted(old)
        for task_id in old:
            assert not await r.exists(
                keys.task(task_id), keys.task_result(task_id), keys.task_logs(task_id), keys.task_metrics(task_id)
            )
            assert await r.zscore(keys.TASKS_ALL, task_id) is None
            assert await r.zscore(keys.tasks_of_owner("alice"), task_id) is None
            for state in TaskState:
                assert await r.zscore(keys.tasks_in_state(state), task_id) is None
        assert await r.exists(keys.task(recent), keys.task(waiting)) == 2
        _, total, _ = await orch.store.page(page=1, page_size=10)
        assert total == 2
        assert await forget_finished(orch.store, older_than_sec=600, now=now + 1000) == []
        # At most ``limit`` per call, the rest on the next.
        assert len(await forget_finished(orch.store, older_than_sec=0, now=now + 600, limit=1)) == 1
        await r.aclose()

    asyncio.run(scenario())


def test_a_pipelines_graph_is_removed_with_its_last_task(redis_url: str) -> None:
    def step(name: str, after: list[str]) -> dict[str, object]:
        spec = {"taskType": "echo", "dependsOn": after}
        return {"apiVersion": "mloc/v1", "kind": "EchoTask", "metadata": {"name": name, "owner": "alice"}, "spec": spec}

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        made = await orch.submit_graph([validate(step("first", [])), validate(step("then", ["first"]))], ADMIN)
        pipeline_id = made["pipeline_id"]
        first, then = (task["task_id"] for task in made["tasks"])
        # Submitted by the admin for alice, the pipeline is alice's, as its tasks are.
        owner = "alice"
        assert (await orch.store.get(first, with_spec=False)).owner == owner
        assert (await pipelines.graph(orch.store, pipeline_id, Principal(owner, admin=False)))["id"] == pipeline_id
        now = time.time()
        for task_id, ended in ((first, now), (then, now + 500)):
            done = await orch.store.transition(task_id, FAIL_WAITING, fields={"finished_at": repr(ended)})
            assert done.ok, done
        graph_keys = (keys.pipeline(pipeline_id),)

        async def indexed() -> list[object]:
            return [
                await r.zscore(keys.PIPELINES, pipeline_id),
                await r.zscore(keys.pipelines_of_owner(owner), pipeline_id),
            ]

        assert await r.exists(*graph_keys) == 1 and None not in await indexed()
        # Its first step is old enough to go; the graph stays while a step is left.
        assert await forget_finished(orch.store, older_than_sec=600, now=now + 1000) == [first]
        assert await r.exists(*graph_keys) == 1 and None not in await indexed()
        assert await forget_finished(orch.store, older_than_sec=600, now=now + 1500) == [then]
        assert await r.exists(*graph_keys) == 0 and await indexed() == [None, None]
        await r.aclose()

    asyncio.run(scenario())


def test_finished_tasks_are_removed_after_the_task_retention(
    make_cluster: Callable[..., LocalCluster], redis_url: str
) -> None:
    cluster = make_cluster(1, env={"MLOC_TASK_RETENTION_SEC": "1.5", "MLOC_REAP_INTERVAL_SEC": "0.3"})
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        never = http.post("/api/v1/tasks", json={**sleeper(0, 1), "resources": {"tags": ["nowhere"]}}).json()
        done = http.post("/api/v1/tasks", json=sleeper(0.3, 3)).json()
        finished = wait_state(http, done["task_id"], "succeeded")
        assert r.exists(keys.task_logs(done["task_id"]), keys.task_result(done["task_id"])) == 2
        deadline = time.monotonic() + 15
        while http.get(f"/api/v1/tasks/{done['task_id']}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        gone_after = time.time() - finished["finished_at"]
        assert http.get(f"/api/v1/tasks/{done['task_id']}").status_code == 404
        assert 1.5 <= gone_after < 5, gone_after
        assert r.exists(keys.task_logs(done["task_id"]), keys.task_result(done["task_id"])) == 0
        assert r.zscore(keys.TASKS_ALL, done["task_id"]) is None
        # A task that never finished is kept however old it is.
        assert http.get(f"/api/v1/tasks/{never['task_id']}").json()["state"] == "pending"


def test_the_result_folders_of_removed_tasks_go_from_every_disk_that_holds_them(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    on_worker = tmp_path / "worker-results"  # the worker's own disk, apart from the orchestrator's
    cluster = make_cluster(
        1,
        env={"MLOC_TASK_RETENTION_SEC": "1.5", "MLOC_REAP_INTERVAL_SEC": "0.3"},
        worker_env=[{"RESULTS_DIR": str(on_worker)}],
    )
    on_orchestrator = tmp_path / "results"
    # Another deployment's task sharing the folder, and a folder that is no task's: neither is this Redis's.
    foreign, notes = on_worker / str(uuid.uuid4()), on_worker / "notes"
    for folder in (foreign, notes):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("mine")
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        done = http.post("/api/v1/tasks", json=sleeper(0, 1)).json()["task_id"]
        wait_state(http, done, "succeeded")
        assert (on_worker / done / "responses.json").is_file()
        (on_orchestrator / done).mkdir(parents=True)  # as a replica group's merged result is kept there
        (on_orchestrator / done / "responses.json").write_text("{}")
        deadline = time.monotonic() + 20
        while ((on_worker / done).exists() or (on_orchestrator / done).exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get(f"/api/v1/tasks/{done}").status_code == 404
    assert not (on_worker / done).exists() and not (on_orchestrator / done).exists()
    assert (foreign / "keep.txt").read_text() == (notes / "keep.txt").read_text() == "mine"


def test_a_process_that_was_down_removes_the_folders_it_missed(redis_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await r.delete(keys.TASKS_REMOVED)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        ids = [(await orch.submit(validate(sleeper(0, 1)), ADMIN))["task_id"] for _ in range(3)]
        for task_id in ids:
            assert (await orch.store.transition(task_id, FAIL_WAITING, fields={"finished_at": "1"})).ok
            (tmp_path / task_id).mkdir()
        # Removed while no process that keeps folders was running; one that starts reads what it missed.
        assert sorted(await forget_finished(orch.store, older_than_sec=60, now=time.time() + 1000)) == sorted(ids)
        sweeper = FolderSweeper(r, tmp_path)
        assert await sweeper.sweep() == 3 and not any((tmp_path / task_id).exists() for task_id in ids)
        assert await sweeper.sweep() == 0  # read once
        await r.aclose()

    asyncio.run(scenario())


def test_task_logs_expire_by_age(make_cluster: Callable[..., LocalCluster], redis_url: str) -> None:
    cluster = make_cluster(1, env={"MLOC_LOG_RETENTION_SEC": "1.5", "MLOC_TASK_RETENTION_SEC": "0"})
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        task_id = http.post("/api/v1/tasks", json=sleeper(3.2, 16)).json()["task_id"]
        wait_state(http, task_id, "running")
        time.sleep(2.6)
        # While it runs, lines older than the retention are trimmed and the stream has a countdown.
        lines = r.xrange(keys.task_logs(task_id))
        oldest_ms = int(lines[0][0].split("-")[0])
        # Entry ids carry Redis's clock, which need not agree with this process's.
        seconds, micros = r.time()
        age_ms = seconds * 1000 + micros / 1000 - oldest_ms
        assert age_ms < 1500 + 700, (age_ms, len(lines))
        assert 0 < r.pttl(keys.task_logs(task_id)) <= 1500
        wait_state(http, task_id, "succeeded")
        assert 0 < r.pttl(keys.task_logs(task_id)) <= 1500
        assert http.get(f"/api/v1/tasks/{task_id}/logs").json()["lines"]
        time.sleep(1.7)
        assert r.exists(keys.task_logs(task_id)) == 0
        assert http.get(f"/api/v1/tasks/{task_id}/logs").json()["lines"] == []
        assert http.get(f"/api/v1/tasks/{task_id}").json()["state"] == "succeeded"  # the record is kept


# ------------------------------------------------------------------- copies in the artifact store
async def old_and_recent(orch: Orchestrator, now: float) -> tuple[str, str]:
    """Two finished tasks: one past a 600 s retention seen from ``now + 1000``, one not."""
    old, recent = [(await orch.submit(validate(sleeper(0, 1)), ADMIN))["task_id"] for _ in range(2)]
    for task_id, ended in ((old, now), (recent, now + 900)):
        assert (await orch.store.transition(task_id, FAIL_WAITING, fields={"finished_at": repr(ended)})).ok
    return old, recent


def publish(store: ArtifactStore, task_id: str, attempt: int, tmp_path: Path) -> None:
    folder = tmp_path / "published" / f"{task_id}-{attempt}"
    (folder / "sub").mkdir(parents=True)
    (folder / "responses.json").write_text("{}")
    (folder / "sub" / "more.txt").write_text("more")
    store.publish(task_id, attempt, "worker-1", folder)


def test_retention_removes_a_tasks_stored_copy_once_and_nothing_else(redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(f"file://{root}")

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        now = time.time()
        old, recent = await old_and_recent(orch, now)
        for task_id, attempt in ((old, 1), (old, 2), (recent, 1)):
            publish(store, task_id, attempt, tmp_path)
        # Another deployment's task sharing the store, a batch's rows and a file that is no task's.
        foreign = str(uuid.uuid4())
        publish(store, foreign, 1, tmp_path)
        (tmp_path / "rows.jsonl").write_text("{}\n")
        store.put_upload(tmp_path / "rows.jsonl", "file-1.rows.jsonl")
        (root / "notes.txt").write_text("mine")
        # Removals that name no task of this Redis's name nothing in the store either.
        for name in ("files", "../store", "notes.txt", foreign.upper(), f"{foreign}\n"):
            await r.xadd(keys.TASKS_REMOVED, {"task": name})
        assert await forget_finished(orch.store, older_than_sec=600, now=now + 1000) == [old]

        # A worker's sweeper leaves the store alone; an orchestrator's removes the copy, every attempt.
        assert await FolderSweeper(r, tmp_path / "worker-results").sweep() == 0
        assert (root / old / "2" / "manifest.json").is_file()
        assert await FolderSweeper(r, tmp_path / "results", store=store).sweep() == 0  # no folders here
        assert not (root / old).exists()
        assert (root / recent / "1" / "manifest.json").is_file() and (root / foreign / "1" / "manifest.json").is_file()
        assert (root / "files" / "file-1.rows.jsonl").is_file() and (root / "notes.txt").read_text() == "mine"
        last = (await r.xrevrange(keys.TASKS_REMOVED, count=1))[0][0]
        assert await r.get(keys.TASKS_REMOVED_STORE_POSITION) == last

        # Another orchestrator, or this one restarted, goes on from there: nothing is removed twice.
        publish(store, old, 3, tmp_path)  # as a worker thought lost might still upload
        assert await StoreSweeper(r, store).sweep() == 0 and (root / old / "3").is_dir()
        # Two at once from one position: a copy already gone is no error.
        await r.delete(keys.TASKS_REMOVED_STORE_POSITION)
        await asyncio.gather(StoreSweeper(r, store).sweep(), StoreSweeper(r, store).sweep())
        assert not (root / old).exists() and (root / recent).is_dir()
        await r.aclose()

    asyncio.run(scenario())


@pytest.fixture
def moto_s3() -> Iterator[dict[str, Any]]:
    """A local S3 server (moto) with a bucket; ``stop`` and ``start`` take it down and up again on the
    same port, keeping its objects."""
    import boto3
    import moto.server as server_module

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    servers: list[Any] = []

    def start() -> None:
        servers.append(server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    def stop() -> None:
        servers.pop().stop()

    start()
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="mloc-artifacts")
    yield {"endpoint": endpoint, "s3": s3, "start": start, "stop": stop}
    while servers:
        stop()


@pytest.mark.extra("s3")
def test_a_stored_copy_the_store_would_not_remove_goes_at_a_later_reap(
    redis_url: str, tmp_path: Path, moto_s3: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    s3 = moto_s3["s3"]
    options = {
        "endpoint_url": moto_s3["endpoint"],
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},  # fail fast while it is down
    }
    # A prefix of its own: the local S3 server keeps what every test before this one stored in the bucket.
    runs = f"runs-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(f"s3://mloc-artifacts/{runs}", options)

    def names(prefix: str = f"{runs}/") -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="mloc-artifacts", Prefix=prefix).get("Contents", []))

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        now = time.time()
        old, recent = await old_and_recent(orch, now)
        gone_too, _ = await old_and_recent(orch, now)
        for task_id in (old, recent, gone_too):
            publish(store, task_id, 1, tmp_path)
        s3.put_object(Bucket="mloc-artifacts", Key=f"{runs}/notes.txt", Body=b"mine")
        assert len(names(f"{runs}/{old}/")) == 3
        assert sorted(await forget_finished(orch.store, older_than_sec=600, now=now + 1000)) == sorted([old, gone_too])
        sweeper = FolderSweeper(r, tmp_path / "results", store=store)

        moto_s3["stop"]()
        with caplog.at_level(logging.WARNING, logger="mloc.removals"):
            await sweeper.sweep()
        refused = [rec.getMessage() for rec in caplog.records if rec.name == "mloc.removals"]
        assert len(refused) == 1 and "retried at the next reap" in refused[0], refused
        first = old if old in refused[0] else gone_too
        assert first in refused[0] and await r.get(keys.TASKS_REMOVED_STORE_POSITION) is None

        moto_s3["start"]()
        assert len(names(f"{runs}/{old}/")) == len(names(f"{runs}/{gone_too}/")) == 3  # still there, still to go
        await sweeper.sweep()
        kept = [f"{runs}/{recent}/1/{name}" for name in ("files/responses.json", "files/sub/more.txt", "manifest.json")]
        assert names() == sorted([f"{runs}/notes.txt", *kept])
        assert await StoreSweeper(r, store).sweep() == 0
        await r.aclose()

    asyncio.run(scenario())


def test_the_stored_copy_of_a_removed_task_goes_after_its_retention(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    root = tmp_path / "shared-store"
    foreign = root / str(uuid.uuid4())  # another deployment's task in the same store
    foreign.mkdir(parents=True)
    (foreign / "manifest.json").write_text(json.dumps({"files": []}))
    cluster = make_cluster(
        1,
        env={
            "MLOC_ARTIFACT_STORE": f"file://{root}",
            "MLOC_TASK_RETENTION_SEC": "1.5",
            "MLOC_REAP_INTERVAL_SEC": "0.3",
        },
    )
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        done = http.post("/api/v1/tasks", json=sleeper(0, 1)).json()["task_id"]
        wait_state(http, done, "succeeded")
        assert (root / done / "1" / "manifest.json").is_file()
        deadline = time.monotonic() + 20
        while (root / done).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get(f"/api/v1/tasks/{done}").status_code == 404
    assert not (root / done).exists()
    assert (foreign / "manifest.json").is_file()
