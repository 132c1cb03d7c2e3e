"""Authentication and isolation over every route of the app: routes are read from the app itself, so a
route added later is covered (or fails here until the test is told how to call it)."""

from __future__ import annotations

import ast
import asyncio
import hmac
import inspect
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi.routing import APIRoute
from starlette.routing import Route

from mloc.api import deps
from mloc.api.app import create_app
from mloc.errors import Unauthorized
from mloc.orchestrator import users
from mloc.settings import Settings
from tests.reliability.conftest import Secured

# Routes anyone may call: probes, the task schema, Prometheus, the dashboard's files and the API docs.
PUBLIC = {
    ("GET", "/health"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/schema"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/static/{name}"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
ADMIN_PREFIXES = ("/admin/", "/api/v1/admin/")
# Admin-only routes outside the admin prefixes: removing a worker from the registry, cordoning one.
ADMIN_ROUTES = {
    (method, prefix + path)
    for prefix in ("", "/api/v1")
    for method, path in (
        ("DELETE", "/workers/{worker_id}"),
        ("POST", "/workers/{worker_id}/cordon"),
        ("POST", "/workers/{worker_id}/uncordon"),
    )
}
# Routes whose proper call needs objects this module does not make (an uploaded batch file, a batch,
# two finished eval tasks): checked to answer past authentication for each caller, without a 5xx.
PAST_AUTH_ONLY = {
    ("GET", "/api/v1/evals/compare"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("DELETE", "/v1/files/{file_id}"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/{batch_id}"),
    ("POST", "/v1/batches/{batch_id}/cancel"),
}
WRONG_AUTH = [
    None,
    "Bearer mloc_" + "A" * 43,
    "Bearer x",
    "Basic YWRtaW46YWRtaW4=",
    "bearer",
    "Token whatever",
]


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str

    @property
    def kind(self) -> str:
        if (self.method, self.template) in PUBLIC:
            return "public"
        if self.template.startswith(ADMIN_PREFIXES) or (self.method, self.template) in ADMIN_ROUTES:
            return "admin"
        if "{task_id}" in self.template or "{pipeline_id}" in self.template:
            return "owned"
        if (self.method, self.template) in PAST_AUTH_ONLY:
            return "past-auth"
        return "caller"


def endpoints() -> list[Endpoint]:
    app = create_app(Settings(ORCHESTRATOR_TOKEN="x"))
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute | Route):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                found.append(Endpoint(method, route.path))
    return found


@dataclass
class World:
    secured: Secured
    alice: str
    bob: str
    alice_name: str
    bob_name: str
    spare: str  # a user the admin's calls on /admin/users/{name} may change or remove
    done: str  # alice's finished task
    running: str  # alice's task that runs until cancelled
    pipeline: str  # alice's pipeline of two finished tasks

    def path(self, endpoint: Endpoint, task_id: str | None = None) -> str:
        values = {
            "task_id": task_id or self.done,
            "worker_id": "local-1",
            "name": "main.js" if endpoint.template.startswith("/dashboard/") else self.spare,
            "path": "responses.json",
            "pipeline_id": self.pipeline,
            "file_id": "file-0123456789abcdef",
            "batch_id": "batch_00000000-0000-4000-8000-000000000000",
        }
        params = [p.split(":")[0] for p in endpoint.template.split("{")[1:]]
        unknown = [p.split("}")[0] for p in params if p.split("}")[0] not in values]
        assert not unknown, f"{endpoint}: add a value for path parameter(s) {unknown} to World.path"
        path = endpoint.template
        for key, value in values.items():
            path = path.replace("{" + key + ":path}", value).replace("{" + key + "}", value)
        return path

    def call(self, endpoint: Endpoint, auth: str | None, task_id: str | None = None) -> httpx.Response:
        headers = {"Authorization": auth} if auth is not None else {}
        body: dict[str, Any] = {}
        if endpoint.method in ("POST", "PUT"):
            body = {"json": {}}
            if endpoint.template == "/api/v1/tasks":
                body = {"content": b"taskType: echo\n", "headers": {"Content-Type": "text/yaml", **headers}}
            elif endpoint.template.endswith("/bulk"):
                body = {"json": [{"taskType": "echo"}]}
            elif endpoint.template.endswith("/users"):
                body = {"json": {"name": f"made-{time.monotonic_ns()}"}}
            elif endpoint.template.endswith("/quota"):
                body = {"json": {"max_tasks": 3}}
            elif endpoint.template.endswith("/budget"):
                body = {"json": {"tokens": "1M", "period": "month"}}
            elif endpoint.template.endswith("/weight"):
                body = {"json": {"weight": 2}}
        body.setdefault("headers", headers)
        if endpoint.template == "/api/v1/task-ids":
            body["params"] = {"prefix": self.done[:4]}
        if endpoint.template == "/api/v1/pipeline-ids":
            body["params"] = {"prefix": self.pipeline[:4]}
        return httpx.request(
            endpoint.method, self.secured.cluster.api_url + self.path(endpoint, task_id), timeout=30, **body
        )


def wait_state(http: httpx.Client, task_id: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = http.get(f"/api/v1/tasks/{task_id}").json()
        if record["state"] in states:
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(secured: Secured) -> Iterator[World]:
    alice_name, alice = secured.add_user("alice")
    bob_name, bob = secured.add_user("bob")
    spare, _ = secured.add_user("carol")
    with secured.http(alice) as http:
        done = http.post("/api/v1/tasks", content=b"taskType: echo\npayload: {secret: alice-only}\n").json()["task_id"]
        running = http.post("/api/v1/tasks", content=b"taskType: echo\nhyperparameters: {sleep_sec: 120}\n").json()
        wait_state(http, done, ("succeeded",))
        wait_state(http, running["task_id"], ("running",))
        assert http.get(f"/api/v1/tasks/{done}").json()["owner"] == alice_name
        steps = [{"taskType": "echo", "metadata": {"name": "first"}},
                 {"taskType": "echo", "metadata": {"name": "second"}, "dependsOn": ["first"]}]  # fmt: skip
        pipeline = http.post("/api/v1/tasks/bulk", json=steps).json()["tasks"][0]["pipeline_id"]
    yield World(secured, alice, bob, alice_name, bob_name, spare, done, running["task_id"], pipeline)
    with secured.http(secured.admin) as http:
        http.post(f"/api/v1/tasks/{running['task_id']}/cancel")


@pytest.mark.parametrize("endpoint", endpoints(), ids=lambda e: f"{e.method} {e.template}")
def test_every_route_answers_each_caller_as_it_should(world: World, endpoint: Endpoint) -> None:
    if endpoint.kind == "public":
        for auth in WRONG_AUTH:
            assert world.call(endpoint, auth).status_code == 200, (endpoint, auth)
        return
    for auth in WRONG_AUTH:
        answer = world.call(endpoint, auth)
        assert answer.status_code == 401, (endpoint, auth, answer.text)
        error = answer.json()["error"]
        # The OpenAI routes answer in OpenAI's error shape, which its clients read.
        assert (error["code"] if endpoint.template.startswith("/v1/") else error) == "unauthorized", answer.text
    bob, alice, admin = (f"Bearer {t}" for t in (world.bob, world.alice, world.secured.admin))
    if endpoint.kind == "admin":
        for auth in (bob, alice):
            answer = world.call(endpoint, auth)
            assert answer.status_code == 403 and answer.json()["error"] == "forbidden", (endpoint, answer.text)
        # A second DELETE of the same user is a 404, and removing a live worker a 409: past auth all the same.
        assert world.call(endpoint, admin).status_code in (200, 201, 404, 409), endpoint
        if endpoint.template.endswith("/cordon"):
            # The module's one worker takes tasks again for the tests after this one.
            uncordon = Endpoint("POST", endpoint.template.removesuffix("/cordon") + "/uncordon")
            assert world.call(uncordon, admin).status_code == 200
    elif endpoint.kind == "owned":
        # Another user's task answers exactly like a task that does not exist.
        for task_id in (world.done, world.running):
            answer = world.call(endpoint, bob, task_id)
            assert answer.status_code == 404, (endpoint, answer.text)
            assert "alice-only" not in answer.text
        ghost = world.call(endpoint, bob, "00000000-0000-4000-8000-000000000000")
        assert ghost.status_code == 404 and ghost.json()["error"] == answer.json()["error"]
        for auth in (alice, admin):
            answer = world.call(endpoint, auth)
            assert answer.status_code not in (401, 403, 404), (endpoint, auth, answer.text)
    elif endpoint.kind == "past-auth":
        for auth in (bob, alice, admin):
            answer = world.call(endpoint, auth)
            assert answer.status_code not in (401, 403) and answer.status_code < 500, (endpoint, auth, answer.text)
    else:
        for auth in (bob, alice, admin):
            assert world.call(endpoint, auth).status_code < 400, (endpoint, auth)


def test_a_user_cannot_see_or_change_another_users_work(world: World) -> None:
    with world.secured.http(world.bob) as bob:
        bob.post("/api/v1/tasks", content=b"taskType: echo\n")
        # Asking for alice's tasks is refused, not answered with bob's own (which would read as hers).
        refused = bob.get("/api/v1/tasks", params={"owner": world.alice_name, "page_size": 500})
        assert refused.status_code == 403 and "only your own tasks" in refused.json()["message"], refused.text
        listed = bob.get("/api/v1/tasks", params={"owner": world.bob_name, "page_size": 500}).json()
        assert listed["items"] and {item["owner"] for item in listed["items"]} == {world.bob_name}
        assert "alice-only" not in bob.get("/api/v1/tasks", params={"page_size": 500}).text
        assert bob.get("/api/v1/stats", params={"user": world.alice_name}).status_code == 403
        stolen = bob.post("/api/v1/tasks", content=f"taskType: echo\nmetadata: {{owner: {world.alice_name}}}\n")
        assert stolen.status_code == 403 and "metadata.owner" in stolen.json()["message"]
        assert bob.post(f"/api/v1/tasks/{world.running}/cancel").status_code == 404
        assert bob.get(f"/api/v1/tasks/{world.done}/logs", params={"follow": "true"}).status_code == 404
        assert bob.get(f"/api/v1/tasks/{world.done}/artifacts/responses.json").status_code == 404
        assert bob.get(f"/api/v1/pipelines/{world.pipeline}").status_code == 404
        assert bob.get("/api/v1/pipeline-ids", params={"prefix": world.pipeline[:8]}).json()["items"] == []
    with world.secured.http(world.alice) as alice:
        assert alice.get(f"/api/v1/tasks/{world.running}").json()["state"] == "running"
        assert alice.get(f"/api/v1/tasks/{world.done}/result").json()["payload"] == {"secret": "alice-only"}
        found = alice.get("/api/v1/pipeline-ids", params={"prefix": world.pipeline[:8]}).json()["items"]
        assert [(item["pipeline_id"], item["steps"]) for item in found] == [(world.pipeline, ["first", "second"])]


def inference_with(model: str) -> bytes:
    """An inference task whose ``model`` section is the given YAML flow mapping."""
    return f"taskType: inference\nmodel: {model}\ninference: {{prompts: [hi], max_tokens: 2}}\n".encode()


def test_a_user_cannot_name_another_users_files_as_a_model(world: World) -> None:
    secured = world.secured
    alices_folder = secured.results_dir / world.done
    assert alices_folder.is_dir()
    with secured.http(world.bob) as bob:
        mine = bob.post("/api/v1/tasks", content=b"taskType: echo\n").json()["task_id"]
        wait_state(bob, mine, ("succeeded",))
        # Refused at submit, naming the field and the fix.
        refused = {
            "{source: {type: local, identifier: /etc}}": ("spec.model.source.identifier", "MLOC_MODEL_ROOTS"),
            f"{{source: {{type: local, identifier: {alices_folder}}}}}": ("spec.model.source.identifier", "your tasks"),
            f"{{source: {{identifier: {alices_folder}}}}}": ("spec.model.source.identifier", "your tasks"),
            "{source: {type: local, identifier: models/x}}": ("spec.model.source.identifier", "absolute path"),
            "{source: {type: local, identifier: ~/x}}": ("spec.model.source.identifier", "absolute path"),
            f"{{source: {{type: local, identifier: {secured.model_root}/m}}, adapter: {{path: {alices_folder}}}}}": (
                "spec.model.adapter.path",
                "your tasks",
            ),
            f"{{source: {{type: local, identifier: {secured.model_root}/m}}, adapter: {{path: {world.done}}}}}": (
                "spec.model.adapter.path",
                "not one of your tasks",
            ),
        }
        for model, (field, fix) in refused.items():
            answer = bob.post("/api/v1/tasks", content=inference_with(model))
            assert answer.status_code == 403, (model, answer.text)
            assert field in answer.json()["message"] and fix in answer.json()["message"], (model, answer.text)
        # Another user's task id and a task id that does not exist get the same answer.
        ghost = "00000000-0000-4000-8000-000000000000"
        messages = []
        for task_id in (world.done, ghost):
            model = f"{{source: {{identifier: gemma3-270m}}, adapter: {{path: {task_id}}}}}"
            answer = bob.post("/api/v1/tasks", content=inference_with(model))
            assert answer.status_code == 403, answer.text
            messages.append(answer.json()["message"].replace(task_id, "<id>"))
        assert messages[0] == messages[1]
        reward = b"taskType: ppo\nmodel: {source: {type: local, identifier: %s/m}}\n" % str(secured.model_root).encode()
        reward += b"dataset: {examples: [{prompt: hi}]}\nhyperparameters: {reward_model: /etc}\n"
        answer = bob.post("/api/v1/tasks", content=reward)
        assert answer.status_code == 403 and "spec.hyperparameters.reward_model" in answer.json()["message"], (
            answer.text
        )
        # Allowed: hub ids, the admin's roots, the user's own result folders.
        for model in (
            "{source: {identifier: org/some-model}}",
            f"{{source: {{type: local, identifier: {secured.model_root}/m}}}}",
            f"{{source: {{type: local, identifier: {secured.results_dir / mine}/merged}}}}",
        ):
            answer = bob.post("/api/v1/tasks", params={"dry_run": "true"}, content=inference_with(model))
            assert answer.status_code == 201, (model, answer.text)
        # Checked again on the worker, on the real path: a link under an allowed folder to another
        # user's results (or anywhere else) fails the task before anything is read.
        for name, target, fix in (("sneaky", alices_folder, "your tasks"), ("etc", Path("/etc"), "MLOC_MODEL_ROOTS")):
            link = secured.model_root / f"{name}-{secrets.token_hex(3)}"
            link.symlink_to(target, target_is_directory=True)
            task = bob.post("/api/v1/tasks", content=inference_with(f"{{source: {{type: local, identifier: {link}}}}}"))
            assert task.status_code == 201, task.text
            failed = wait_state(bob, task.json()["task_id"], ("failed", "succeeded"), timeout=60)
            assert failed["state"] == "failed", failed
            assert "spec.model.source.identifier" in failed["reason"] and fix in failed["reason"], failed
    # The admin may name any path, as before.
    with secured.http(secured.admin) as admin:
        answer = admin.post(
            "/api/v1/tasks",
            params={"dry_run": "true"},
            content=inference_with(f"{{source: {{type: local, identifier: {alices_folder}}}}}"),
        )
        assert answer.status_code == 201, answer.text


def test_a_user_cannot_read_another_users_data_as_a_dataset(world: World) -> None:
    secured = world.secured
    alices_file = secured.results_dir / world.done / "responses.json"
    assert alices_file.is_file()

    def dataset(source: str) -> bytes:
        return f"taskType: inference\ninference: {{input: {source}, max_tokens: 2}}\n".encode()

    with secured.http(secured.admin) as admin:
        # The lines an inference task over a dataset would read from another task.
        assert (
            admin.post(
                "/api/v1/tasks", params={"dry_run": "true"}, content=dataset(f"{{path: {alices_file}.jsonl}}")
            ).status_code
            == 201
        )
    with secured.http(world.bob) as bob:
        refused = {
            "{path: /etc/passwd.csv}": ("spec.inference.input.path", "MLOC_MODEL_ROOTS"),
            "{path: 'file:///etc/passwd.csv'}": ("spec.inference.input.path", "MLOC_MODEL_ROOTS"),
            f"{{path: {alices_file}.jsonl}}": ("spec.inference.input.path", "your tasks"),
            "{path: rows.jsonl}": ("spec.inference.input.path", "absolute path"),
            f"{{task: {world.done}}}": ("spec.inference.input.task", "not one of your tasks"),
        }
        for source, (field, fix) in refused.items():
            answer = bob.post("/api/v1/tasks", content=dataset(source))
            assert answer.status_code == 403, (source, answer.text)
            assert field in answer.json()["message"] and fix in answer.json()["message"], (source, answer.text)
        # A remote store is not the worker's disk: not refused here (the worker's credentials decide).
        answer = bob.post(
            "/api/v1/tasks", params={"dry_run": "true"}, content=dataset("{path: 's3://bucket/rows.jsonl'}")
        )
        assert answer.status_code == 201, answer.text


def test_a_user_sees_only_their_own_task_ids_on_a_worker(world: World) -> None:
    secured = world.secured
    with secured.http(world.bob) as bob, secured.http(world.alice) as alice, secured.http(secured.admin) as admin:
        # Alice's task that runs until cancelled holds a slot on the only worker.
        for path in ("/workers/local-1", "/api/v1/workers/local-1"):
            assert world.running in admin.get(path).json()["tasks"]
            seen_by_bob = bob.get(path).json()
            assert world.running not in seen_by_bob["tasks"] and seen_by_bob["hidden_tasks"] >= 1
            assert world.running in alice.get(path).json()["tasks"]
        for path in ("/workers", "/api/v1/workers"):
            listed = bob.get(path).json()["items"]
            assert all(world.running not in item["tasks"] for item in listed)
            assert sum(item["hidden_tasks"] for item in listed) >= 1
            assert world.running not in bob.get(path).text


def test_a_removed_users_token_stops_working(secured: Secured) -> None:
    name, token = secured.add_user("dave")
    with secured.http(token) as dave:
        assert dave.get("/api/v1/tasks").status_code == 200
        with secured.http(secured.admin) as admin:
            assert admin.delete(f"/admin/users/{name}").status_code == 200
        assert dave.get("/api/v1/tasks").status_code == 401


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, secured: Secured) -> None:
    """The admin token goes through hmac.compare_digest; user tokens are looked up by their SHA-256, so no
    secret is ever compared with == (which stops at the first differing byte)."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    _, token = secured.add_user("erin")

    async def check() -> None:
        redis = aioredis.Redis.from_url(secured.redis_url, decode_responses=True)
        try:
            assert (await users.authenticate(redis, "admin-secret", "Bearer admin-secret")).admin
            with pytest.raises(Unauthorized):
                await users.authenticate(redis, "admin-secret", "Bearer admin-secreT")
            assert (await users.authenticate(redis, "admin-secret", f"Bearer {token}")).name.startswith("erin-")
        finally:
            await redis.aclose()

    asyncio.run(check())
    assert (b"admin-secret", b"admin-secret") in seen and (b"admin-secreT", b"admin-secret") in seen
    # No ==, !=, `in` or startswith between a secret and anything else, in the modules that handle them.
    for module in (users, deps):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                secret = {n for n in names if "token" in n.lower() or "secret" in n.lower()}
                only_none = all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops)
                assert not secret or only_none, f"{module.__name__}:{node.lineno} compares {secret} directly"
