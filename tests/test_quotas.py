"""Per-user quotas enforced atomically in Redis, and fair sharing of the fleet between users."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
import typer

from mloc import keys, moves
from mloc.cli.users import users_app  # importing this module registers the users commands
from mloc.localcluster import LocalCluster
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.reaper import reap
from mloc.orchestrator.scheduler import quota_reason
from mloc.orchestrator.users import Principal
from mloc.records import Registration
from mloc.requeue import requeue
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason, TaskState
from mloc.store import Reservation
from tests.support import fleet
from tests.support.cli import mloc

ADMIN = Principal("admin", admin=True)


def registration(worker_id: str, *, slots: int = 8, gpus: int = 0) -> Registration:
    """A roomy worker: quotas, not capacity, are what these tests run into."""
    return fleet.registration(worker_id, slots=slots, gpus=gpus, cpu=64000, memory=1 << 36, gpu_memory=1 << 34)


def echo(owner: str, *, gpus: int = 0, priority: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    return {
        "taskType": "echo",
        "metadata": {"owner": owner},
        "priority": priority,
        "resources": {"hardware": {"gpu": {"count": gpus}}},
        "hyperparameters": {"sleep_sec": sleep, "steps": 1},
    }


async def usage_of(r: aioredis.Redis, user: str) -> tuple[int, int]:
    tasks, gpus = await r.hmget(keys.user_usage(user), "tasks", "gpus")
    return int(tasks or 0), int(gpus or 0)


# ----------------------------------------------------------- atomic counters
def test_every_release_path_returns_the_quota_counters_to_zero(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_RETRY_BACKOFF_SEC=0))
        await orch.registry.register(registration("w1", gpus=4))

        async def placed(gpus: int = 1, retries: int = 2) -> str:
            orch.scheduler.invalidate()  # capacity just freed: no cached snapshot
            answer = await orch.submit(validate({**echo("alice", gpus=gpus), "retries": retries}), ADMIN)
            assert answer["worker_id"] == "w1", answer
            return str(answer["task_id"])

        async def running(task_id: str) -> int:
            started = await orch.store.transition(task_id, moves.START, expect_worker="w1", new_attempt=True)
            assert started.ok
            return started.attempt

        async def finish(task_id: str, state: TaskState) -> None:
            done = await orch.store.transition(task_id, moves.finish(state), release=True)
            assert done.ok

        held = [await placed(gpus=1), await placed(gpus=2), await placed(gpus=0)]
        assert await usage_of(r, "alice") == (3, 3)
        # assigned -> cancelled
        await cancel(orch.store, held[0], by="admin")
        assert await usage_of(r, "alice") == (2, 2)
        # assigned -> pending (handed back before it started)
        await requeue(orch.store, held[1], worker_id="w1", reason_code=Reason.WORKER_SHUTDOWN, reason="x")
        assert await usage_of(r, "alice") == (1, 0)
        await cancel(orch.store, held[1], by="admin")  # pending -> cancelled held nothing
        assert await usage_of(r, "alice") == (1, 0)
        # running -> succeeded
        await running(held[2])
        await finish(held[2], TaskState.SUCCEEDED)
        assert await usage_of(r, "alice") == (0, 0)
        # running -> failed, running -> cancelled
        for state in (TaskState.FAILED, TaskState.CANCELLED):
            task_id = await placed(gpus=2)
            await running(task_id)
            assert await usage_of(r, "alice") == (1, 2)
            await finish(task_id, state)
            assert await usage_of(r, "alice") == (0, 0)
        # running -> pending (a retry after a crash), then past the attempt limit -> failed
        task_id = await placed(gpus=1, retries=1)
        for attempt in (1, 2):
            if attempt == 2:
                assert await orch.scheduler.schedule_pending() >= 1
            assert await usage_of(r, "alice") == (1, 1)
            await running(task_id)
            await requeue(
                orch.store, task_id, worker_id="w1", reason_code=Reason.EXECUTOR_CRASHED, reason="x", attempt=attempt
            )
            assert await usage_of(r, "alice") == (0, 0)
        assert await r.hget(keys.task(task_id), "state") == "failed"
        # a lost worker: the reaper requeues what it held
        task_id = await placed(gpus=1)
        await running(task_id)
        await r.zadd(keys.WORKERS, {"w1": time.time() - 120})
        report = await reap(orch.store, orch.registry, ttl_sec=60)
        assert report.requeued == [task_id]
        assert await usage_of(r, "alice") == (0, 0)
        await r.aclose()

    asyncio.run(scenario())


def test_the_transition_script_refuses_a_reservation_over_quota(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(registration("w1", slots=100, gpus=12))
        records = [
            orch.store.new_record(
                document={},
                name="t",
                owner="bob",
                task_type="echo",
                kind="EchoTask",
                topic="tasks.echo",
                priority=0,
                max_attempts=1,
                request={},
                labels={},
            )
            for _ in range(12)
        ]
        await orch.store.insert(records)
        ids = [rec.task_id for rec in records]
        await r.hset(keys.user_quota("bob"), mapping={"tasks": "3", "gpus": "4"})
        # Twelve reservations at once, one GPU each: exactly three win (the task limit).
        outcomes = await asyncio.gather(
            *(
                orch.store.transition(t, moves.PLACE, reserve=Reservation("w1", 0, 0, [i], "{}", user="bob"))
                for i, t in enumerate(ids)
            )
        )
        assert sum(o.ok for o in outcomes) == 3
        assert {(o.error, o.detail) for o in outcomes if not o.ok} == {("quota", "tasks 3 3")}
        assert await usage_of(r, "bob") == (3, 3)
        # GPUs: one more GPU fits the limit of 4, two do not.
        await r.hset(keys.user_quota("bob"), "tasks", "0")
        free = [t for t, o in zip(ids, outcomes, strict=True) if not o.ok]
        gpus = sorted(int(g) for g in await r.smembers(keys.worker_free_gpus("w1")))
        two = await orch.store.transition(
            free[0], moves.PLACE, reserve=Reservation("w1", 0, 0, gpus[:2], "{}", user="bob")
        )
        assert not two.ok and (two.error, two.detail) == ("quota", "gpus 3 4")
        one = await orch.store.transition(
            free[0], moves.PLACE, reserve=Reservation("w1", 0, 0, gpus[:1], "{}", user="bob")
        )
        assert one.ok and await usage_of(r, "bob") == (4, 4)
        # The default from the settings applies to a user without a quota of their own.
        other = await orch.store.transition(
            free[1], moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}", user="carol", max_tasks=0)
        )
        assert other.ok
        third = await orch.store.transition(
            free[2], moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}", user="carol", max_tasks=1)
        )
        assert not third.ok and third.detail == "tasks 1 1"
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------------- fair sharing
def test_users_take_turns_and_priority_still_wins(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))

        async def submit(owner: str, priority: int = 0) -> str:
            await asyncio.sleep(0.002)  # submission order is kept to the millisecond
            return str((await orch.submit(validate(echo(owner, priority=priority)), ADMIN))["task_id"])

        # No worker yet: everything queues.
        alice = [await submit("alice") for _ in range(30)]
        bob = [await submit("bob") for _ in range(2)]
        urgent = await submit("alice", priority=5)
        carol = await submit("carol")
        await orch.registry.register(registration("w1", slots=6))
        assert await orch.scheduler.schedule_pending() == 6
        order = [fields["task"] for _, fields in await r.xrange(keys.worker_stream("w1"))]
        # Priority first (alice's urgent task, though alice then holds the most); then the users
        # holding fewest tasks take turns, oldest first among equals.
        assert order == [urgent, bob[0], carol, alice[0], bob[1], alice[1]]
        await r.aclose()

    asyncio.run(scenario())


def test_a_user_at_quota_does_not_hold_up_other_users(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_USER_MAX_TASKS=2, MLOC_USER_MAX_GPUS=3))
        alice = [(await orch.submit(validate(echo("alice", gpus=1)), ADMIN))["task_id"] for _ in range(50)]
        bob = [(await orch.submit(validate(echo("bob", gpus=2)), ADMIN))["task_id"] for _ in range(3)]
        await orch.registry.register(registration("w1", slots=10, gpus=8))
        assert await orch.scheduler.schedule_pending() == 3  # alice 2 (task limit), bob 1 (GPU limit of 3)
        states = {t: await r.hget(keys.task(t), "state") for t in alice + bob}
        assert sorted(states[t] for t in alice).count("assigned") == 2
        assert sorted(states[t] for t in bob).count("assigned") == 1
        for task_id in alice + bob:
            if states[task_id] == "pending":
                reason = (await orch.store.get(task_id)).pending_reason
                assert reason == (
                    "user alice at quota: 2 of 2 concurrent tasks; it starts when one of them ends, or once an "
                    "admin raises the quota: `mloc users set-quota alice --max-tasks 3`"
                    if task_id in alice
                    else "user bob at quota: 2 of 3 GPUs in use, this task needs 2; it starts when their tasks "
                    "holding GPUs end, or once an admin raises the quota: `mloc users set-quota bob --max-gpus 4`"
                )
        assert await usage_of(r, "alice") == (2, 2) and await usage_of(r, "bob") == (1, 2)
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------- with real workers
def started_at(http: httpx.Client, task_id: str) -> float | None:
    return http.get(f"/api/v1/tasks/{task_id}").json().get("started_at")


def wait_all(http: httpx.Client, ids: list[str], timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [http.get(f"/api/v1/tasks/{t}").json() for t in ids]
        if all(rec["state"] in ("succeeded", "failed", "cancelled") for rec in records):
            return records
        time.sleep(0.1)
    raise AssertionError(f"tasks still unfinished after {timeout}s")


def test_one_users_flood_does_not_starve_a_later_task_of_another(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "2"}])
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        flood = http.post("/api/v1/tasks/bulk", json={"tasks": [echo("alice", sleep=0.2) for _ in range(24)]})
        alice = [t["task_id"] for t in flood.json()["tasks"]]
        time.sleep(0.3)
        bob = http.post("/api/v1/tasks", json=echo("bob")).json()["task_id"]
        records = wait_all(http, [bob, *alice], timeout=60)
    assert all(rec["state"] == "succeeded" for rec in records)
    bob_started = records[0]["started_at"]
    before = sum(rec["started_at"] < bob_started for rec in records[1:])
    # Bob's task takes the first slot that frees: only the tasks already running (2 slots) and the
    # ones placed with them may start first, not alice's backlog of 24.
    assert before <= 6, before


def test_quota_caps_a_users_running_tasks_and_the_rest_run_as_slots_free(
    make_cluster: Callable[..., LocalCluster], redis_url: str
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "8", "MLOC_WORKER_GPUS": "NVIDIA L4:4:24576"}])
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        assert http.post("/admin/users", json={"name": "alice", "max_tasks": 2}).status_code == 201
        assert http.post("/admin/users", json={"name": "bob", "max_gpus": 2}).status_code == 201
        alice = [http.post("/api/v1/tasks", json=echo("alice", sleep=0.6)).json()["task_id"] for _ in range(6)]
        bob = [http.post("/api/v1/tasks", json=echo("bob", gpus=1, sleep=0.6)).json()["task_id"] for _ in range(4)]
        carol = http.post("/api/v1/tasks", json=echo("carol", sleep=0.6)).json()
        assert carol["worker_id"] == "local-1"  # placed at once: the others' quotas do not block her
        reason_alice = http.get(f"/api/v1/tasks/{alice[-1]}").json()["pending_reason"]
        reason_bob = http.get(f"/api/v1/tasks/{bob[-1]}").json()["pending_reason"]
        peaks = {"alice": 0, "bob": 0}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pipe = r.pipeline(transaction=False)
            for task_id in alice + bob:
                pipe.hmget(keys.task(task_id), "state", "gpus")
            rows = pipe.execute()
            held_alice = sum(state in ("assigned", "running") for state, _ in rows[: len(alice)])
            held_bob = sum(
                len(json.loads(gpus or "[]")) for state, gpus in rows[len(alice) :] if state in ("assigned", "running")
            )
            peaks = {"alice": max(peaks["alice"], held_alice), "bob": max(peaks["bob"], held_bob)}
            if all(state == "succeeded" for state, _ in rows):
                break
            time.sleep(0.01)
        assert all(http.get(f"/api/v1/tasks/{t}").json()["state"] == "succeeded" for t in alice + bob)
        assert peaks == {"alice": 2, "bob": 2}
        assert reason_alice.startswith("user alice at quota: 2 of 2 concurrent tasks; it starts when one of them")
        assert reason_alice.endswith("`mloc users set-quota alice --max-tasks 3`")
        assert reason_bob.startswith("user bob at quota: 2 of 2 GPUs in use, this task needs 1; it starts when")
        assert reason_bob.endswith("`mloc users set-quota bob --max-gpus 3`")
        users = {u["name"]: u for u in http.get("/admin/users").json()["items"]}
        assert users["alice"]["quota"]["max_tasks"] == 2 and users["alice"]["usage"] == {"tasks": 0, "gpus": 0}
        # Failed, cancelled and crashed tasks give their share back too.
        failing = http.post("/api/v1/tasks", json={**echo("alice"), "hyperparameters": {"fail_message": "no"}})
        crash = {**echo("alice"), "retries": 0, "hyperparameters": {"isolate": True, "crash": True}}
        crashing = http.post("/api/v1/tasks", json=crash)
        long = http.post("/api/v1/tasks", json=echo("bob", gpus=2, sleep=30)).json()["task_id"]
        deadline = time.monotonic() + 20
        while http.get(f"/api/v1/tasks/{long}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        http.post(f"/api/v1/tasks/{long}/cancel")
        ends = wait_all(http, [failing.json()["task_id"], crashing.json()["task_id"], long], timeout=30)
        assert [e["state"] for e in ends] == ["failed", "failed", "cancelled"]
    for user in ("alice", "bob", "carol"):
        assert r.hmget(keys.user_usage(user), "tasks", "gpus") in (["0", "0"], ["0", None]), user


def test_a_quota_held_tasks_estimate_does_not_repeat_its_pending_reason(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "4"}])
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        assert http.post("/admin/users", json={"name": "alice", "max_tasks": 1}).status_code == 201
        first, second = (http.post("/api/v1/tasks", json=echo("alice", sleep=30)).json()["task_id"] for _ in range(2))
        deadline = time.monotonic() + 30
        while started_at(http, first) is None:
            assert time.monotonic() < deadline, http.get(f"/api/v1/tasks/{first}").json()
            time.sleep(0.05)
        held = http.get(f"/api/v1/tasks/{second}").json()
        reason = held["pending_reason"]
        assert held["state"] == "pending" and reason.startswith("user alice at quota: 1 of 1 concurrent tasks"), held
        # The estimate says what it rests on; why the task waits is the record's pending_reason, shown beside it.
        basis = held["queue"]["basis"]
        assert held["queue"]["eta_sec"] is None and basis.startswith("waits for one of alice's tasks to end"), basis
        assert "at quota" not in basis and "set-quota" not in basis, basis
        shown = mloc("show", second, env={"MLOC_API_URL": cluster.api_url})
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("at quota") == shown.stdout.count("set-quota alice") == 1, shown.stdout
        for task_id in (first, second):
            http.post(f"/api/v1/tasks/{task_id}/cancel")


def test_admin_sets_quotas_from_the_cli_and_bad_input_is_explained(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": "quota-admin"})
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "quota-admin"}
    added = mloc("users", "add", "dave", "--max-tasks", "3", env=env)
    assert added.returncode == 0, added.stderr
    assert "max tasks 3, max GPUs unlimited (default)" in added.stdout
    assert added.stdout.strip().splitlines()[-1].startswith("mloc_")
    changed = mloc("users", "set-quota", "dave", "--max-gpus", "1", env=env)
    assert changed.returncode == 0 and "max tasks 3 (0 in use), max GPUs 1 (0 in use)" in changed.stdout
    listed = mloc("users", "list", env=env)
    assert "dave" in listed.stdout and "0 / 3" in listed.stdout and "0 / 1" in listed.stdout
    reset = mloc("users", "set-quota", "dave", "--reset", env=env)
    assert "max tasks unlimited (default)" in reset.stdout
    nothing = mloc("users", "set-quota", "dave", env=env)
    assert nothing.returncode == 2 and "--max-tasks N and/or --max-gpus N" in nothing.stderr
    unknown = mloc("users", "set-quota", "erin", "--max-tasks", "1", env=env)
    assert (
        unknown.returncode == 2 and "user 'erin' not found; add it first with `mloc users add erin`" in unknown.stderr
    )
    negative = mloc("users", "set-quota", "dave", "--max-tasks", "-1", env=env)
    assert (
        negative.returncode == 2
        and "--max-tasks" in negative.stderr
        and "greater than or equal to 0" in negative.stderr
    )
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": "Bearer quota-admin"}) as http:
        bad = http.put("/admin/users/dave/quota", json={"max_tasks": -2})
        assert bad.status_code == 422 and "max_tasks" in bad.json()["message"]
        typo = http.put("/admin/users/dave/quota", json={"max_task": 2})
        assert typo.status_code == 422 and "max_task" in typo.json()["message"]
        # Neither a flag nor text passes for a number; nor a number beyond the limit.
        for value, said in [
            (True, "valid integer"),
            ("3", "valid integer"),
            (1e20, "valid integer"),
            (10**7, "1000000"),
        ]:
            refused = http.put("/admin/users/dave/quota", json={"max_tasks": value})
            assert refused.status_code == 422 and said in refused.json()["message"], (value, refused.text)
        flag = http.put("/admin/users/dave/budget", json={"tokens": True})
        assert flag.status_code == 422 and "not true or false" in flag.json()["message"], flag.text
        shown = http.get("/admin/users/dave/quota").json()
        assert shown["quota"]["max_tasks"] == 0 and shown["quota"]["max_tasks_is_default"] is True


def _admin_command(reason: str) -> tuple[str, dict[str, Any]]:
    """The command a reason names, checked against the CLI: parsed (not run) as `mloc` would parse it."""
    command = shlex.split(reason.rsplit("`", 2)[-2])
    assert command[:2] == ["mloc", "users"], command
    group = typer.main.get_command(users_app)
    assert isinstance(group, typer.core.TyperGroup)
    parsed = group.commands[command[2]].make_context(command[2], command[3:])
    return command[2], {name: value for name, value in parsed.params.items() if value not in (None, False)}


def test_a_quota_reason_names_the_admin_command_that_lets_the_task_start() -> None:
    tasks = quota_reason("alice", "tasks", 4, 4)
    assert tasks == (
        "user alice at quota: 4 of 4 concurrent tasks; it starts when one of them ends, or once an admin "
        "raises the quota: `mloc users set-quota alice --max-tasks 5`"
    )
    assert _admin_command(tasks) == ("set-quota", {"name": "alice", "max_tasks": 5})
    # A quota lowered below what runs: one more than runs now lets the next one start.
    assert _admin_command(quota_reason("alice", "tasks", 6, 4)) == ("set-quota", {"name": "alice", "max_tasks": 7})
    gpus = quota_reason("bob", "gpus", 6, 8, 4)
    assert gpus.startswith("user bob at quota: 6 of 8 GPUs in use, this task needs 4; it starts when their")
    assert _admin_command(gpus) == ("set-quota", {"name": "bob", "max_gpus": 10})
    never = quota_reason("bob", "gpus", 0, 2, 4)
    assert "can never start under the current quota" in never
    assert _admin_command(never) == ("set-quota", {"name": "bob", "max_gpus": 4})
