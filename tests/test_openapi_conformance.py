"""The OpenAPI document states every status, media type and body each operation answers with.

Schemathesis fuzzes every operation of real orchestrators (their own processes, a real Redis, real
HTTP, a real worker) with auth off, with the admin's token, a user's token and a wrong one, and checks
each answer against the document: no 5xx, no undocumented status, the documented media type, and a
body that matches the documented schema (MLOC's error body included).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.result import Ok

from mloc.api.app import create_app
from mloc.localcluster import LocalCluster
from mloc.settings import Settings
from tests.conftest import FAST_ENV, RedisServer
from tests.support.api import wait_for

TOKEN = "fuzz-admin-token"
ECHO = "taskType: echo\npayload: {n: 1}\n"
# Waits for a GPU no test worker has, so it stays pending until it is cancelled.
NO_ROOM = "taskType: echo\nresources: {hardware: {gpu: {type: H100, count: 1}}}\n"

# The document as the orchestrator builds it; test_fuzzed_document_is_the_served_one holds it to the served one.
DOCUMENT = create_app(Settings(ORCHESTRATOR_TOKEN=TOKEN)).openapi()
# Probes with methods an operation does not have only meet the router's 405; the time goes to real cases.
schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=schemathesis.Config.from_dict({"phases": {"coverage": {"unexpected-methods": []}}})
)
# Callers without a valid token meet the same 401 whatever they send: a few cases each, no edge cases.
strangers = schemathesis.openapi.from_dict(
    DOCUMENT, config=schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
# Bounded for CI on two cores: each operation also gets schemathesis' coverage cases (edges, wrong types).
FUZZ = settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# Ids of things that exist, by path parameter; the fuzzer names them as often as random ones, so it
# reaches the 200s, the 409 of cancelling a finished task and the 404 of another user's task. Only
# finished tasks: following the logs of a live one would stream until it ends.
KNOWN: dict[str, list[str]] = {"task_id": [], "worker_id": [], "name": [], "path": []}


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    if not path_parameters:
        return st.just(path_parameters)
    choices = [path_parameters]
    for name, values in KNOWN.items():
        if name in path_parameters:
            choices += [{**path_parameters, name: value} for value in values]
    return st.sampled_from(choices) if len(choices) > 1 else st.just(path_parameters)


@dataclass
class Orchestrator:
    url: str
    user_token: str = ""
    # One connection pool for all of an orchestrator's cases, rather than a new session per case.
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}


def _db(redis_server: RedisServer, number: int) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{number}"
    redis.Redis.from_url(url).flushdb()
    return url


def _submit(http: httpx.Client, body: str) -> str:
    response = http.post("/api/v1/tasks", content=body, headers={"Content-Type": "text/yaml"})
    assert response.status_code == 201, response.text
    return str(response.json()["task_id"])


def _cancelled(http: httpx.Client) -> str:
    task_id = _submit(http, NO_ROOM)
    assert http.post(f"/api/v1/tasks/{task_id}/cancel").json()["state"] == "cancelled"
    return task_id


@pytest.fixture(scope="module")
def open_cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """Auth off (no ORCHESTRATOR_TOKEN) and no worker: every caller is the admin, every task waits."""
    home = tmp_path_factory.mktemp("fuzz-open")
    with LocalCluster(
        home=home, workers=0, redis_url=_db(redis_server, 6), env=FAST_ENV, log_dir=home / "logs"
    ) as running:
        with httpx.Client(base_url=running.api_url, timeout=10) as http:
            KNOWN["task_id"].append(_cancelled(http))
        orchestrator = Orchestrator(running.api_url)
        yield orchestrator
        orchestrator.session.close()


@pytest.fixture(scope="module")
def auth_cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """Auth on, one worker, and finished tasks of the admin and of a user to name."""
    home = tmp_path_factory.mktemp("fuzz-auth")
    with LocalCluster(
        home=home,
        workers=1,
        redis_url=_db(redis_server, 7),
        results_dir=home / "results",
        # The orchestrator serves the worker's files from the same RESULTS_DIR.
        env={**FAST_ENV, "ORCHESTRATOR_TOKEN": TOKEN, "RESULTS_DIR": str(home / "results")},
        log_dir=home / "logs",
    ) as running:
        admin = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=running.api_url, headers=admin, timeout=10) as http:
            done = _submit(http, ECHO)
            wait_for(http, done, {"succeeded"})
            files = [item["path"] for item in http.get(f"/api/v1/tasks/{done}/artifacts").json()["items"]]
            assert files, "the echo task left no files to download"
            KNOWN["path"] += files
            KNOWN["task_id"] += [done, _cancelled(http)]
            # The acting user is kept out of KNOWN: the admin's fuzzing may remove the users it names.
            user = http.post("/api/v1/admin/users", json={"name": "fuzz-user"}).json()["token"]
            http.post("/api/v1/admin/users", json={"name": "fuzz-other"}).raise_for_status()
            KNOWN["name"] += ["fuzz-other", "admin"]
            KNOWN["worker_id"].append("local-1")
        with httpx.Client(base_url=running.api_url, headers={"Authorization": f"Bearer {user}"}, timeout=10) as http:
            mine = _submit(http, ECHO)
            wait_for(http, mine, {"succeeded"})
            KNOWN["task_id"].append(mine)
        orchestrator = Orchestrator(running.api_url, user)
        yield orchestrator
        orchestrator.session.close()


# Headers that frame the HTTP message are the HTTP layer's, not an operation's. The negative cases add
# extra headers named from strings Hypothesis collects, "Content-Length" among them: with a fuzzed value,
# uvicorn refuses the request with its own text/plain 400 before any operation sees it.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "host", "te", "trailer", "upgrade"})


def _check(case: schemathesis.Case, orchestrator: Orchestrator, token: str | None) -> None:
    for name in [name for name in case.headers or {} if name.lower() in FRAMING]:
        del case.headers[name]
    case.call_and_validate(
        base_url=orchestrator.url,
        session=orchestrator.session,
        headers=orchestrator.headers(token),
        checks=CHECKS,
        timeout=15,
    )


@schema.parametrize()
@FUZZ
def test_auth_off_answers_as_documented(case: schemathesis.Case, open_cluster: Orchestrator) -> None:
    _check(case, open_cluster, None)


# The user runs before the admin, whose fuzzing cancels tasks and edits users.
@schema.parametrize()
@FUZZ
def test_user_token_answers_as_documented(case: schemathesis.Case, auth_cluster: Orchestrator) -> None:
    _check(case, auth_cluster, auth_cluster.user_token)


@schema.parametrize()
@FUZZ
def test_admin_token_answers_as_documented(case: schemathesis.Case, auth_cluster: Orchestrator) -> None:
    _check(case, auth_cluster, TOKEN)


@strangers.parametrize()
@settings(FUZZ, max_examples=3)
def test_missing_or_wrong_token_answers_as_documented(case: schemathesis.Case, auth_cluster: Orchestrator) -> None:
    _check(case, auth_cluster, "not-a-token" if case.operation.method == "get" else None)


def test_fuzzed_document_is_the_served_one(open_cluster: Orchestrator, auth_cluster: Orchestrator) -> None:
    for orchestrator in (open_cluster, auth_cluster):
        assert httpx.get(orchestrator.url + "/openapi.json", timeout=10).json() == DOCUMENT
    served = [f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item]
    assert len(served) >= 30
    for fuzzed_schema in (schema, strangers):
        fuzzed = [result.ok().label for result in fuzzed_schema.get_all_operations() if isinstance(result, Ok)]
        # Each fuzz test above is parametrized by exactly these operations: every one the document lists.
        assert sorted(fuzzed) == sorted(served)


def test_body_over_the_limit_is_the_documented_413(auth_cluster: Orchestrator) -> None:
    operation = schema["/api/v1/tasks"]["POST"]
    too_large = ECHO + "# " + "x" * 2_000_000 + "\n"
    case = operation.Case(body=too_large, media_type="text/yaml")
    response = case.call_and_validate(
        base_url=auth_cluster.url, headers=auth_cluster.headers(TOKEN), checks=CHECKS, timeout=15
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_every_error_answer_shares_one_schema() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or path in ("/readyz", "/metrics"):
                    continue
                schema_ref = response["content"]["application/json"]["schema"]
                # The OpenAI routes answer in OpenAI's error shape, which its clients read.
                body = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"
                assert schema_ref == {"$ref": f"#/components/schemas/{body}"}, (method, path, status)
                assert "`error`: `" in response["description"], (method, path, status)
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]


def test_malformed_ids_get_mlocs_documented_400_not_a_validation_422(auth_cluster: Orchestrator) -> None:
    # The documented id patterns are for clients; MLOC checks ids itself, with a message that says what an id is.
    for path, parameters in (
        ("/api/v1/tasks/{task_id}", {"task_id": "not-a-uuid"}),
        ("/api/v1/workers/{worker_id}", {"worker_id": "-bad"}),
    ):
        case = schema[path]["GET"].Case(path_parameters=parameters)
        response = case.call_and_validate(
            base_url=auth_cluster.url, headers=auth_cluster.headers(TOKEN), checks=CHECKS, timeout=15
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "bad_request" and "is not a" in response.json()["message"]
