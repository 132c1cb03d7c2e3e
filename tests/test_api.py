"""The orchestrator over real HTTP: both seeds' endpoints, auth, bad input as clear 4xx answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis

from mloc import keys
from mloc.localcluster import LocalCluster
from tests.conftest import FAST_ENV, RedisServer
from tests.support.api import wait_for

ECHO = "taskType: echo\npayload: {n: 1}\n"
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def api_redis_url(redis_server: RedisServer) -> str:
    """A database of its own, shared by this module's tests (they tell their tasks apart by owner)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def cluster(api_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("api")
    with LocalCluster(
        home=home,
        workers=1,
        redis_url=api_redis_url,
        results_dir=home / "results",
        env={**FAST_ENV, "ORCHESTRATOR_TOKEN": TOKEN},
        log_dir=home / "logs",
    ) as running:
        yield running


@pytest.fixture
def owner(request: pytest.FixtureRequest) -> str:
    return "u" + uuid.uuid4().hex[:10]


@pytest.fixture
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
        yield client


def test_health_in_both_spellings_needs_no_token(cluster: LocalCluster) -> None:
    for path in ("/healthz", "/health", "/readyz"):
        response = httpx.get(cluster.api_url + path)
        assert response.status_code == 200, path
        assert response.json()["ok"] is True


def test_submit_yaml_as_seed_one_shows(http: httpx.Client) -> None:
    response = http.post("/api/v1/tasks", content=ECHO, headers={"Content-Type": "text/yaml"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) >= {"ok", "task_id", "worker_id", "topic"}
    assert body["ok"] is True and body["worker_id"] == "local-1" and body["topic"] == "tasks.echo"
    done = wait_for(http, body["task_id"], {"succeeded"})
    assert done["owner"] == "admin" and done["attempts"] == 1
    assert http.get(f"/api/v1/tasks/{body['task_id']}/result").json()["payload"] == {"n": 1}


def test_submit_yaml_with_json_content_type_as_seed_two_does(http: httpx.Client) -> None:
    body = "taskType: echo\nmetadata: {owner: john-doe}\n"
    response = http.post("/api/v1/tasks", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 201
    task = wait_for(http, response.json()["task_id"], {"succeeded"})
    assert task["owner"] == "john-doe"


def test_submit_json(http: httpx.Client) -> None:
    response = http.post(
        "/api/v1/tasks", json={"apiVersion": "mloc/v1", "kind": "EchoTask", "spec": {"taskType": "echo"}}
    )
    assert response.status_code == 201


def test_auth_is_required_and_compared(cluster: LocalCluster) -> None:
    url = cluster.api_url + "/api/v1/tasks"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert httpx.get(cluster.api_url + "/workers").status_code == 401
    assert httpx.post(cluster.api_url + "/admin/cleanup").status_code == 401
    assert "bearer" in httpx.get(url).json()["message"].lower()


def test_users_see_and_cancel_only_their_own_tasks(http: httpx.Client, cluster: LocalCluster) -> None:
    alice = http.post("/admin/users", json={"name": "alice"}).json()["token"]
    bob = http.post("/admin/users", json={"name": "bob"}).json()["token"]
    as_alice = {"Authorization": f"Bearer {alice}"}
    as_bob = {"Authorization": f"Bearer {bob}"}
    slow = "taskType: echo\nhyperparameters: {sleep_sec: 30}\n"
    task = httpx.post(cluster.api_url + "/api/v1/tasks", content=slow, headers=as_alice).json()["task_id"]
    mine = httpx.get(cluster.api_url + "/api/v1/tasks", headers=as_alice).json()
    assert [t["owner"] for t in mine["items"]] == ["alice"]
    assert httpx.get(cluster.api_url + "/api/v1/tasks", headers=as_bob).json()["total"] == 0
    assert httpx.get(cluster.api_url + f"/api/v1/tasks/{task}", headers=as_bob).status_code == 404
    assert httpx.post(cluster.api_url + f"/api/v1/tasks/{task}/cancel", headers=as_bob).status_code == 404
    assert httpx.get(cluster.api_url + f"/api/v1/tasks/{task}/metrics", headers=as_bob).status_code == 404
    assert httpx.get(cluster.api_url + f"/api/v1/tasks/{task}/metrics", headers=as_alice).json()["metrics"] == []
    spoof = httpx.post(
        cluster.api_url + "/api/v1/tasks", content="taskType: echo\nmetadata: {owner: bob}\n", headers=as_alice
    )
    assert spoof.status_code == 403 and "belongs to 'alice'" in spoof.json()["message"]
    assert httpx.post(cluster.api_url + "/admin/cleanup", headers=as_alice).status_code == 403
    assert httpx.get(cluster.api_url + "/api/v1/stats?user=bob", headers=as_alice).status_code == 403
    assert httpx.post(cluster.api_url + f"/api/v1/tasks/{task}/cancel", headers=as_alice).status_code == 200
    wait_for(http, task, {"cancelled"})


def test_an_admin_body_sent_as_a_form_names_the_content_type(http: httpx.Client, owner: str) -> None:
    """`curl -d '{...}'` sends the JSON as a form: the answer says which header to send."""
    http.post("/admin/users", json={"name": owner})
    form = http.put(
        f"/admin/users/{owner}/quota",
        content=b'{"max_tasks": 1}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 422
    assert "send the body as JSON with 'Content-Type: application/json'" in form.json()["message"]
    assert "(this request's: application/x-www-form-urlencoded)" in form.json()["message"]
    sent = http.put(f"/admin/users/{owner}/quota", json={"max_tasks": 1})
    assert sent.status_code == 200, sent.text


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("spec: [oops\n", 422, "invalid YAML"),
        ("taskType: nope\n", 422, "unknown taskType"),
        ("apiVersion: mloc/v1\nkind: Banana\nspec: {taskType: echo}\n", 422, "kind 'Banana'"),
        ("taskType: inference\ninference: {prompts: [hi], max_tokens: -3}\n", 422, "spec.inference.max_tokens"),
        ("taskType: echo\nresources: {hardware: {cpu: '-2'}}\n", 422, "spec.resources.hardware.cpu"),
        ("taskType: echo\nresources: {hardware: {cpu: .inf}}\n", 422, "finite"),
        ('{"taskType": "echo", "resources": {"hardware": {"cpu": 1e999}}}', 422, "finite"),
        ("taskType: echo\nresources: {hardware: {memory: 1" + "0" * 400 + "}}\n", 422, "more than 1Pi"),
        ("taskType: echo\nmetadata: {name: '../../etc'}\n", 422, "metadata.name"),
        ("", 422, "empty"),
    ],
)
def test_bad_tasks_are_clear_4xx_and_store_nothing(
    http: httpx.Client, api_redis_url: str, body: str, status: int, needle: str
) -> None:
    before = redis.Redis.from_url(api_redis_url).zcard(keys.TASKS_ALL)
    response = http.post("/api/v1/tasks", content=body)
    assert response.status_code == status
    payload = response.json()
    assert payload["ok"] is False and needle in payload["message"]
    assert redis.Redis.from_url(api_redis_url).zcard(keys.TASKS_ALL) == before


def test_oversized_body_is_refused(http: httpx.Client) -> None:
    response = http.post("/api/v1/tasks", content=b"taskType: echo\npayload: '" + b"x" * 2_000_000 + b"'\n")
    assert response.status_code == 413
    assert "MLOC_MAX_BODY_BYTES" in response.json()["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tasks/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/tasks/not-a-uuid",
        "/api/v1/tasks/00000000-0000-0000-0000-000000000000",
        "/workers/nope",
        "/api/v1/workers/..",
    ],
)
def test_unknown_or_hostile_ids(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code in (400, 404)
    assert response.json()["ok"] is False


def test_a_task_id_in_upper_case_names_the_same_task(http: httpx.Client) -> None:
    task_id = http.post("/api/v1/tasks", content=ECHO).json()["task_id"]
    wait_for(http, task_id, {"succeeded"})
    shown = http.get(f"/api/v1/tasks/{task_id.upper()}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["task_id"] == task_id
    assert http.get(f"/api/v1/tasks/{task_id.upper()}/result").json()["payload"] == {"n": 1}


def test_pagination_and_filters(http: httpx.Client, owner: str) -> None:
    body = ECHO + f"metadata: {{owner: {owner}}}\n"
    ids = [http.post("/api/v1/tasks", content=body).json()["task_id"] for _ in range(5)]
    for task_id in ids:
        wait_for(http, task_id, {"succeeded"})
    page = http.get("/api/v1/tasks", params={"page": 2, "page_size": 2, "owner": owner}).json()
    assert page["total"] == 5 and len(page["items"]) == 2
    assert [t["task_id"] for t in page["items"]] == ids[::-1][2:4]
    assert http.get("/api/v1/tasks", params={"state": "succeeded", "owner": owner}).json()["total"] == 5
    assert http.get("/api/v1/tasks", params={"state": "failed", "owner": owner}).json()["total"] == 0
    assert http.get("/api/v1/tasks", params={"page": 0}).status_code == 422
    assert http.get("/api/v1/tasks", params={"page_size": 100000}).status_code == 422
    assert http.get("/api/v1/tasks", params={"state": "sleeping"}).status_code == 422


def test_a_cursor_lists_each_task_once_while_tasks_arrive_and_leave_their_state(http: httpx.Client, owner: str) -> None:
    # Tasks that wait (no worker takes this tag): pending until cancelled.
    body = f"taskType: echo\nmetadata: {{owner: {owner}}}\nresources: {{tags: [nowhere]}}\n"
    ids = [http.post("/api/v1/tasks", content=body).json()["task_id"] for _ in range(7)]
    params: dict[str, str | int] = {"owner": owner, "state": "pending", "page_size": 2}
    seen: list[str] = []
    after: str | None = None
    while True:
        page = http.get("/api/v1/tasks", params={**params, "after": after} if after else params).json()
        seen += [t["task_id"] for t in page["items"]]
        after = page["next_after"]
        if after is None:
            break
        # Between pages: one just read leaves pending, and a new one arrives (newest: before every cursor).
        http.post(f"/api/v1/tasks/{page['items'][0]['task_id']}/cancel")
        http.post("/api/v1/tasks", content=body)
    assert seen == ids[::-1]  # by page numbers, each cancel would have moved one task past the next page
    last = http.get("/api/v1/tasks", params={"owner": owner, "page_size": 500}).json()
    assert last["next_after"] is None
    both = http.get("/api/v1/tasks", params={"page": 2, "after": f"1.0:{ids[0]}"})
    assert both.status_code == 400 and "not both" in both.json()["message"]
    for garbage in ("yesterday", "nan:x", "12"):
        bad = http.get("/api/v1/tasks", params={"after": garbage})
        assert bad.status_code == 400 and "next_after" in bad.json()["message"], garbage
    for task_id in http.get("/api/v1/tasks", params={"owner": owner, "state": "pending", "page_size": 500}).json()[
        "items"
    ]:
        http.post(f"/api/v1/tasks/{task_id['task_id']}/cancel")


def test_a_query_parameter_an_endpoint_does_not_take_is_refused(http: httpx.Client, owner: str) -> None:
    # A misspelt filter would list every task, read as the ones asked for.
    misspelt = http.get("/api/v1/tasks", params={"stat": "pending", "owner": owner})
    assert misspelt.status_code == 422, misspelt.text
    message = misspelt.json()["message"]
    assert "unknown query parameter 'stat' for /api/v1/tasks" in message and "state" in message
    assert misspelt.json()["details"] == [{"path": "query.stat", "message": "not a parameter of this endpoint"}]
    two = http.get("/api/v1/workers", params={"a": "1", "b": "2"})
    assert two.status_code == 422 and "parameters 'a', 'b'" in two.json()["message"]
    assert http.get("/api/v1/tasks", params={"state": "pending", "owner": owner}).status_code == 200
    # An operation without parameters, and the OpenAI-compatible routes in their own error shape.
    assert http.get("/healthz", params={"verbose": "1"}).status_code == 422
    batches = http.get("/v1/batches", params={"limit": 2, "page": 3})
    assert batches.status_code == 422 and "'page'" in batches.json()["error"]["message"]
    # The dashboard's page is not an API operation: what a browser adds to its URL is not refused.
    assert http.get("/dashboard", params={"utm_source": "mail"}).status_code == 200


def test_workers_in_both_spellings(http: httpx.Client) -> None:
    for path in ("/workers", "/api/v1/workers"):
        body = http.get(path).json()
        assert body["total"] == 1 and body["items"][0]["worker_id"] == "local-1"
    worker = http.get("/api/v1/workers/local-1").json()
    assert worker["status"] == "active" and worker["hardware"]["cpu_milli"] > 0
    assert "echo" in worker["task_types"]


def test_dry_run_stores_nothing(http: httpx.Client, owner: str) -> None:
    task = ECHO + f"metadata: {{owner: {owner}}}\n"
    body = http.post("/api/v1/tasks", params={"dry_run": "true"}, content=task).json()
    assert body["valid"] is True and body["would_place_on"] == ["local-1"]
    assert http.get("/api/v1/tasks", params={"owner": owner}).json()["total"] == 0
    gpu = http.post(
        "/api/v1/tasks",
        params={"dry_run": "true"},
        content="taskType: echo\nresources: {hardware: {gpu: {count: 1}}}\n",
    ).json()
    assert gpu["unschedulable"] is True and "GPU" in gpu["pending_reason"]


def test_bulk_submit_is_all_or_nothing(http: httpx.Client, owner: str) -> None:
    good = {"metadata": {"owner": owner}, "spec": {"taskType": "echo", "payload": 1}}
    bad = {"metadata": {"owner": owner}, "spec": {"taskType": "echo", "priority": 99999}}
    refused = http.post("/api/v1/tasks/bulk", json={"tasks": [good, bad, good]})
    assert refused.status_code == 422 and refused.json()["details"][0]["index"] == 1
    assert http.get("/api/v1/tasks", params={"owner": owner}).json()["total"] == 0
    accepted = http.post("/api/v1/tasks/bulk", json=[good] * 10).json()
    assert accepted["count"] == 10
    # Queued, and listed newest first, in the order given, though they share their submit millisecond.
    listed = http.get("/api/v1/tasks", params={"owner": owner}).json()["items"]
    assert [item["task_id"] for item in listed] == [task["task_id"] for task in reversed(accepted["tasks"])]
    for task in accepted["tasks"]:
        wait_for(http, task["task_id"], {"succeeded"})
    yaml_stream = "spec: {taskType: echo}\n---\nspec: {taskType: echo}\n"
    assert (
        http.post("/api/v1/tasks/bulk", content=yaml_stream, headers={"Content-Type": "text/yaml"}).json()["count"] == 2
    )


def test_bulk_dry_run_checks_every_task_and_stores_none(http: httpx.Client, owner: str) -> None:
    stream = (
        f"metadata: {{name: first, owner: {owner}}}\nspec: {{taskType: echo}}\n---\n"
        f"metadata: {{name: second, owner: {owner}}}\nspec: {{taskType: echo, dependsOn: [first]}}\n---\n"
    )
    checked = http.post("/api/v1/tasks/bulk", params={"dry_run": "true"}, content=stream)
    assert checked.status_code == 201, checked.text
    body = checked.json()
    assert body["valid"] is True and body["count"] == 2  # the trailing --- holds no task
    assert all(task["would_place_on"] == ["local-1"] for task in body["tasks"])
    assert http.get("/api/v1/tasks", params={"owner": owner}).json()["total"] == 0
    # The graph is planned as its submit would plan it: a step naming no task is refused.
    broken = stream.replace("dependsOn: [first]", "dependsOn: [frist]")
    refused = http.post("/api/v1/tasks/bulk", params={"dry_run": "true"}, content=broken)
    assert refused.status_code == 422 and "frist" in refused.text
    # Submitted for real, the step that waits for nothing is placed at once, and says so.
    tasks = http.post("/api/v1/tasks/bulk", content=stream).json()["tasks"]
    assert [task["state"] for task in tasks] == ["assigned", "pending"], tasks
    for task in tasks:
        wait_for(http, task["task_id"], {"succeeded"})


def test_several_documents_sent_as_one_task_are_pointed_at_the_bulk_endpoint(http: httpx.Client) -> None:
    answer = http.post("/api/v1/tasks", content="taskType: echo\n---\ntaskType: echo\n")
    assert answer.status_code == 422 and "/api/v1/tasks/bulk" in answer.json()["message"]


def test_stats_as_seed_two_shows(http: httpx.Client, owner: str) -> None:
    task = http.post("/api/v1/tasks", content=f"taskType: echo\nmetadata: {{owner: {owner}}}\n").json()["task_id"]
    wait_for(http, task, {"succeeded"})
    # Seed 2 asks from a fixed day on (2024-01-01) up to today: years back, so any range length answers.
    ten_years_ago = (datetime.now(UTC).date() - timedelta(days=3653)).isoformat()
    response = http.get("/api/v1/stats", params={"user": owner, "start_date": ten_years_ago})
    assert response.status_code == 200, response.text
    body = response.json()
    totals = body["users"][0]["totals"]
    assert totals["tasks"] == 1 and totals["tasks.echo.succeeded"] == 1 and totals["wall_sec"] > 0
    assert [day["tasks"] for day in body["users"][0]["days"]] == [1]
    by_month = http.get("/api/v1/stats", params={"user": owner, "start_date": ten_years_ago, "group_by": "month"})
    assert [period["tasks"] for period in by_month.json()["users"][0]["periods"]] == [1]
    assert http.get("/api/v1/stats", params={"group_by": "year"}).status_code == 422
    later = datetime.now(UTC).date() + timedelta(days=31)
    wrong_way = http.get(
        "/api/v1/stats", params={"start_date": later.isoformat(), "end_date": (later - timedelta(days=1)).isoformat()}
    )
    assert wrong_way.status_code == 400 and "swap" in wrong_way.json()["message"]
    # A day is YYYY-MM-DD, a day of the calendar: not a word, a number taken for a timestamp, or February 30th.
    for day in ("yesterday", "0", "20260131", "2026-02-30"):
        refused = http.get("/api/v1/stats", params={"start_date": day})
        assert refused.status_code == 400, day
        assert refused.json()["message"] == (
            f"start_date {day!r} is not a day of the calendar; give YYYY-MM-DD, e.g. 2026-01-31"
        )


def test_an_adapter_named_by_a_task_that_makes_none_or_by_a_short_id_is_refused_at_submit(http: httpx.Client) -> None:
    echo = http.post("/api/v1/tasks", content=b"taskType: echo\n").json()["task_id"]

    def with_adapter(path: str) -> httpx.Response:
        model = f"{{source: {{type: package, identifier: mloc-tiny-llama}}, adapter: {{path: '{path}'}}}}"
        spec = f"taskType: inference\nmodel: {model}\ninference: {{prompts: [hi]}}\n"
        return http.post("/api/v1/tasks", content=spec)

    # The admin's task too: it would only fail on its worker.
    refused = with_adapter(echo)
    assert refused.status_code == 422, refused.text
    assert refused.json()["message"] == (
        f"spec.model.adapter.path names task {echo}, of type echo, which makes no adapter; name a dpo or grpo or "
        "ppo or sft task"
    )
    short = with_adapter(echo[:8])
    assert short.status_code == 422, short.text
    assert short.json()["message"] == (
        f"spec.model.adapter.path '{echo[:8]}' is the start of task {echo}'s id, but the field takes a folder or a "
        f"full task id: give {echo}, or write model.adapter.from: {echo[:8]}"
    )
    # A training task that has not succeeded has no adapter: a path is not waited for, as `from` is.
    sft = (
        b"taskType: sft\nmodel: {source: mloc-tiny-llama}\ndataset: {examples: [{prompt: a, completion: b}]}\n"
        b"resources: {hardware: {gpu: {count: 1}}}\n"  # no worker here has one: it waits
    )
    training = http.post("/api/v1/tasks", content=sft).json()["task_id"]
    waiting = with_adapter(training)
    assert waiting.status_code == 422, waiting.text
    assert waiting.json()["message"] == (
        f"spec.model.adapter.path names task {training}, which is pending: it has no adapter yet, and a path is not "
        f"waited for; write model.adapter.from: {training} to run once it has succeeded"
    )
    assert http.post(f"/api/v1/tasks/{training}/cancel").status_code == 200
    ended = with_adapter(training)
    assert ended.status_code == 422 and ended.json()["message"] == (
        f"spec.model.adapter.path names task {training}, which cancelled, so it has no adapter to load; resume it "
        f"(`mloc resume {training[:8]}`) or name another dpo or grpo or ppo or sft task"
    ), ended.text


def test_a_listing_by_a_task_type_mloc_does_not_know_says_so(http: httpx.Client) -> None:
    refused = http.get("/api/v1/tasks", params={"task_type": "infrence"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["message"].startswith("task_type 'infrence' is not a task type MLOC knows; give one of ")
    assert "inference" in refused.json()["message"]
    # A known type with no tasks is an empty page, as ever.
    assert http.get("/api/v1/tasks", params={"task_type": "ppo"}).json()["total"] == 0


def test_stats_count_a_task_that_ended_without_running(http: httpx.Client, owner: str) -> None:
    # Queued for a GPU no worker has, then cancelled: it ended, so it counts, once.
    gpu = f"taskType: echo\nmetadata: {{owner: {owner}}}\nresources: {{hardware: {{gpu: {{count: 8}}}}}}\n"
    queued = http.post("/api/v1/tasks", content=gpu).json()["task_id"]
    assert http.post(f"/api/v1/tasks/{queued}/cancel").json()["state"] == "cancelled"
    assert http.post(f"/api/v1/tasks/{queued}/cancel").status_code == 409  # a second cancel counts nothing
    totals = http.get("/api/v1/stats", params={"user": owner}).json()["users"][0]["totals"]
    assert (totals["tasks"], totals["tasks.echo.cancelled"], totals["state.cancelled"]) == (1, 1, 1), totals


def test_logs_and_openapi(http: httpx.Client) -> None:
    task = http.post("/api/v1/tasks", content="taskType: echo\nhyperparameters: {isolate: true}\n").json()["task_id"]
    wait_for(http, task, {"succeeded"})
    assert http.get(f"/api/v1/tasks/{task}/logs").json()["ok"] is True
    spec = http.get("/openapi.json").json()
    assert "/api/v1/tasks" in spec["paths"] and "/admin/cleanup" in spec["paths"]
    assert http.get("/docs").status_code == 200
    schema = http.get("/api/v1/schema").json()
    assert len(schema["oneOf"]) >= 8


def test_cancel_a_finished_task_is_a_conflict(http: httpx.Client) -> None:
    task = http.post("/api/v1/tasks", content=ECHO).json()["task_id"]
    wait_for(http, task, {"succeeded"})
    response = http.post(f"/api/v1/tasks/{task}/cancel")
    assert response.status_code == 409 and "succeeded" in response.json()["message"]


def test_result_of_unfinished_task_is_404_with_state(http: httpx.Client) -> None:
    task = http.post("/api/v1/tasks", content="taskType: echo\nhyperparameters: {sleep_sec: 5}\n").json()["task_id"]
    response = http.get(f"/api/v1/tasks/{task}/result")
    assert response.status_code == 404 and "no result yet" in response.json()["message"]
    assert json.loads(http.post(f"/api/v1/tasks/{task}/cancel").text)["ok"] is True
    # Cancelled, it never will have one.
    wait_for(http, task, {"cancelled"})
    ended = http.get(f"/api/v1/tasks/{task}/result").json()["message"]
    assert ended == f"task {task} has no result (it is cancelled)"


def test_the_readmes_list_url_with_its_filters_left_empty_lists_everything(http: httpx.Client, owner: str) -> None:
    accepted = http.post("/api/v1/tasks", content=ECHO + f"metadata: {{owner: {owner}}}\n").json()
    listed = http.get(f"/api/v1/tasks?page=1&page_size=10&state=&owner={owner}&task_type=&children=")
    assert listed.status_code == 200, listed.text
    assert [item["task_id"] for item in listed.json()["items"]] == [accepted["task_id"]]
    wrong = http.get("/api/v1/tasks", params={"state": "done"})
    assert wrong.status_code == 422 and "query.state" in wrong.text


def test_head_is_answered_wherever_get_is(http: httpx.Client) -> None:
    task = http.post("/api/v1/tasks", content=ECHO).json()["task_id"]
    wait_for(http, task, {"succeeded"})
    missing = str(uuid.uuid4())
    for path in (f"/api/v1/tasks/{task}", f"/api/v1/tasks/{task}/result", f"/api/v1/tasks/{missing}", "/healthz"):
        got, head = http.get(path), http.head(path)
        assert head.status_code == got.status_code, path
        assert head.content == b"", path
        for header in ("content-type", "content-length"):
            assert head.headers[header] == got.headers[header], (path, header)
    # Where GET is not answered, neither is HEAD.
    refused = http.head("/admin/cleanup")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST" and refused.content == b""
    # A followed log answers its headers at once, not when its task ends.
    running = http.post("/api/v1/tasks", content="taskType: echo\nhyperparameters: {sleep_sec: 30}\n").json()["task_id"]
    followed = http.head(f"/api/v1/tasks/{running}/logs", params={"follow": "true"}, timeout=5)
    assert followed.status_code == 200 and followed.headers["content-type"].startswith("text/event-stream")
    http.post(f"/api/v1/tasks/{running}/cancel").raise_for_status()


def test_a_method_a_path_lacks_is_a_405_that_lists_those_it_has(http: httpx.Client) -> None:
    trace = http.request("TRACE", "/admin/cleanup")
    assert trace.status_code == 405 and trace.headers["allow"] == "POST"
    assert trace.json() == {
        "ok": False,
        "error": "method_not_allowed",
        "message": "method TRACE is not allowed on /admin/cleanup; use POST",
    }
    # Every route on the path counts, not only the first the router tried.
    several = http.delete("/api/v1/tasks")
    assert several.headers["allow"] == "GET, HEAD, POST"
    assert several.json()["message"] == "method DELETE is not allowed on /api/v1/tasks; use GET, HEAD or POST"
    openai = http.put("/v1/batches")
    assert openai.status_code == 405 and openai.headers["allow"] == "GET, HEAD, POST"
    assert openai.json()["error"]["message"] == "method PUT is not allowed on /v1/batches; use GET, HEAD or POST"


def test_a_json_body_that_does_not_parse_is_a_400_that_says_where(http: httpx.Client) -> None:
    as_json = {"Content-Type": "application/json"}
    refused = http.post("/api/v1/admin/users", content=b"{not json", headers=as_json)
    assert refused.status_code == 400, refused.text
    assert refused.json() == {
        "ok": False,
        "error": "bad_request",
        "message": "invalid JSON at line 1, column 2: Expecting property name enclosed in double quotes",
    }
    # Said as a task body's broken JSON is.
    broken = b'{\n  "name": }'
    said = http.post("/api/v1/admin/users", content=broken, headers=as_json).json()["message"]
    assert said == http.post("/api/v1/tasks", content=broken, headers=as_json).json()["message"]
    assert said == "invalid JSON at line 2, column 11: Expecting value"
    # OpenAI's shape on /v1: no parameter is at fault.
    batch = http.post("/v1/batches", content=b"{not json", headers=as_json)
    assert batch.status_code == 400
    assert batch.json() == {
        "error": {
            "message": "invalid JSON at line 1, column 2: Expecting property name enclosed in double quotes",
            "type": "invalid_request_error",
            "param": None,
            "code": "bad_request",
        }
    }


def test_a_401_names_the_bearer_scheme(cluster: LocalCluster) -> None:
    for method, path in (
        ("GET", "/api/v1/tasks"),
        ("POST", "/api/v1/tasks"),  # the submit lane's answer
        ("POST", "/admin/cleanup"),
        ("GET", "/v1/batches"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.request(method, cluster.api_url + path, headers=headers, content=ECHO)
            assert refused.status_code == 401, (method, path)
            assert refused.headers["www-authenticate"] == "Bearer", (method, path)
    # Another scheme is named, not taken for no header at all; the lane says it as the routes do.
    for path in ("/api/v1/tasks", "/admin/cleanup"):
        basic = httpx.post(cluster.api_url + path, headers={"Authorization": "Basic dXNlcjpwdw=="}, content=ECHO)
        assert basic.status_code == 401 and basic.json()["message"] == (
            "the Authorization header uses the 'Basic' scheme; send 'Authorization: Bearer <token>'"
        )


def test_only_the_budget_endpoint_points_a_user_at_their_stats(http: httpx.Client, cluster: LocalCluster) -> None:
    name = "u" + uuid.uuid4().hex[:10]
    as_user = {"Authorization": f"Bearer {http.post('/admin/users', json={'name': name}).json()['token']}"}
    refused = f"this endpoint is for the admin (ORCHESTRATOR_TOKEN); the token sent is that of user '{name}'"
    for method, path in (
        ("POST", "/admin/cleanup"),
        ("GET", "/api/v1/admin/users"),
        ("POST", f"/admin/users/{name}/token"),
        ("POST", "/api/v1/workers/local-1/cordon"),
        ("PUT", f"/api/v1/admin/users/{name}/budget"),
    ):
        answer = httpx.request(method, cluster.api_url + path, headers=as_user, json={})
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["message"] == refused, (method, path)
    budget = httpx.get(cluster.api_url + f"/admin/users/{name}/budget", headers=as_user)
    assert budget.status_code == 403
    assert budget.json()["message"] == refused + "; your own budgets and usage are in GET /api/v1/stats (`mloc stats`)"


def test_another_users_task_is_answered_as_a_missing_one(http: httpx.Client, cluster: LocalCluster) -> None:
    tokens = [http.post("/admin/users", json={"name": "u" + uuid.uuid4().hex[:10]}).json()["token"] for _ in range(2)]
    owner, other = ({"Authorization": f"Bearer {token}"} for token in tokens)
    task = httpx.post(cluster.api_url + "/api/v1/tasks", content=ECHO, headers=owner).json()["task_id"]
    wait_for(http, task, {"succeeded"})
    missing = str(uuid.uuid4())
    for method, route in (
        ("GET", ""),
        ("GET", "/result"),
        ("GET", "/metrics"),
        ("GET", "/logs"),
        ("GET", "/results"),
        ("GET", "/artifacts"),
        ("POST", "/cancel"),
        ("POST", "/resume"),
    ):
        theirs = httpx.request(method, cluster.api_url + f"/api/v1/tasks/{task}{route}", headers=other)
        nobodys = httpx.request(method, cluster.api_url + f"/api/v1/tasks/{missing}{route}", headers=other)
        assert theirs.status_code == nobodys.status_code == 404, (method, route)
        assert theirs.text.replace(task, "ID") == nobodys.text.replace(missing, "ID"), (method, route)
    assert nobodys.json()["message"] == (
        f"task {missing} not found; list tasks with GET /api/v1/tasks (a finished task is removed "
        "MLOC_TASK_RETENTION_SEC after it ended)"
    )


def test_each_task_of_a_bulk_submit_is_held_to_the_body_limit(
    http: httpx.Client, api_redis_url: str, owner: str
) -> None:
    def task(payload_bytes: int) -> dict[str, object]:
        return {"metadata": {"owner": owner}, "spec": {"taskType": "echo", "payload": "x" * payload_bytes}}

    big = task(1_100_000)  # over MLOC_MAX_BODY_BYTES (1 MiB) by itself
    assert http.post("/api/v1/tasks", json=big).status_code == 413
    before = redis.Redis.from_url(api_redis_url).zcard(keys.TASKS_ALL)
    as_yaml = "".join(
        f"metadata: {{owner: {owner}}}\nspec: {{taskType: echo, payload: {'x' * size}}}\n---\n"
        for size in (1, 1_100_000)
    )
    for refused in (
        http.post("/api/v1/tasks/bulk", json=[task(1), big]),
        http.post("/api/v1/tasks/bulk", content=as_yaml, headers={"Content-Type": "text/yaml"}),
    ):
        assert refused.status_code == 413, refused.text
        body = refused.json()
        assert body["error"] == "payload_too_large" and body["details"][0]["index"] == 1
        assert body["message"].startswith("task 1 of the bulk submit is 1100")
        assert "MLOC_MAX_BODY_BYTES (1048576 bytes)" in body["message"]
    assert redis.Redis.from_url(api_redis_url).zcard(keys.TASKS_ALL) == before
    # Together over the limit, each under it: the bulk body may be 16 times as large.
    accepted = http.post("/api/v1/tasks/bulk", json=[task(600_000)] * 3)
    assert accepted.status_code == 201, accepted.text
    for submitted in accepted.json()["tasks"]:
        wait_for(http, submitted["task_id"], {"succeeded"})
