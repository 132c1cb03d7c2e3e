"""The Python client against a real cluster: it reads the CLI's settings, takes a task in every form a
user has one (dict, path, file name, YAML text, bytes, a validated document), takes id prefixes, and
refuses anything else with a clear error. The README's example runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mloc.spec
from mloc.client import ApiError, Client, ClientError, TaskIdError, Unreachable, WaitTimeout
from mloc.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"### Python client\n.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md has no Python client example"
    return match.group(1)


def test_client_reads_the_cli_settings_takes_every_task_form_and_runs_the_readme_example(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = make_cluster(1, env={"ORCHESTRATOR_TOKEN": "client-admin"})
    for name in [k for k in os.environ if k.startswith("MLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLOC_API_URL", cluster.api_url)
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "client-admin")
    monkeypatch.chdir(REPO)

    with Client() as client:
        assert client.base_url == cluster.api_url
        file = tmp_path / "named.yaml"
        file.write_text("taskType: echo\nmetadata: {name: from-a-path}\npayload: path\n")
        json_file = tmp_path / "task.json"
        json_file.write_text('{"taskType": "echo", "payload": "json file"}')
        given = {
            "dict": {"taskType": "echo", "payload": {"kind": "dict"}},
            "path": file,
            "file name": str(file),
            "relative file name": "templates/echo.yaml",
            "json file name": str(json_file),
            "yaml text": "taskType: echo\npayload: yaml text\n",
            "json text": '{"taskType": "echo", "payload": "json text"}',
            "bytes": b"taskType: echo\npayload: bytes\n",
            "document": mloc.spec.load(b"taskType: echo\npayload: document\n"),
        }
        ids = {form: client.submit(task)["task_id"] for form, task in given.items()}
        payloads = {
            form: client.result(client.wait(task_id, timeout=60)["task_id"])["payload"] for form, task_id in ids.items()
        }
        assert payloads == {
            "dict": {"kind": "dict"},
            "path": "path",
            "file name": "path",
            "relative file name": {"message": "hello from MLOC"},
            "json file name": "json file",
            "yaml text": "yaml text",
            "json text": "json text",
            "bytes": "bytes",
            "document": "document",
        }
        assert client.task(ids["path"])["name"] == "from-a-path"

        # Many at once, in any of those forms; a file of several documents (a pipeline) gives them all.
        bulk = client.submit_bulk([{"taskType": "echo"}, file, "taskType: echo\n"])
        assert bulk["count"] == 3
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(
            "metadata: {name: first}\nspec: {taskType: echo}\n---\n"
            "metadata: {name: second}\nspec: {taskType: echo, dependsOn: [first]}\n"
        )
        steps = client.submit_bulk([pipeline])["tasks"]
        assert [step["name"] for step in steps] == ["first", "second"] and steps[1]["pipeline_id"]
        # As one task it is refused before sending, naming the call that takes it; bad YAML as a ClientError.
        with pytest.raises(ClientError, match=r"several YAML documents \(---\): submit them together with client"):
            client.submit(pipeline)
        broken = tmp_path / "broken.yaml"
        broken.write_text("taskType: echo\npayload: [unclosed\n")
        with pytest.raises(ClientError, match=rf"^task file '{broken}': invalid YAML at line"):
            client.submit_bulk([broken])
        # A wait that gives up says so in its own type; the task goes on.
        slow = client.submit({"taskType": "echo", "hyperparameters": {"sleep_sec": 5}})["task_id"]
        with pytest.raises(WaitTimeout) as gave_up:
            client.wait(slow, timeout=0.2)
        assert gave_up.value.task_id == slow and gave_up.value.code == "timeout"
        assert gave_up.value.state in ("pending", "assigned", "running")
        client.cancel(slow)

        # Anything else is refused before sending, saying what is accepted.
        with pytest.raises(ClientError, match=r"submit\(\) got a int; give the task as a dict, a Path or file name"):
            client.submit(42)
        with pytest.raises(ClientError, match=r"task file 'no-such-task.yaml' does not exist"):
            client.submit("no-such-task.yaml")
        with pytest.raises(ClientError, match="is a folder"):
            client.submit(tmp_path)
        with pytest.raises(ClientError, match="a value JSON cannot carry"):
            client.submit({"taskType": "echo", "payload": {1, 2}})
        with pytest.raises(ApiError) as invalid:
            client.submit({"taskType": "echo", "hyperparameters": {"sleeep_sec": 1}})
        assert invalid.value.status_code == 422 and "sleeep_sec" in str(invalid.value.details)

        # Ids: a unique prefix works everywhere; a prefix of no task, or of several, says so.
        task_id = ids["dict"]
        assert client.task(task_id[:5])["task_id"] == task_id
        assert client.result(task_id[:7].upper())["payload"] == {"kind": "dict"}
        assert client.artifacts(task_id[:9])[0]["path"] == "responses.json"
        first = [i[0] for i in ids.values()]
        shared = next((c for c in first if first.count(c) > 1), None)
        if shared is not None:
            with pytest.raises(TaskIdError, match=f"task id prefix '{shared}' is ambiguous") as ambiguous:
                client.task(shared)
            assert {c["task_id"] for c in ambiguous.value.candidates} >= {i for i in ids.values() if i[0] == shared}
        with pytest.raises(TaskIdError, match="is not a task id"):
            client.logs("not-an-id")

        # Workers: a live one cannot be removed.
        with pytest.raises(ApiError, match="local-1 is active") as live:
            client.remove_worker("local-1")
        assert live.value.status_code == 409

        # A user's token from MLOC_TOKEN wins over ORCHESTRATOR_TOKEN, as in the CLI.
        token = client.add_user("grace")["token"]
    monkeypatch.setenv("MLOC_TOKEN", token)
    with Client() as grace:
        assert grace.tasks()["total"] == 0
        with pytest.raises(TaskIdError, match="no task id starts with"):
            grace.task(task_id[:8])  # another user's task is not theirs to find
    with Client(cluster.api_url) as nobody, pytest.raises(ApiError) as refused:
        nobody.tasks()
    assert refused.value.status_code == 401
    assert "no token was sent: pass token=" in refused.value.message
    with Client("http://127.0.0.1:9") as nowhere, pytest.raises(Unreachable, match="cannot reach the orchestrator"):
        nowhere.health()

    # The README's example, as printed, in a fresh interpreter with only the environment set.
    monkeypatch.delenv("MLOC_TOKEN")
    ran = subprocess.run(
        [sys.executable, "-c", readme_example()], capture_output=True, text=True, cwd=REPO, timeout=180
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[0] == "succeeded {'question': 'ping'}"
    assert re.fullmatch(r"echo \d+ log lines", ran.stdout.splitlines()[1])


def test_a_url_without_a_scheme_or_a_token_with_spaces_inside_is_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("MLOC_") or k == "ORCHESTRATOR_TOKEN"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLOC_API_URL", "127.0.0.1:8000")
    with pytest.raises(ClientError) as no_scheme:
        Client()
    assert no_scheme.value.message == (
        "MLOC_API_URL 127.0.0.1:8000 must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
    )
    with pytest.raises(ClientError, match=r"^base_url localhost:8000 must start with http://"):
        Client("localhost:8000")
    # A route of the orchestrator's in the base URL is named, with the base URL meant; a proxy's prefix is kept.
    monkeypatch.setenv("MLOC_API_URL", "http://127.0.0.1:8731/api/v1")
    with pytest.raises(ClientError) as route:
        Client()
    assert route.value.message == (
        "MLOC_API_URL http://127.0.0.1:8731/api/v1 ends in /api/v1, a route of the orchestrator that every call "
        "adds itself; give the orchestrator's base URL: MLOC_API_URL=http://127.0.0.1:8731"
    )
    with pytest.raises(ClientError, match=r"ends in /dashboard, .*: base_url=https://corp.example/mloc$"):
        Client("https://corp.example/mloc/dashboard")
    with Client("https://corp.example/mloc/") as behind_a_proxy:
        assert behind_a_proxy.base_url == "https://corp.example/mloc"

    # Secret files end in a line break: it is not part of the token, nor of the URL.
    monkeypatch.setenv("MLOC_API_URL", "https://mloc.example.com/\n")
    monkeypatch.setenv("MLOC_TOKEN", "tok-en\n")
    with Client() as client:
        assert client.base_url == "https://mloc.example.com"
        assert client.http.headers["Authorization"] == "Bearer tok-en"

    # Inside the token, a line break or control character cannot be sent; the message names the variable,
    # never the token. A space can (`mloc up` takes ORCHESTRATOR_TOKEN='up token').
    for variable, bad in [("MLOC_TOKEN", "tok\nen"), ("MLOC_TOKEN", "tok\ten"), ("ORCHESTRATOR_TOKEN", "t\x1bk")]:
        monkeypatch.delenv("MLOC_TOKEN", raising=False)
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ClientError, match=f"^{variable} holds a line break, tab, control") as refused:
            Client()
        assert bad not in refused.value.message
    with pytest.raises(ClientError, match=r"^token holds a line break"):
        Client("http://127.0.0.1:9", "tök")
    with Client("http://127.0.0.1:9", "up token") as spaced:
        assert spaced.http.headers["Authorization"] == "Bearer up token"
