"""A plain submit is answered by mloc.api.submit_lane, any other by the FastAPI route: over real HTTP,
the two give the same answers, store the same task, and are counted alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from starlette.types import Message

from mloc import keys
from mloc.api import tasks
from mloc.api.app import create_app
from mloc.localcluster import LocalCluster
from mloc.settings import Settings
from tests.support.api import wait_for
from tests.test_metrics import scrape, value

TOKEN = "lane-admin-token"
LIMIT = 4096  # MLOC_MAX_BODY_BYTES here
# The lane takes a submit without a query; "?dry_run=false" asks the same of the route.
LANE, ROUTE = "/api/v1/tasks", "/api/v1/tasks?dry_run=false"


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(1, env={"ORCHESTRATOR_TOKEN": TOKEN, "MLOC_MAX_BODY_BYTES": str(LIMIT)})


@pytest.fixture
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, timeout=10) as client:
        yield client


ADMIN = {"Authorization": f"Bearer {TOKEN}"}
YAML = {**ADMIN, "Content-Type": "text/yaml"}


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        pytest.param({}, b"taskType: echo\n", 401, id="no token"),
        pytest.param({"Authorization": "Bearer wrong"}, b"taskType: echo\n", 401, id="wrong token"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, b"taskType: echo\n", 401, id="not bearer"),
        pytest.param(YAML, b"", 422, id="empty body"),
        pytest.param(YAML, b"taskType: no-such-type\n", 422, id="unknown task type"),
        pytest.param(YAML, b"taskType: echo\nresources: {cpu: .inf}\n", 422, id="infinite cpu"),
        pytest.param(YAML, b"taskType: echo\npayload: '\xff\xfe'\n", 422, id="not UTF-8"),
        pytest.param({**ADMIN, "Content-Type": "application/json"}, b'{"taskType": ', 422, id="broken JSON"),
        pytest.param(YAML, b"taskType: echo\npayload: '" + b"x" * LIMIT + b"'\n", 413, id="over the limit"),
    ],
)
def test_refusals_are_the_same_on_both(
    http: httpx.Client, cluster: LocalCluster, headers: dict[str, str], body: bytes, status: int
) -> None:
    stored = redis.Redis.from_url(cluster.redis_url)
    before = stored.zcard(keys.TASKS_ALL)
    lane = http.post(LANE, content=body, headers=headers)
    route = http.post(ROUTE, content=body, headers=headers)
    assert lane.status_code == route.status_code == status, (lane.text, route.text)
    assert lane.json() == route.json()
    assert lane.json()["ok"] is False and lane.json()["message"]
    assert lane.headers["content-type"] == route.headers["content-type"] == "application/json"
    # A 401 names the scheme to authenticate with, on both.
    challenge = "Bearer" if status == 401 else None
    assert lane.headers.get("www-authenticate") == route.headers.get("www-authenticate") == challenge
    assert stored.zcard(keys.TASKS_ALL) == before  # neither stored anything


def test_a_body_over_the_limit_without_a_length_is_refused_on_both(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # sent chunked: the limit is only found while reading
        yield b"taskType: echo\npayload: '"
        yield b"x" * LIMIT
        yield b"'\n"

    answers = [http.post(path, content=chunks(), headers=YAML) for path in (LANE, ROUTE)]
    assert [answer.status_code for answer in answers] == [413, 413]
    assert answers[0].json() == answers[1].json()
    assert "MLOC_MAX_BODY_BYTES" in answers[0].json()["message"]


def test_a_submit_is_stored_and_run_alike_on_both(http: httpx.Client, cluster: LocalCluster) -> None:
    body = b"taskType: echo\npayload: {n: 7}\nmetadata: {name: lane}\n"
    lane = http.post(LANE, content=body, headers=YAML)
    route = http.post(ROUTE, content=body, headers=YAML)
    assert lane.status_code == route.status_code == 201
    assert set(lane.json()) == set(route.json())
    ids = [lane.json()["task_id"], route.json()["task_id"]]
    assert ids[0] != ids[1]
    with httpx.Client(base_url=cluster.api_url, headers=ADMIN, timeout=10) as admin:
        records = [wait_for(admin, task_id, {"succeeded", "failed", "cancelled"}) for task_id in ids]
    assert [record["state"] for record in records] == ["succeeded", "succeeded"]
    assert records[0]["spec"] == records[1]["spec"]
    assert records[0]["owner"] == records[1]["owner"] == "admin"
    results = [http.get(f"/api/v1/tasks/{task_id}/result", headers=ADMIN).json() for task_id in ids]
    assert [result["payload"] for result in results] == [{"n": 7}, {"n": 7}]
    assert set(results[0]) == set(results[1])


def test_json_and_a_user_token_reach_the_lane_too(http: httpx.Client, cluster: LocalCluster) -> None:
    token = http.post("/admin/users", json={"name": "lane-user"}, headers=ADMIN).json()["token"]
    answer = http.post(
        LANE,
        json={"taskType": "echo", "payload": {"n": 1}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 201, answer.text
    record = http.get(f"/api/v1/tasks/{answer.json()['task_id']}", headers=ADMIN).json()
    assert record["owner"] == "lane-user"


def test_the_lane_counts_its_requests_under_the_route(http: httpx.Client, cluster: LocalCluster) -> None:
    labels = {"method": "POST", "route": "/api/v1/tasks"}
    before = scrape(cluster)
    for _ in range(3):
        assert http.post(LANE, content=b"taskType: echo\n", headers=YAML).status_code == 201
    assert http.post(LANE, content=b"taskType: nope\n", headers=YAML).status_code == 422
    after = scrape(cluster)

    def counted(status: str, samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        try:
            return value(samples, "mloc_http_request_duration_seconds_count", status=status, **labels)
        except KeyError:
            return 0.0

    assert counted("201", after) - counted("201", before) == 3
    assert counted("422", after) - counted("422", before) == 1


def test_only_a_plain_submit_takes_the_lane(redis_url: str) -> None:
    """The router marks the scope of a request it routes with the route's endpoint; the lane does not."""

    async def scopes() -> list[dict[str, Any]]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        app = create_app(Settings(redis_url=redis_url), redis=client)
        seen = []
        async with app.router.lifespan_context(app):
            for method, path, query in [
                ("POST", LANE, b""),
                ("POST", LANE, b"dry_run=false"),
                ("POST", LANE, b"dry_run=true"),
                ("GET", LANE, b""),
                ("POST", LANE + "/", b""),
            ]:
                scope = _scope(app, method, path, query)
                sent: list[Message] = []

                async def receive() -> Message:
                    return {"type": "http.request", "body": b"taskType: echo\n", "more_body": False}

                async def send(message: Message, sent: list[Message] = sent) -> None:
                    sent.append(message)

                await app(scope, receive, send)
                seen.append({"endpoint": scope.get("endpoint"), "status": sent[0]["status"]})
        await client.aclose()
        return seen

    lane, routed, dry_run, listed, slashed = asyncio.run(scopes())
    assert lane == {"endpoint": None, "status": 201}
    assert routed == {"endpoint": tasks.submit, "status": 201}
    assert dry_run == {"endpoint": tasks.submit, "status": 201}
    assert listed["endpoint"] is tasks.list_tasks and listed["status"] == 200
    assert slashed == {"endpoint": None, "status": 307}  # the router's redirect, not the lane's answer
    assert redis.Redis.from_url(redis_url).zcard(keys.TASKS_ALL) == 2  # the dry run stored nothing


def _scope(app: Any, method: str, path: str, query: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"text/yaml")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
