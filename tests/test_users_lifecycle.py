"""A user's life as the admin manages it: a token rotated without losing the user's limits, a removal
that revokes the token and cancels what had not started, and a GPU quota that refuses at submit the
task it could never let start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from mloc import keys, moves
from mloc.errors import Forbidden
from mloc.localcluster import LocalCluster
from mloc.orchestrator import budgets, cancel, users
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.placement import WaitCode
from mloc.orchestrator.standing import SUBMIT_CACHE_SEC
from mloc.orchestrator.users import Principal
from mloc.records import PENDING_CODE
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason
from mloc.store import Reservation
from tests.support import fleet
from tests.support.api import wait_for
from tests.support.cli import mloc

ADMIN = Principal("admin", admin=True)
TOKEN = "users-admin-token"


def echo(owner: str | None = None, *, gpus: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "echo",
        "resources": {"hardware": {"gpu": {"count": gpus, "type": "any"}}},
        "hyperparameters": {"sleep_sec": sleep, "steps": 1},
    }
    if owner:
        body["metadata"] = {"owner": owner}
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------ rotation
def test_rotating_a_token_revokes_the_old_one_at_once_and_keeps_quota_budget_and_weight(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": TOKEN})
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": TOKEN}
    added = mloc("users", "add", "alice", "--max-tasks", "2", "--max-gpus", "1", env=env)
    assert added.returncode == 0, added.stderr
    old = added.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=cluster.api_url, headers=bearer(TOKEN), timeout=10) as admin:
        assert admin.put("/admin/users/alice/budget", json={"tokens": "1M"}).status_code == 200
        assert admin.put("/admin/users/alice/weight", json={"weight": 3}).status_code == 200
        assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(old)).status_code == 200

        rotated = mloc("users", "rotate-token", "alice", env=env)
        assert rotated.returncode == 0, rotated.stderr
        assert "the old one no longer works" in rotated.stdout
        new = rotated.stdout.strip().splitlines()[-1]
        assert new.startswith("mloc_") and new != old
        stale = httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(old))
        assert stale.status_code == 401
        # The refusal says a token may have been replaced, and how the admin gives the current one.
        assert "replaced by a newer one" in stale.json()["message"]
        assert "`mloc users rotate-token NAME` for a user" in stale.json()["message"]
        # One who thinks it is the admin's is told where that one is set.
        assert "The admin's token is the orchestrator's ORCHESTRATOR_TOKEN" in stale.json()["message"]
        assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(new)).status_code == 200
        # The limits stay as they were.
        quota = admin.get("/admin/users/alice/quota").json()["quota"]
        assert (quota["max_tasks"], quota["max_gpus"]) == (2, 1)
        assert [b["metric"] for b in admin.get("/admin/users/alice/budget").json()["budgets"]] == ["tokens"]
        assert float(asyncio.run(_weight(str(cluster.redis_url), "alice")) or 0) == 3.0

        # The other spelling, through the REST API: the token it gives works and the one before does not.
        again = admin.post("/api/v1/admin/users/alice/token")
        assert again.status_code == 200, again.text
        newest = again.json()["token"]
        assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(new)).status_code == 401
        assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(newest)).status_code == 200
        # A user's own token cannot rotate tokens; unknown users and the admin are refused with the reason.
        own = httpx.post(cluster.api_url + "/admin/users/alice/token", headers=bearer(newest))
        assert own.status_code == 403
        assert own.json()["message"] == (
            "this endpoint is for the admin (ORCHESTRATOR_TOKEN); the token sent is that of user 'alice'"
        )
        # Reading budgets, a user is told where their own are.
        budgets = httpx.get(cluster.api_url + "/api/v1/admin/users/alice/budget", headers=bearer(newest))
        assert budgets.status_code == 403
        assert budgets.json()["message"].endswith("your own budgets and usage are in GET /api/v1/stats (`mloc stats`)")
        missing = admin.post("/admin/users/zoe/token")
        assert missing.status_code == 404 and "zoe" in missing.json()["message"]
        # Reading an unknown user's limits answers as setting them does, not with defaults that look set.
        for limits in ("quota", "budget"):
            unknown = admin.get(f"/api/v1/admin/users/zoe/{limits}")
            assert unknown.status_code == 404, unknown.text
            assert unknown.json()["message"] == "user 'zoe' not found; add it first with `mloc users add zoe`"
        assert admin.get("/api/v1/admin/users/alice/budget").status_code == 200
        itself = admin.post("/admin/users/admin/token")
        assert itself.status_code == 400 and "ORCHESTRATOR_TOKEN" in itself.json()["message"]

    # Adding an existing user points at rotation, which keeps the limits.
    twice = mloc("users", "add", "alice", env=env)
    assert twice.returncode != 0 and "mloc users rotate-token alice" in twice.stderr, twice.stderr


async def _weight(redis_url: str, name: str) -> str | None:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        value: str | None = await r.hget(keys.user_fair_share(name), "weight")
        return value
    finally:
        await r.aclose()


# ------------------------------------------------------------------------- removal
def test_removing_a_user_revokes_the_token_and_their_held_tasks_never_start(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env={"ORCHESTRATOR_TOKEN": TOKEN}, worker_env=[{"MLOC_WORKER_SLOTS": "4"}])
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": TOKEN}
    added = mloc("users", "add", "carol", "--max-tasks", "1", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=cluster.api_url, headers=bearer(token), timeout=10) as carol:
        running = carol.post("/api/v1/tasks", json=echo(sleep=4)).json()["task_id"]
        wait_for(carol, running, {"running"})
        held = [carol.post("/api/v1/tasks", json=echo()).json()["task_id"] for _ in range(2)]
        for task_id in held:
            record = carol.get(f"/api/v1/tasks/{task_id}").json()
            assert record["state"] == "pending" and "at quota" in record["pending_reason"], record

    removed = mloc("users", "remove", "carol", env=env)
    assert removed.returncode == 0, removed.stderr
    assert "its token no longer works" in removed.stdout
    assert "cancelled 2 tasks not yet started" in removed.stdout
    assert f"1 task still running, left to finish ({running})" in removed.stdout
    assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=bearer(token)).status_code == 401
    with httpx.Client(base_url=cluster.api_url, headers=bearer(TOKEN), timeout=10) as admin:
        for task_id in held:
            record = admin.get(f"/api/v1/tasks/{task_id}").json()
            assert record["state"] == "cancelled" and record["reason_code"] == "user_removed", record
            assert record["reason"] == "cancelled: its owner, user carol, was removed by admin before it started"
        # The running task finishes; the held ones never start, though its end frees the quota.
        assert wait_for(admin, running, {"succeeded", "failed", "cancelled"})["state"] == "succeeded"
        time.sleep(0.5)
        assert all(admin.get(f"/api/v1/tasks/{t}").json()["started_at"] is None for t in held)
    # The orchestrator's log keeps the operator's record of it.
    assert cluster.log_dir is not None
    logged = (cluster.log_dir / "orchestrator.log").read_text()
    assert "user carol added by admin (max tasks 1, max GPUs default)" in logged, logged[-2000:]
    assert "user carol removed by admin: 2 unstarted task(s) cancelled, 1 running left to finish" in logged


def test_removal_cancels_budget_held_and_assigned_tasks_but_not_another_users(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(fleet.registration("w1", slots=8, cpu=64000, memory=1 << 36))
        for name in ("dan", "erin"):
            await users.add_user(r, name)
        assigned = (await orch.submit(validate(echo("dan")), ADMIN))["task_id"]
        other = (await orch.submit(validate(echo("erin")), ADMIN))["task_id"]
        # Spent past a budget: dan's next task waits for it.
        record = fleet.echo_record(orch.store, "dan")
        await orch.store.insert([record])
        for move, extra in (
            (moves.PLACE, {"reserve": Reservation("w1", 0, 0, [], "{}", user="dan")}),
            (moves.START, {"expect_worker": "w1", "new_attempt": True}),
            (moves.SUCCEED, {"release": True, "usage": {"tasks": 1.0, "cpu_seconds": 10.0}, "owner": "dan"}),
        ):
            assert (await orch.store.transition(record.task_id, move, **extra)).ok
        await budgets.set_budgets(r, "dan", budgets.budgets_of("day", {"cpu_time": "5s"}, hard=True))
        await asyncio.sleep(SUBMIT_CACHE_SEC)  # the submit before read dan's budgets: none yet
        waiting = await orch.submit(validate(echo("dan")), ADMIN)
        assert waiting["worker_id"] is None and waiting["pending_reason"].startswith("budget exhausted (hard limit)")

        await users.remove_user(r, "dan")
        cancelled = await cancel.cancel_unstarted(
            orch.store, "dan", by="admin", reason="cancelled: removed", reason_code=Reason.USER_REMOVED
        )
        assert sorted(cancelled) == sorted([assigned, waiting["task_id"]])
        for task_id in cancelled:
            gone = await orch.store.get(task_id)
            assert (gone.state, gone.reason_code) == ("cancelled", "user_removed")
        assert (await orch.store.get(other)).state == "assigned"
        # A pass afterwards places nothing of dan's.
        await orch.scheduler.schedule_pending()
        assert await users.usage_and_quota(r, ["dan"], default_tasks=0, default_gpus=0) == {
            "dan": {
                "usage": {"tasks": 0, "gpus": 0},
                "quota": {"max_tasks": 0, "max_gpus": 0, "max_tasks_is_default": True, "max_gpus_is_default": True},
            }
        }
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------------- quota at submit
def test_a_task_needing_more_gpus_than_its_owners_quota_is_refused_at_submit(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(fleet.registration("w1", gpus=4, cpu=64000, memory=1 << 36, gpu_memory=1 << 34))
        await users.add_user(r, "bob", users.Quota(max_gpus=1))
        bob = Principal("bob", admin=False)
        for attempt in (
            orch.submit(validate(echo(gpus=2)), bob),
            orch.submit(validate(echo("bob", gpus=2)), ADMIN),  # the owner's quota, whoever submits
            orch.submit_many([validate(echo(gpus=1)), validate(echo(gpus=2))], bob),
            orch.dry_run(validate(echo(gpus=2)), bob),
        ):
            with pytest.raises(Forbidden) as refused:
                await attempt
            message = refused.value.message
            assert "spec.resources.hardware.gpu.count is 2" in message and "user bob's quota allows 1 GPU" in message
            assert "`mloc users set-quota bob --max-gpus 2`" in message
        assert await r.zcard(keys.tasks_of_owner("bob")) == 0  # a refused bulk stores nothing
        assert (await orch.submit(validate(echo(gpus=1)), bob))["worker_id"] == "w1"
        # max_tasks 0 is no limit, so a task count never refuses a task outright.
        await users.set_quota(r, "bob", users.Quota(max_tasks=0, max_gpus=0))
        assert (await orch.submit(validate(echo(gpus=2)), bob))["worker_id"] == "w1"
        await r.aclose()

        # The default applies to a user without their own quota, and the refusal says it is the default.
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60, MLOC_USER_MAX_GPUS=1))
        await users.add_user(r, "cy")
        with pytest.raises(Forbidden, match=r"\(the default, MLOC_USER_MAX_GPUS\)"):
            await orch.submit(validate(echo("cy", gpus=3)), ADMIN)
        await r.aclose()

    asyncio.run(scenario())


def test_a_quota_lowered_below_a_waiting_task_says_it_can_never_start(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
        await orch.registry.register(fleet.registration("w1", gpus=2, cpu=64000, memory=1 << 36, gpu_memory=1 << 34))
        await users.add_user(r, "bob", users.Quota(max_gpus=2))
        assert (await orch.submit(validate(echo("erin", gpus=2)), ADMIN))["worker_id"] == "w1"
        answer = await orch.submit(validate(echo("bob", gpus=2)), ADMIN)
        assert answer["worker_id"] is None and not answer["unschedulable"]  # w1's GPUs are busy, for now
        await users.set_quota(r, "bob", users.Quota(max_gpus=1))
        await orch.scheduler.schedule_pending()
        record = await orch.store.get(answer["task_id"])
        assert record.unschedulable and record.state == "pending"
        assert "can never start under the current quota" in (record.pending_reason or "")
        assert "`mloc users set-quota bob --max-gpus 2`" in (record.pending_reason or "")
        assert await r.hget(keys.task(answer["task_id"]), PENDING_CODE) == WaitCode.QUOTA
        estimate = await orch.queue_estimate(record)
        assert estimate is not None and estimate["eta_sec"] is None
        assert estimate["basis"].startswith("can never start under its owner's current quota")
        await r.aclose()

    asyncio.run(scenario())
