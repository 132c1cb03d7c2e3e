"""Every answer of the task flow is the one the OpenAPI document states.

The routes send their answers as they build them, and the document describes them apart
(mloc.api.answers); here real answers of a real orchestrator and worker are validated against the
served document. An object schema that does not say it takes more properties is held closed, so a
field added to an answer and not to its model fails here, as does a required field an answer lacks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import redis

from mloc.localcluster import LocalCluster
from tests.conftest import FAST_ENV, RedisServer
from tests.support.api import wait_for

TOKEN = "answers-admin-token"
ECHO = "taskType: echo\npayload: {n: 1}\n"
# Waits for a GPU no test worker has: it stays pending, with a queue estimate, until cancelled.
NO_ROOM = "taskType: echo\nresources: {hardware: {gpu: {type: H100, count: 1}}}\n"
PIPELINE = (
    "metadata: {name: first}\nspec: {taskType: echo}\n---\n"
    "metadata: {name: second}\nspec: {taskType: echo, dependsOn: [first]}\n"
)


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("answers")
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    with LocalCluster(
        home=home,
        workers=1,
        redis_url=url,
        results_dir=home / "results",
        env={**FAST_ENV, "ORCHESTRATOR_TOKEN": TOKEN, "RESULTS_DIR": str(home / "results")},
        log_dir=home / "logs",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def document(http: httpx.Client) -> dict[str, Any]:
    """The served document, its object schemas closed where they do not say they take more."""
    served = http.get("/openapi.json").json()
    _close(served["components"]["schemas"])
    return dict(served)


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


def _check(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> dict[str, Any]:
    """Validate ``response``'s body against what ``method path`` documents for its status; the body."""
    documented = document["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (method, path, response.status_code, response.text)
    schema = copy.deepcopy(documented[str(response.status_code)]["content"]["application/json"]["schema"])
    assert schema.keys() & {"$ref", "anyOf"}, (method, path, "documents no schema of its own", schema)
    _close(schema)
    body = response.json()
    jsonschema.Draft202012Validator({**schema, "components": document["components"]}).validate(body)
    return dict(body)


def _submit(http: httpx.Client, body: str, **params: str) -> httpx.Response:
    return http.post("/api/v1/tasks", content=body, params=params, headers={"Content-Type": "text/yaml"})


def test_submit_answers_are_documented(http: httpx.Client, document: dict[str, Any]) -> None:
    placed = _check(document, "post", "/api/v1/tasks", _submit(http, ECHO))  # the submit lane's
    assert placed["state"] == "assigned" and placed["worker_id"] == "local-1"
    routed = _check(document, "post", "/api/v1/tasks", _submit(http, ECHO, dry_run="false"))  # the route's
    assert set(routed) == set(placed)
    waiting = _check(document, "post", "/api/v1/tasks", _submit(http, NO_ROOM))
    assert waiting["state"] == "pending" and waiting["unschedulable"] is True
    checked = _check(document, "post", "/api/v1/tasks", _submit(http, NO_ROOM, dry_run="true"))
    assert checked["valid"] is True and "pending_reason" in checked
    http.post(f"/api/v1/tasks/{waiting['task_id']}/cancel").raise_for_status()
    for task in (placed, routed):
        wait_for(http, task["task_id"], {"succeeded"})


def test_bulk_answers_are_documented(http: httpx.Client, document: dict[str, Any]) -> None:
    def bulk(body: str, **params: str) -> dict[str, Any]:
        sent = http.post("/api/v1/tasks/bulk", content=body, params=params, headers={"Content-Type": "text/yaml"})
        return _check(document, "post", "/api/v1/tasks/bulk", sent)

    plain = bulk(ECHO + "---\n" + ECHO)
    assert plain["count"] == 2
    planned = bulk(PIPELINE)
    assert [task["name"] for task in planned["tasks"]] == ["first", "second"]
    assert bulk(PIPELINE, dry_run="true")["valid"] is True
    for task in plain["tasks"] + planned["tasks"]:
        wait_for(http, task["task_id"], {"succeeded"})


def test_task_record_page_and_result_answers_are_documented(http: httpx.Client, document: dict[str, Any]) -> None:
    done = _submit(http, ECHO).json()["task_id"]
    waiting = _submit(http, NO_ROOM).json()["task_id"]
    wait_for(http, done, {"succeeded"})
    record = _check(document, "get", "/api/v1/tasks/{task_id}", http.get(f"/api/v1/tasks/{done}"))
    assert record["state"] == "succeeded" and record["queue"] is None and record["spec"]
    queued = _check(document, "get", "/api/v1/tasks/{task_id}", http.get(f"/api/v1/tasks/{waiting}"))
    assert queued["queue"] is not None and queued["queue"]["position"] >= 1
    result = _check(document, "get", "/api/v1/tasks/{task_id}/result", http.get(f"/api/v1/tasks/{done}/result"))
    assert result["payload"] == {"n": 1}
    page = _check(document, "get", "/api/v1/tasks", http.get("/api/v1/tasks", params={"page_size": 500}))
    rows = {row["task_id"]: row for row in page["items"]}
    assert "spec" not in rows[done] and "queue_position" not in rows[done]
    assert rows[waiting]["queue_position"] >= 1
    pending = _check(document, "get", "/api/v1/tasks", http.get("/api/v1/tasks", params={"state": "pending"}))
    assert [row["task_id"] for row in pending["items"]] == [waiting]
    http.post(f"/api/v1/tasks/{waiting}/cancel").raise_for_status()


def test_worker_pages_are_documented_for_the_admin_and_a_user(http: httpx.Client, document: dict[str, Any]) -> None:
    user = http.post("/api/v1/admin/users", json={"name": "worker-reader"}).json()["token"]
    for token in (TOKEN, user):
        for path in ("/workers", "/api/v1/workers"):
            page = _check(document, "get", path, http.get(path, headers={"Authorization": f"Bearer {token}"}))
            assert [item["worker_id"] for item in page["items"]] == ["local-1"]


def test_stats_and_readiness_answers_are_documented(http: httpx.Client, document: dict[str, Any]) -> None:
    wait_for(http, _submit(http, ECHO).json()["task_id"], {"succeeded"})
    user = http.post("/api/v1/admin/users", json={"name": "budgeted"}).json()["token"]
    http.put("/api/v1/admin/users/budgeted/budget", json={"period": "day", "tokens": "1M"}).raise_for_status()
    for params in ({}, {"group_by": "week"}, {"group_by": "month"}, {"group_by": "total"}, {"user": "admin"}):
        stats = _check(document, "get", "/api/v1/stats", http.get("/api/v1/stats", params=params))
        assert "admin" in [entry["user"] for entry in stats["users"]], params
    own = _check(
        document, "get", "/api/v1/stats", http.get("/api/v1/stats", headers={"Authorization": f"Bearer {user}"})
    )
    assert own["users"][0]["budgets"][0]["metric"] == "tokens"
    assert _check(document, "get", "/readyz", http.get("/readyz"))["status"] == "ready"


def test_a_submit_answer_links_its_task_id_to_the_routes_of_that_task(document: dict[str, Any]) -> None:
    links = document["paths"]["/api/v1/tasks"]["post"]["responses"]["201"]["links"]
    operations = {
        operation["operationId"]: path for path, item in document["paths"].items() for operation in item.values()
    }
    linked = {operations[link["operationId"]] for link in links.values()}
    assert {"/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}/result", "/api/v1/tasks/{task_id}/cancel"} <= linked
    assert all(link["parameters"] == {"task_id": "$response.body#/task_id"} for link in links.values())
