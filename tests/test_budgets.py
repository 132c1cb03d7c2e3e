"""Budgets in tokens, GPU-seconds and CPU-seconds per UTC day or month: enforced at admission, raised
by the admin, hard ones stopping running tasks, shown against spend in the usage reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import redis.asyncio as aioredis

from mloc import moves
from mloc.localcluster import LocalCluster
from mloc.orchestrator import budgets, users
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.demand import read_demand
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.standing import SUBMIT_CACHE_SEC
from mloc.orchestrator.users import Principal
from mloc.requeue import requeue
from mloc.settings import Settings
from mloc.spec import validate
from mloc.state import Reason
from mloc.store import Reservation
from tests.support import fleet
from tests.support.cli import mloc
from tests.support.clock import within_one_utc_day

ADMIN = Principal("admin", admin=True)


def echo(owner: str, *, gpus: int = 0, gpu_type: str = "any", sleep: float = 0.0) -> dict[str, Any]:
    return {
        "taskType": "echo",
        "metadata": {"owner": owner},
        "resources": {"hardware": {"gpu": {"count": gpus, "type": gpu_type}}},
        "hyperparameters": {"sleep_sec": sleep, "steps": 1},
    }


def utc_today() -> date:
    return datetime.now(UTC).date()


def next_month(today: date) -> date:
    return date(today.year + (today.month == 12), today.month % 12 + 1, 1)


async def spend(orch: Orchestrator, owner: str, usage: dict[str, float], *, now: float | None = None) -> None:
    """A task of ``owner`` that ran and ended with ``usage``, recorded by the transition script."""
    record = fleet.echo_record(orch.store, owner)
    await orch.store.insert([record])
    placed = await orch.store.transition(
        record.task_id, moves.PLACE, reserve=Reservation("w1", 0, 0, [], "{}", user=owner)
    )
    started = await orch.store.transition(record.task_id, moves.START, expect_worker="w1", new_attempt=True)
    done = await orch.store.transition(
        record.task_id,
        moves.SUCCEED,
        expect_worker="w1",
        release=True,
        usage={"tasks": 1.0, **usage},
        owner=owner,
        now=now,
    )
    assert placed.ok and started.ok and done.ok


async def setup(redis_url: str, *names: str) -> tuple[aioredis.Redis, Orchestrator]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    orch = Orchestrator(r, Settings(HEARTBEAT_TTL_SEC=60))
    await orch.registry.register(fleet.registration("w1", slots=50, gpus=4, cpu=64000, memory=1 << 36))
    for name in names:
        await users.add_user(r, name)
    return r, orch


async def submit(orch: Orchestrator, body: dict[str, Any]) -> dict[str, Any]:
    orch.scheduler.invalidate()
    return await orch.submit(validate(body), ADMIN)


# ------------------------------------------------------------------ admission
def test_a_user_over_a_token_budget_waits_with_the_reason_until_the_admin_raises_it(redis_url: str) -> None:
    within_one_utc_day(120)

    async def scenario() -> None:
        r, orch = await setup(redis_url, "alice", "bob")
        await spend(orch, "alice", {"prompt_tokens": 20_000, "completion_tokens": 1_000_000})
        await budgets.set_budgets(r, "alice", budgets.budgets_of("month", {"tokens": "1M"}))
        expected = (
            f"budget exhausted: 1.02M of 1M tokens this month; resets {next_month(utc_today()).isoformat()}; "
            "it starts then, or once an admin raises the budget: `mloc users set-budget alice --tokens N --per month`"
        )
        # At submit: the worker has room, the budget keeps the task waiting.
        waiting = await submit(orch, echo("alice"))
        assert waiting["worker_id"] is None and waiting["pending_reason"] == expected
        assert (await submit(orch, echo("bob")))["worker_id"] == "w1"  # other users are not held
        bulk = await orch.submit_many([validate(echo("alice")) for _ in range(3)], ADMIN)
        assert [a["pending_reason"] for a in bulk] == [expected] * 3
        # The pass holds them too, and says why on each.
        assert await orch.scheduler.schedule_pending() == 0
        ids = [waiting["task_id"], *(a["task_id"] for a in bulk)]
        for task_id in ids:
            record = await orch.store.get(task_id)
            assert (record.state, record.pending_reason) == ("pending", expected)
        # Raised: the next pass places all four.
        await budgets.set_budgets(r, "alice", budgets.budgets_of("month", {"tokens": "2M"}))
        assert await orch.scheduler.schedule_pending() == 4
        assert {(await orch.store.get(t)).state for t in ids} == {"assigned"}
        await r.aclose()

    asyncio.run(scenario())


def test_a_day_budget_counts_only_the_days_spend_so_a_new_day_lets_tasks_run(redis_url: str) -> None:
    within_one_utc_day(120)

    async def scenario() -> None:
        r, orch = await setup(redis_url, "carol")
        await budgets.set_budgets(r, "carol", budgets.budgets_of("day", {"cpu_time": "1m"}))
        # Yesterday's spend is yesterday's: it does not count against today.
        await spend(orch, "carol", {"cpu_seconds": 500.0}, now=time.time() - 86_400)
        assert (await submit(orch, echo("carol")))["worker_id"] == "w1"
        await spend(orch, "carol", {"cpu_seconds": 100.0})
        await asyncio.sleep(0.3)  # past the moment a submit reuses its owner's budgets for
        waiting = await submit(orch, echo("carol"))
        tomorrow = utc_today() + timedelta(days=1)
        assert waiting["pending_reason"] == (
            f"budget exhausted: 1.67m of 1m CPU time today; resets {tomorrow}; it starts then, or once an admin "
            "raises the budget: `mloc users set-budget carol --cpu-time N --per day`"
        )
        # As of tomorrow the day's budget is spent on nothing yet.
        later = await orch.scheduler.standings.read(["carol"], now=time.time() + 86_400)
        [standing] = later["carol"].budgets
        assert standing.spent == 0 and not standing.exhausted
        await r.aclose()

    asyncio.run(scenario())


def test_an_exhausted_gpu_budget_holds_the_gpu_tasks_it_covers_and_nothing_else(redis_url: str) -> None:
    within_one_utc_day(120)

    async def scenario() -> None:
        r, orch = await setup(redis_url, "dave", "erin")
        l4 = {"wall_sec": 1000.0, "gpu_seconds": 4000.0, "gpu_seconds.NVIDIA L4": 4000.0}
        await spend(orch, "dave", l4)
        await spend(orch, "erin", l4)
        await budgets.set_budgets(r, "dave", budgets.budgets_of("month", {"gpu_time": "1h"}))
        # Erin's budget is for A100s: her L4 hours do not spend it.
        await budgets.set_budgets(r, "erin", budgets.budgets_of("month", {"gpu_time": "1h"}, gpu_model="A100"))
        gpu_task = await submit(orch, echo("dave", gpus=1))
        resets = next_month(utc_today()).isoformat()
        assert gpu_task["pending_reason"].startswith(
            f"budget exhausted: 1.11h of 1h GPU time this month; resets {resets}; it starts then"
        )
        assert gpu_task["pending_reason"].endswith("`mloc users set-budget dave --gpu-time N --per month`")
        assert (await submit(orch, echo("dave")))["worker_id"] == "w1"  # a CPU task runs
        assert (await submit(orch, echo("erin", gpus=1, gpu_type="L4")))["worker_id"] == "w1"
        await spend(orch, "erin", {"gpu_seconds": 3700.0, "gpu_seconds.NVIDIA A100-SXM4-80GB": 3700.0})
        await asyncio.sleep(0.3)
        a100 = await submit(orch, echo("erin", gpus=1, gpu_type="A100"))
        assert a100["pending_reason"].startswith("budget exhausted: 1.03h of 1h GPU time on A100 this month")
        assert a100["pending_reason"].endswith("`mloc users set-budget erin --gpu-time N --gpu-model A100 --per month`")
        assert (await submit(orch, echo("erin", gpus=1, gpu_type="L4")))["worker_id"] == "w1"
        await r.aclose()

    asyncio.run(scenario())


# ------------------------------------------------------- with real processes
def wait_for(http: httpx.Client, task_id: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = http.get(f"/api/v1/tasks/{task_id}").json()
        if record["state"] in states:
            return dict(record)
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def test_raising_a_budget_starts_the_waiting_tasks_at_once_and_reports_show_the_spend(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    within_one_utc_day(120)
    # No regular pass for the length of the test: only the wake-up a budget change sends can start the task.
    cluster = make_cluster(1, env={"MLOC_SCHEDULE_INTERVAL_SEC": "60"})
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        assert http.post("/admin/users", json={"name": "alice"}).status_code == 201
        set_budget = http.put("/admin/users/alice/budget", json={"cpu_time": "0.3s", "period": "day"})
        assert set_budget.status_code == 200, set_budget.text
        first = http.post("/api/v1/tasks", json=echo("alice", sleep=0.5)).json()
        assert wait_for(http, first["task_id"], ("succeeded",))["state"] == "succeeded"
        time.sleep(0.3)
        waiting = http.post("/api/v1/tasks", json=echo("alice")).json()
        assert waiting["pending_reason"].startswith("budget exhausted: "), waiting
        assert "CPU time today; resets " in waiting["pending_reason"]
        time.sleep(1.0)
        assert http.get(f"/api/v1/tasks/{waiting['task_id']}").json()["state"] == "pending"
        raised = http.put("/admin/users/alice/budget", json={"cpu_time": "1h", "period": "day"})
        assert raised.json()["budgets"][0]["limit"] == 3600
        began = time.monotonic()
        wait_for(http, waiting["task_id"], ("succeeded",), timeout=10)
        assert time.monotonic() - began < 5
        stats = http.get("/api/v1/stats", params={"user": "alice"}).json()
        [budget] = stats["users"][0]["budgets"]
        assert budget["metric"] == "cpu_time" and budget["period"] == "day" and budget["limit"] == 3600
        assert budget["spent"] >= 0.5 and budget["spent"] == stats["users"][0]["totals"]["cpu_seconds"]
        assert budget["resets"] == (utc_today() + timedelta(days=1)).isoformat()
    shown = mloc("stats", "--user", "alice", env={"MLOC_API_URL": cluster.api_url})
    assert shown.returncode == 0, shown.stderr
    assert "alice: budgets" in shown.stdout and "cpu_time" in shown.stdout and "1h" in shown.stdout


def test_a_hard_budget_stops_running_tasks_and_a_soft_one_lets_them_finish(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    within_one_utc_day(120)
    cluster = make_cluster(1, worker_env=[{"MLOC_WORKER_SLOTS": "4"}])
    with httpx.Client(base_url=cluster.api_url, timeout=30) as http:
        for name, hard in (("alice", False), ("bob", True)):
            assert http.post("/admin/users", json={"name": name}).status_code == 201
            body = {"cpu_time": "0.3s", "period": "day", "hard": hard}
            assert http.put(f"/admin/users/{name}/budget", json=body).status_code == 200
        long = {
            name: http.post("/api/v1/tasks", json=echo(name, sleep=6)).json()["task_id"] for name in ("alice", "bob")
        }
        for task_id in long.values():
            wait_for(http, task_id, ("running",))
        short = [http.post("/api/v1/tasks", json=echo(name, sleep=0.5)).json()["task_id"] for name in ("alice", "bob")]
        for task_id in short:
            wait_for(http, task_id, ("succeeded",))
        # Bob's short task took him past his hard budget: his long one is stopped, naming the budget.
        stopped = wait_for(http, long["bob"], ("cancelled", "succeeded"), timeout=5)
        assert stopped["state"] == "cancelled", stopped
        assert stopped["reason_code"] == "budget_exhausted", stopped  # a script tells it from a user's cancel
        tomorrow = (utc_today() + timedelta(days=1)).isoformat()
        assert stopped["reason"].startswith("cancelled: budget exhausted (hard limit): "), stopped["reason"]
        assert stopped["reason"].endswith(f"CPU time today; resets {tomorrow}"), stopped["reason"]
        # Alice's budget is soft: her running task finishes; her next one waits.
        assert wait_for(http, long["alice"], ("succeeded", "cancelled"), timeout=15)["state"] == "succeeded"
        nxt = http.post("/api/v1/tasks", json=echo("alice")).json()
        assert (
            nxt["pending_reason"].startswith("budget exhausted: ") and f"resets {tomorrow}; " in nxt["pending_reason"]
        )
        assert nxt["pending_reason"].endswith("`mloc users set-budget alice --cpu-time N --per day`")


def test_the_admin_sets_and_removes_budgets_from_the_cli_and_bad_input_changes_nothing(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": "budget-admin"})
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "budget-admin"}
    assert mloc("users", "add", "dave", env=env).returncode == 0
    made = mloc("users", "set-budget", "dave", "--tokens", "1M", "--per", "month", env=env)
    assert made.returncode == 0, made.stderr
    assert "tokens" in made.stdout and "0 of 1M" in made.stdout and "month" in made.stdout
    gpu = mloc(
        "users", "set-budget", "dave", "--gpu-time", "10h", "--gpu-model", "A100", "--per", "day", "--hard", env=env
    )
    assert gpu.returncode == 0 and "gpu_time (A100)" in gpu.stdout and "yes" in gpu.stdout, gpu.stdout
    unit = mloc("users", "set-budget", "dave", "--tokens", "5T", env=env)
    assert unit.returncode == 2
    assert "tokens budget '5T': unknown unit 'T'; use k, M or G (1M = 1,000,000 tokens)" in unit.stderr
    time_unit = mloc("users", "set-budget", "dave", "--cpu-time", "2d", env=env)
    assert time_unit.returncode == 2 and "unknown unit 'd'; use s, m or h" in time_unit.stderr
    nothing = mloc("users", "set-budget", "dave", env=env)
    assert nothing.returncode == 2 and "give at least one limit to set: --tokens, --tokens-in" in nothing.stderr
    unknown = mloc("users", "set-budget", "erin", "--tokens", "1M", env=env)
    assert unknown.returncode == 2 and "user 'erin' not found; add it first" in unknown.stderr
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": "Bearer budget-admin"}) as http:
        # One bad part: nothing of the request is stored.
        mixed = http.put("/admin/users/dave/budget", json={"tokens": "2M", "gpu_time": "3x"})
        assert mixed.status_code == 400 and "gpu_time budget '3x': unknown unit 'x'" in mixed.json()["message"]
        typo = http.put("/admin/users/dave/budget", json={"tokenz": "2M"})
        assert typo.status_code == 422 and "tokenz" in typo.json()["message"]
        shown = {b["metric"]: b for b in http.get("/admin/users/dave/budget").json()["budgets"]}
        assert shown["tokens"]["limit"] == 1_000_000 and shown["gpu_time"]["gpu_model"] == "A100"
        assert shown["gpu_time"]["hard"] is True and shown["tokens"]["hard"] is False
    listed = mloc("users", "budget", "dave", env=env)
    assert "0 of 1M" in listed.stdout and "0s of 10h" in listed.stdout
    removed = mloc("users", "remove-budget", "dave", "--metric", "tokens", env=env)
    assert removed.returncode == 0 and "removed tokens/month" in removed.stdout
    assert "gpu_time (A100)" in removed.stdout and "0 of 1M" not in removed.stdout
    everything = mloc("users", "remove-budget", "dave", env=env)
    assert "removed gpu_time:A100/day" in everything.stdout and "dave: no budgets" in everything.stdout


# ------------------------------------------------------ what the hard budget's cancel says
def test_a_hard_budgets_cancel_says_budget_exhausted_for_an_unstarted_task_and_a_lost_workers_one(
    redis_url: str,
) -> None:
    within_one_utc_day(120)

    async def scenario() -> None:
        r, orch = await setup(redis_url, "bob")
        await budgets.set_budgets(r, "bob", budgets.budgets_of("day", {"cpu_time": "5s"}, hard=True))
        assigned = (await submit(orch, echo("bob")))["task_id"]
        running = (await submit(orch, echo("bob")))["task_id"]
        started = await orch.store.transition(running, moves.START, expect_worker="w1", new_attempt=True)
        assert started.ok
        await spend(orch, "bob", {"cpu_seconds": 10.0})
        assert sorted(await orch.overspend.stop()) == sorted([assigned, running])
        # Not started: cancelled at once, with the budget's code, not a user's.
        record = await orch.store.get(assigned)
        assert (record.state, record.reason_code) == ("cancelled", "budget_exhausted")
        assert (record.reason or "").startswith("cancelled: budget exhausted (hard limit): ")
        # Running: its worker is told; here the worker is lost before it answers, and the code stays.
        assert (await orch.store.get(running)).state == "cancelling"
        await requeue(orch.store, running, worker_id="w1", reason_code=Reason.WORKER_LOST, reason="worker w1 lost")
        record = await orch.store.get(running)
        assert (record.state, record.reason_code) == ("cancelled", "budget_exhausted")
        # A user's own cancel keeps its code.
        await budgets.remove_budgets(r, "bob")
        await asyncio.sleep(SUBMIT_CACHE_SEC)
        mine = (await submit(orch, echo("bob")))["task_id"]
        await cancel(orch.store, mine, by="bob")
        assert (await orch.store.get(mine)).reason_code == "cancelled_by_user"
        await r.aclose()

    asyncio.run(scenario())


# ----------------------------------------------------------- estimates and demand
def test_a_budget_held_task_is_told_it_waits_for_the_reset_and_is_not_demand(redis_url: str) -> None:
    within_one_utc_day(120)

    async def scenario() -> None:
        r, orch = await setup(redis_url, "alice")
        await spend(orch, "alice", {"prompt_tokens": 2_000_000})
        await budgets.set_budgets(r, "alice", budgets.budgets_of("month", {"tokens": "1M"}))
        await budgets.set_budgets(r, "alice", budgets.budgets_of("day", {"tokens": "1M"}))
        single = (await submit(orch, echo("alice")))["task_id"]
        bulk = [a["task_id"] for a in await orch.submit_many([validate(echo("alice")) for _ in range(2)], ADMIN)]
        found = await read_demand(r, limit=100)
        assert found.tasks == {} and found.held == 3
        # Both budgets hold it: it waits for the later reset, the month's.
        resets = next_month(utc_today())
        midnight = datetime.combine(resets, datetime.min.time(), tzinfo=UTC).timestamp()
        for task_id in (single, *bulk):
            asked = time.time()
            estimate = await orch.queue_estimate(await orch.store.get(task_id))
            assert estimate is not None and estimate["eta_sec"] is not None
            assert abs(asked + estimate["eta_sec"] - midnight) < 2, estimate
            assert estimate["basis"].startswith(f"waits for its owner's budget to reset at {resets} 00:00 UTC")
            assert "budget exhausted: 2M of 1M tokens this month" in estimate["basis"]
        await r.aclose()

    asyncio.run(scenario())


def test_a_quota_held_task_is_not_told_it_starts_at_once(redis_url: str) -> None:
    async def scenario() -> None:
        r, orch = await setup(redis_url, "bob")
        await users.set_quota(r, "bob", users.Quota(max_tasks=1))
        first = (await submit(orch, {**echo("bob"), "timeout_sec": 600}))["task_id"]
        assert (await orch.store.transition(first, moves.START, expect_worker="w1", new_attempt=True)).ok
        second = await submit(orch, echo("bob"))
        quota = (
            "user bob at quota: 1 of 1 concurrent tasks; it starts when one of them ends, or once an admin "
            "raises the quota: `mloc users set-quota bob --max-tasks 2`"
        )
        assert second["pending_reason"] == quota
        estimate = await orch.queue_estimate(await orch.store.get(second["task_id"]))
        assert estimate is not None and estimate["eta_sec"] is None, estimate
        assert estimate["basis"].startswith(
            "waits for one of bob's tasks to end; the first of them is expected to end in about "
        ), estimate
        assert quota not in estimate["basis"]  # why it waits is the pending_reason, shown beside it
        await r.aclose()

    asyncio.run(scenario())
