"""GET /metrics on a real cluster: Prometheus figures that agree with what the JSON API shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from mloc import __version__
from mloc.api import metrics
from mloc.localcluster import LocalCluster
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.settings import Settings
from tests.reliability.conftest import restart_orchestrator
from tests.support.api import wait_for
from tests.support.clock import within_one_utc_day

TOKEN = "metrics-admin-token"
A100 = "NVIDIA A100-SXM4-80GB"
ECHO = b"taskType: echo\n"
SLOW_ECHO = b"taskType: echo\nhyperparameters: {sleep_sec: 5, steps: 5}\n"
NEEDS_H100 = b"taskType: echo\nresources: {hardware: {gpu: {type: H100, count: 1}}}\n"
FAILING = b"taskType: echo\nretries: 0\nhyperparameters: {fail_message: on purpose}\n"
YAML = {"Content-Type": "text/yaml"}


def scrape(cluster: LocalCluster, accept: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (sample name, sorted labels)."""
    headers = {"Accept": accept} if accept else {}
    response = httpx.get(cluster.api_url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def submit(http: httpx.Client, body: bytes) -> str:
    response = http.post("/api/v1/tasks", content=body, headers=YAML)
    assert response.status_code == 201, response.text
    return str(response.json()["task_id"])


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(
        2,
        env={"ORCHESTRATOR_TOKEN": TOKEN},
        worker_env=[{"MLOC_WORKER_GPUS": f"{A100}:2:81920"}, {}],
    )


def test_metrics_agree_with_the_api(cluster: LocalCluster) -> None:
    # mloc_usage_today is about the UTC day of the scrape: the tasks must end on that day.
    within_one_utc_day(120)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=cluster.api_url, headers=auth, timeout=10) as admin:
        user_token = admin.post("/admin/users", json={"name": "carol"}).json()["token"]
        carol = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {user_token}"}, timeout=10)
        with carol:
            done = [submit(admin, ECHO), submit(admin, ECHO), submit(carol, ECHO)]
        for task_id in done:
            wait_for(admin, task_id, {"succeeded"})
        running = submit(admin, SLOW_ECHO)
        wait_for(admin, running, {"running"})
        waiting = submit(admin, NEEDS_H100)
        assert wait_for(admin, waiting, {"pending"})["unschedulable"] is True

        samples = scrape(cluster)
        states = ("pending", "assigned", "running", "succeeded", "failed", "cancelled")
        api_counts = {
            s: admin.get("/api/v1/tasks", params={"state": s, "page_size": 1}).json()["total"] for s in states
        }
        assert api_counts["succeeded"] == 3 and api_counts["running"] == 1 and api_counts["pending"] == 1
        for state in states:
            assert value(samples, "mloc_tasks", state=state) == api_counts[state], state
        assert value(samples, "mloc_queue_depth") == 1

        workers = admin.get("/api/v1/workers").json()["items"]
        assert value(samples, "mloc_workers", status="active") == sum(w["status"] == "active" for w in workers) == 2
        assert value(samples, "mloc_workers", status="lost") == 0
        assert value(samples, "mloc_gpus", model=A100, state="total") == 2
        # echo tasks take no GPU, so both A100s are free, as the worker record says
        free_a100 = sum(len(w["free"]["gpus"]) for w in workers if w["worker_id"] == "local-1")
        assert value(samples, "mloc_gpus", model=A100, state="free") == free_a100 == 2
        slots_free = sum(w["free"]["slots"] for w in workers)
        assert value(samples, "mloc_worker_slots", state="free") == slots_free
        assert value(samples, "mloc_worker_slots", state="total") == sum(w["capacity"]["slots"] for w in workers)

        today = datetime.now(UTC).date().isoformat()
        stats = admin.get("/api/v1/stats", params={"start_date": today, "end_date": today}).json()["users"]
        assert {entry["user"] for entry in stats} == {"admin", "carol"}
        for counter in ("tasks", "wall_sec", "gpu_seconds", "prompt_tokens"):
            expected = sum(entry["totals"].get(counter, 0.0) for entry in stats)
            assert value(samples, "mloc_usage_today", counter=counter) == pytest.approx(expected), counter
        assert value(samples, "mloc_usage_today", counter="tasks") == 3

        started = [admin.get(f"/api/v1/tasks/{task_id}").json() for task_id in [*done, running]]
        waits = [task["started_at"] - task["created_at"] for task in started]
        assert value(samples, "mloc_task_wait_seconds_count") == len(waits) == 4
        assert value(samples, "mloc_task_wait_seconds_sum") == pytest.approx(sum(waits), abs=1e-6)
        assert value(samples, "mloc_task_wait_seconds_bucket", le="+Inf") == 4
        assert value(samples, "mloc_task_wait_seconds_bucket", le="86400.0") == 4

        # The API's own latency: labelled by route template, never by a raw path with a task id in it.
        posted = value(
            samples, "mloc_http_request_duration_seconds_count", method="POST", route="/api/v1/tasks", status="201"
        )
        assert posted == 5
        assert (
            value(
                samples,
                "mloc_http_request_duration_seconds_count",
                method="GET",
                route="/api/v1/tasks/{task_id}",
                status="200",
            )
            > 0
        )
        routes = {dict(labels).get("route", "") for (name, labels) in samples if name.startswith("mloc_http_request")}
        assert not any(task_id in route for route in routes for task_id in done)

        # Once the slow task ends the scrape follows: nothing runs, four succeeded.
        wait_for(admin, running, {"succeeded"})
        later = scrape(cluster)
        assert value(later, "mloc_tasks", state="running") == 0
        assert value(later, "mloc_tasks", state="succeeded") == 4
        assert value(later, "mloc_usage_today", counter="tasks") == 4


def outcomes(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """The echo tasks' ended counts of a scrape, by end state."""
    return {
        state: value(samples, "mloc_task_outcomes_total", task_type="echo", state=state)
        for state in ("succeeded", "failed", "cancelled")
    }


def test_operators_see_heartbeat_ages_the_build_and_ended_tasks_counted_across_a_restart(cluster: LocalCluster) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=cluster.api_url, headers=auth, timeout=10) as admin:
        for task_id in [submit(admin, ECHO) for _ in range(3)]:
            wait_for(admin, task_id, {"succeeded"})
        wait_for(admin, submit(admin, FAILING), {"failed"})
        waiting = submit(admin, NEEDS_H100)
        wait_for(admin, waiting, {"pending"})
        assert admin.post(f"/api/v1/tasks/{waiting}/cancel").status_code == 200
        wait_for(admin, waiting, {"cancelled"})

        samples = scrape(cluster)
        assert outcomes(samples) == {"succeeded": 3, "failed": 1, "cancelled": 1}
        assert value(samples, "mloc_build_info", version=__version__) == 1
        # Workers heartbeat every second (LocalCluster): well inside HEARTBEAT_TTL_SEC (3 s here).
        ages = {dict(labels)["worker"]: age for (name, labels), age in samples.items() if name == metrics.HEARTBEAT_AGE}
        assert set(ages) == {"local-1", "local-2"}
        assert all(0 <= age < 3 for age in ages.values()), ages
        api_ages = {w["worker_id"]: w["heartbeat_age_sec"] for w in admin.get("/api/v1/workers").json()["items"]}
        assert all(abs(api_ages[worker] - ages[worker]) < 2 for worker in ages), (api_ages, ages)

        # A worker that stops cleanly sends no more heartbeats, and is not expected to: no series.
        cluster.stop_worker("local-2")
        assert {dict(labels)["worker"] for (name, labels) in scrape(cluster) if name == metrics.HEARTBEAT_AGE} == {
            "local-1"
        }

        # A new orchestrator, which forgets finished tasks after a second: the counts are Redis's, not its own,
        # and not those of the tasks still kept.
        assert cluster.orchestrator is not None
        cluster.orchestrator.terminate()
        assert cluster.orchestrator.wait(30) == 0
        cluster.env = {**cluster.env, "MLOC_TASK_RETENTION_SEC": "1"}
        restart_orchestrator(cluster)
        assert outcomes(scrape(cluster)) == {"succeeded": 3, "failed": 1, "cancelled": 1}
        deadline = time.monotonic() + 30
        while value(later := scrape(cluster), "mloc_tasks", state="succeeded") > 0:
            assert time.monotonic() < deadline, "the finished tasks were not forgotten"
            time.sleep(0.2)
        assert value(later, "mloc_tasks", state="failed") == value(later, "mloc_tasks", state="cancelled") == 0
        assert outcomes(later) == {"succeeded": 3, "failed": 1, "cancelled": 1}

        wait_for(admin, submit(admin, ECHO), {"succeeded"})
    assert outcomes(scrape(cluster)) == {"succeeded": 4, "failed": 1, "cancelled": 1}


def test_each_task_type_seen_has_every_end_state_and_an_untyped_end_is_unknown() -> None:
    family = metrics._outcomes({"succeeded:echo": "3", "failed:sft": "2", "cancelled:": "1"})
    samples = {(s.labels["task_type"], s.labels["state"]): s.value for s in family.samples}
    assert {s.name for s in family.samples} == {"mloc_task_outcomes_total"}
    assert samples == {
        (task_type, state): 0.0 for task_type in ("echo", "sft", "unknown") for state in metrics.OUTCOMES
    } | {("echo", "succeeded"): 3.0, ("sft", "failed"): 2.0, ("unknown", "cancelled"): 1.0}


def test_metrics_need_no_token_while_the_api_does(cluster: LocalCluster) -> None:
    assert httpx.get(cluster.api_url + "/api/v1/tasks", timeout=10).status_code == 401
    response = httpx.get(cluster.api_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = scrape(cluster)
    assert value(samples, "mloc_gpus", model=A100, state="total") == 2
    # Prometheus asking for OpenMetrics gets it.
    open_metrics = httpx.get(
        cluster.api_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=10
    )
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.rstrip().endswith("# EOF")


def test_submit_to_start_histogram_reads_only_the_newest_tasks(
    cluster: LocalCluster, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as admin:
        ids = [submit(admin, ECHO) for _ in range(4)]
        records = [wait_for(admin, task_id, {"succeeded"}) for task_id in ids]
    monkeypatch.setattr(metrics, "WAIT_SAMPLE", 2)

    async def read() -> metrics.ClusterSnapshot:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await metrics.read_snapshot(
                Orchestrator(client, Settings.model_validate({"MLOC_REDIS_URL": redis_url}))
            )
        finally:
            await client.aclose()

    snapshot = asyncio.run(read())
    newest = sorted(records, key=lambda r: r["created_at"])[-2:]
    assert snapshot.waits == pytest.approx([r["started_at"] - r["created_at"] for r in reversed(newest)])
    assert snapshot.tasks_by_state["succeeded"] == 4


def test_several_apps_in_one_process_keep_their_own_metrics(redis_url: str) -> None:
    from fastapi.testclient import TestClient

    from mloc.api.app import create_app

    settings = Settings.model_validate({"MLOC_REDIS_URL": redis_url})
    first, second = create_app(settings), create_app(settings)
    with TestClient(first) as one, TestClient(second) as two:
        for _ in range(3):
            assert one.get("/healthz").status_code == 200
        assert two.get("/healthz").status_code == 200
        first_samples = parse(one.get("/metrics").text)
        second_samples = parse(two.get("/metrics").text)
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(first_samples, "mloc_http_request_duration_seconds_count", **labels) == 3
    assert value(second_samples, "mloc_http_request_duration_seconds_count", **labels) == 1
