"""Idempotent submits (mloc.orchestrator.idempotency), over real HTTP against a real orchestrator and
worker: a submit sent again with its Idempotency-Key stores nothing new and answers as the first."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from mloc import keys, lua
from mloc.client import Client
from mloc.embedded import free_port
from mloc.localcluster import LocalCluster
from mloc.orchestrator.idempotency import TAKE_OVER_SEC, request_digest
from tests.conftest import FAST_ENV
from tests.support.api import wait_for
from tests.support.cli import mloc

TOKEN = "idempotency-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
YAML = {**ADMIN, "Content-Type": "text/yaml"}
ECHO = b"taskType: echo\npayload: {n: 1}\n"
# A plain submit is answered by the submit lane; with a query, by the FastAPI route: both take keys.
LANE, ROUTE = "/api/v1/tasks", "/api/v1/tasks?dry_run=false"


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(1, env={"ORCHESTRATOR_TOKEN": TOKEN})


@pytest.fixture
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, timeout=10, headers=ADMIN) as client:
        yield client


@pytest.fixture
def stored(cluster: LocalCluster) -> Callable[[], int]:
    r = redis.Redis.from_url(cluster.redis_url)
    return lambda: int(r.zcard(keys.TASKS_ALL))


def keyed(key: str | bytes, headers: dict[str, str] = YAML) -> dict[str, Any]:
    return {**headers, "Idempotency-Key": key}


@pytest.mark.parametrize("path", [LANE, ROUTE])
def test_a_submit_sent_again_answers_as_the_first_and_stores_nothing(
    http: httpx.Client, stored: Callable[[], int], path: str
) -> None:
    before = stored()
    first = http.post(path, content=ECHO, headers=keyed("order-1"))
    again = http.post(path, content=ECHO, headers=keyed("order-1"))
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json()
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    assert stored() == before + 1
    wait_for(http, first.json()["task_id"], {"succeeded"})
    # Quoted, as the header's structured-field form writes it: the same key.
    quoted = http.post(path, content=ECHO, headers=keyed('"order-1"'))
    assert quoted.json()["task_id"] == first.json()["task_id"] and stored() == before + 1
    # Without a key, or with another, the same task is a new one.
    assert http.post(path, content=ECHO, headers=YAML).json()["task_id"] != first.json()["task_id"]
    assert http.post(path, content=ECHO, headers=keyed("order-2")).json()["task_id"] != first.json()["task_id"]
    assert stored() == before + 3


def test_a_key_sent_with_another_request_is_refused(http: httpx.Client, stored: Callable[[], int]) -> None:
    first = http.post(LANE, content=ECHO, headers=keyed("reused"))
    before = stored()
    for path, body in ((LANE, b"taskType: echo\npayload: {n: 2}\n"), (ROUTE, ECHO[:-1] + b" \n")):
        other = http.post(path, content=body, headers=keyed("reused"))
        assert other.status_code == 422, other.text
        assert other.json()["error"] == "idempotency_key_reused"
        assert "'reused'" in other.json()["message"] and "new key" in other.json()["message"]
    bulk = http.post("/api/v1/tasks/bulk", json=[{"taskType": "echo"}], headers=keyed("reused", ADMIN))
    assert bulk.status_code == 422 and bulk.json()["error"] == "idempotency_key_reused"
    assert stored() == before
    # The first submit's answer is still there for it.
    assert http.post(LANE, content=ECHO, headers=keyed("reused")).json() == first.json()


def test_each_user_has_their_own_keys(http: httpx.Client, cluster: LocalCluster) -> None:
    alice = {"Authorization": f"Bearer {http.post('/admin/users', json={'name': 'alice'}).json()['token']}"}
    bob = {"Authorization": f"Bearer {http.post('/admin/users', json={'name': 'bob'}).json()['token']}"}
    as_alice = http.post(LANE, content=ECHO, headers=keyed("nightly", alice)).json()
    as_bob = http.post(LANE, content=ECHO, headers=keyed("nightly", bob)).json()
    assert as_alice["task_id"] != as_bob["task_id"]
    assert http.post(LANE, content=ECHO, headers=keyed("nightly", alice)).json() == as_alice
    assert http.get(f"/api/v1/tasks/{as_bob['task_id']}", headers=bob).json()["owner"] == "bob"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(b"x" * 256, id="too long"),
        pytest.param("ключ".encode(), id="not ASCII"),
        pytest.param(b"a\tb", id="a tab"),
        pytest.param(b'""', id="empty once unquoted"),
    ],
)
@pytest.mark.parametrize("path", [LANE, ROUTE, "/api/v1/tasks/bulk"])
def test_a_malformed_key_is_refused(http: httpx.Client, stored: Callable[[], int], key: bytes, path: str) -> None:
    before = stored()
    # httpx takes headers all text or all bytes: the key must go out as these raw bytes, so the rest go as bytes too.
    raw = {name.encode(): value.encode() for name, value in YAML.items()}
    answer = http.post(path, content=ECHO, headers={**raw, b"Idempotency-Key": key})
    assert answer.status_code == 400, answer.text
    assert "Idempotency-Key must be 1 to 255 printable ASCII characters" in answer.json()["message"]
    assert stored() == before


def test_a_refused_submit_leaves_its_key_free(http: httpx.Client, cluster: LocalCluster) -> None:
    alice = {"Authorization": f"Bearer {http.post('/admin/users', json={'name': 'alice'}).json()['token']}"}
    spoof = http.post(LANE, content=b"taskType: echo\nmetadata: {owner: bob}\n", headers=keyed("k1", alice))
    assert spoof.status_code == 403, spoof.text
    r = redis.Redis.from_url(cluster.redis_url)
    assert not r.keys(f"{keys.PREFIX}:idempotency:*")
    fixed = http.post(LANE, content=ECHO, headers=keyed("k1", alice))
    assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers


@pytest.mark.parametrize("path", [LANE, ROUTE, "/api/v1/tasks/bulk"])
def test_an_invalid_request_leaves_its_key_free(http: httpx.Client, cluster: LocalCluster, path: str) -> None:
    # The key is claimed while the body is validated: a body refused there gives the claim back.
    bulk = path.endswith("/bulk")
    invalid = b"taskType: echo\n---\ntaskType: no-such-type\n" if bulk else b"taskType: no-such-type\n"
    refused = http.post(path, content=invalid, headers=keyed("k-invalid"))
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_task", refused.text
    r = redis.Redis.from_url(cluster.redis_url)
    assert not r.keys(f"{keys.PREFIX}:idempotency:*")
    fixed = http.post(path, content=ECHO, headers=keyed("k-invalid"))
    assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers, fixed.text


def test_a_bulk_sent_again_answers_as_the_first(http: httpx.Client, stored: Callable[[], int]) -> None:
    # A pipeline (a step waiting for another by name) and a plain task, in one bulk.
    tasks = [
        {"taskType": "echo", "metadata": {"name": "first"}},
        {"taskType": "echo", "metadata": {"name": "second"}, "dependsOn": ["first"]},
    ]
    before = stored()
    first = http.post("/api/v1/tasks/bulk", json=tasks, headers=keyed("bulk-1", ADMIN))
    again = http.post("/api/v1/tasks/bulk", json=tasks, headers=keyed("bulk-1", ADMIN))
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert stored() == before + 2
    for task in first.json()["tasks"]:
        wait_for(http, task["task_id"], {"succeeded"})


def test_a_dry_run_claims_no_key(http: httpx.Client) -> None:
    checked = http.post("/api/v1/tasks?dry_run=true", content=ECHO, headers=keyed("dry"))
    assert checked.status_code == 201 and "task_id" not in checked.json()
    other = http.post(LANE, content=b"taskType: echo\npayload: {n: 3}\n", headers=keyed("dry"))
    assert other.status_code == 201 and "idempotent-replayed" not in other.headers


def _claim(cluster: LocalCluster, key: str, body: bytes, ids: list[str], *, age: float) -> None:
    """The claim an orchestrator leaves when it dies in the middle of a keyed submit, ``age`` seconds ago."""
    r = redis.Redis.from_url(cluster.redis_url)
    marker = keys.idempotency("admin", hashlib.sha256(key.encode()).hexdigest())
    digest = request_digest(LANE, "text/yaml", body)
    claim = r.register_script(lua.IDEMPOTENCY_CLAIM)
    assert claim(keys=[marker], args=[digest, orjson.dumps(ids).decode(), repr(time.time() - age), 3600, 60]) == [
        b"new"
    ]


def test_a_submit_whose_orchestrator_died_half_way_is_taken_over(
    http: httpx.Client, cluster: LocalCluster, stored: Callable[[], int]
) -> None:
    # It died before storing anything. While the claim is young, the submit may still be under way.
    promised = "0e2c3f52-5f3a-4b8e-9a4e-2f1d7a9c0b11"
    _claim(cluster, "died-early", ECHO, [promised], age=0)
    busy = http.post(LANE, content=ECHO, headers=keyed("died-early"))
    assert busy.status_code == 409 and busy.json()["error"] == "idempotency_in_progress", busy.text
    # Once it is old, the submit runs again, under the id the claim promised.
    _claim(cluster, "died-early-2", ECHO, [promised], age=TAKE_OVER_SEC + 1)
    before = stored()
    taken = http.post(LANE, content=ECHO, headers=keyed("died-early-2"))
    assert taken.status_code == 201 and taken.json()["task_id"] == promised, taken.text
    assert stored() == before + 1
    wait_for(http, promised, {"succeeded"})
    assert http.post(LANE, content=ECHO, headers=keyed("died-early-2")).json() == taken.json()

    # It died after storing its task, before answering: the task is found and answered, not stored again.
    task_id = http.post(LANE, content=ECHO, headers=YAML).json()["task_id"]
    _claim(cluster, "died-late", ECHO, [task_id], age=TAKE_OVER_SEC + 1)
    before = stored()
    found = http.post(LANE, content=ECHO, headers=keyed("died-late"))
    assert found.status_code == 201 and found.headers["idempotent-replayed"] == "true", found.text
    assert found.json()["task_id"] == task_id and found.json()["state"] in {"assigned", "running", "succeeded"}
    assert stored() == before


def test_the_client_sends_a_submit_again_until_the_orchestrator_answers(
    redis_url: str, tmp_path: Path, sync_redis: redis.Redis
) -> None:
    port = free_port()
    client = Client(f"http://127.0.0.1:{port}", TOKEN, max_retries=8)
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            answers.append(client.submit({"taskType": "echo"}))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    before = sync_redis.zcard(keys.TASKS_ALL)
    sender = threading.Thread(target=submit)
    sender.start()  # nothing listens on the port yet: the first sends cannot connect
    time.sleep(1.0)
    cluster = LocalCluster(
        home=tmp_path / "home", port=port, redis_url=redis_url, env={**FAST_ENV, "ORCHESTRATOR_TOKEN": TOKEN}
    )
    with cluster.start(timeout=60):
        sender.join(60)
        assert not errors and len(answers) == 1, errors
        assert sync_redis.zcard(keys.TASKS_ALL) == before + 1
        # The same key from a later call of the script: the first answer.
        again = Client(cluster.api_url, TOKEN)
        keyed_first = again.submit({"taskType": "echo"}, idempotency_key="script-run-7")
        assert again.submit({"taskType": "echo"}, idempotency_key="script-run-7") == keyed_first
        assert sync_redis.zcard(keys.TASKS_ALL) == before + 2
    client.close()


def test_mloc_submit_takes_a_key(cluster: LocalCluster, tmp_path: Path, stored: Callable[[], int]) -> None:
    task = tmp_path / "task.yaml"
    task.write_bytes(ECHO)
    env = {"MLOC_API_URL": cluster.api_url, "MLOC_TOKEN": TOKEN}
    before = stored()
    runs = [mloc("submit", str(task), "--idempotency-key", "cron-2026", "--json", env=env) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert json.loads(runs[0].stdout)["task_id"] == json.loads(runs[1].stdout)["task_id"]
    assert stored() == before + 1
