"""The `mloc` command line against a real orchestrator."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import redis

from mloc.localcluster import LocalCluster
from tests.conftest import RedisServer
from tests.support.cli import mloc


def test_validate_accepts_good_files_and_names_the_problem_in_bad_ones(tmp_path: Path) -> None:
    good = mloc("validate", "templates/echo.yaml", "templates/inference_vllm_mistral.yaml")
    assert good.returncode == 0, good.stderr
    assert "InferenceTask" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskType: inference\ninference:\n  prompts: [hi]\n  temprature: 0.5\n")
    result = mloc("validate", str(bad))
    assert result.returncode == 1
    assert "spec.inference.temprature" in result.stderr and "temperature" in result.stderr
    # A message that ends with its fix says it once.
    model = tmp_path / "model.yaml"
    model.write_text("taskType: inference\nmodel: {source: {type: package, identifier: gemma3-270mm}}\n"
                     "inference: {prompts: [hi]}\n")  # fmt: skip
    said = mloc("validate", str(model)).stderr
    assert said.count("source type package takes one of") == 2, said  # the summary line, and the detail's
    assert " -> " not in said, said


def test_validate_checks_every_task_of_a_multi_document_file(tmp_path: Path) -> None:
    pipeline = mloc("validate", "templates/pipeline_gemma3_270m.yaml")
    assert pipeline.returncode == 0, pipeline.stderr
    assert "(document 4): InferenceTask" in pipeline.stdout
    two = tmp_path / "two.yaml"
    two.write_text("taskType: echo\n---\ntaskType: echoo\n---\n")
    result = mloc("validate", str(two))
    assert result.returncode == 1
    assert "(document 1): EchoTask" in result.stdout
    assert "(document 2): unknown taskType 'echoo'; did you mean 'echo'?" in result.stderr


def test_validate_json_is_one_document_with_each_tasks_verdict_and_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskType: inference\ninference:\n  prompts: [hi]\n  temprature: 0.5\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("taskType: [echo\n")
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        "metadata: {name: first}\ntaskType: echo\ndependsOn: [second]\n---\n"
        "metadata: {name: second}\ntaskType: echo\ndependsOn: [first, thrid]\n---\n"
        "taskType: echoo\n"
    )
    result = mloc("validate", "templates/echo.yaml", str(bad), str(broken), str(steps), "--json")
    assert result.returncode == 1, result.stderr  # as without --json: a task is invalid
    assert result.stderr == ""
    body = json.loads(result.stdout)
    assert body["ok"] is False
    echo, inference, yaml, first, second, typo = body["documents"]
    assert echo == {
        "label": "templates/echo.yaml",
        "file": "templates/echo.yaml",
        "document": None,
        "valid": True,
        "kind": "EchoTask",
        "taskType": "echo",
        "name": "hello-fleet",
        "errors": [],
    }
    assert inference["valid"] is False and inference["kind"] is None and inference["document"] is None
    assert inference["errors"] == [
        {"path": "spec.inference.temprature", "message": "unknown field", "fix": "did you mean 'temperature'?"}
    ]
    [unreadable] = yaml["errors"]
    assert unreadable["path"] is None and unreadable["message"].startswith("invalid YAML at line 2")
    # A pipeline's graph: each step that cannot run, with the field at fault where one is.
    cycle = "the tasks wait for each other in a cycle: first -> second -> first; remove one of these dependencies"
    assert first["label"] == f"{steps} (document 1)" and first["document"] == 1
    assert first["name"] == "first" and first["kind"] == "EchoTask"
    assert first["valid"] is False and first["errors"] == [{"path": None, "message": cycle, "fix": None}]
    assert [error["path"] for error in second["errors"]] == ["spec.dependsOn[1]", None]
    assert "'thrid' is neither a task of this submission" in second["errors"][0]["message"]
    assert typo["errors"] == [{"path": "spec.taskType", "message": "unknown: 'echoo'", "fix": "did you mean 'echo'?"}]
    # The human output says the same, on stderr.
    said = mloc("validate", str(steps)).stderr
    assert f"invalid {steps} (document 2): spec.dependsOn[1]: 'thrid' is neither" in said
    assert f"invalid {steps} (document 1): {cycle}" in said

    good = mloc("validate", "-o", "json", "templates/pipeline_gemma3_270m.yaml")
    assert good.returncode == 0, good.stderr
    listed = json.loads(good.stdout)
    assert listed["ok"] is True and [d["document"] for d in listed["documents"]] == [1, 2, 3, 4]
    assert all(d["valid"] and not d["errors"] for d in listed["documents"])
    assert listed["documents"][3]["kind"] == "InferenceTask"


def test_schema_to_a_place_it_cannot_write_says_so(tmp_path: Path) -> None:
    result = mloc("schema", "-o", str(tmp_path / "missing" / "schema.json"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "No such file or directory" in result.stderr


def test_schema_is_valid_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    assert mloc("schema", "-o", str(out)).returncode == 0
    schema = json.loads(out.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert len(schema["oneOf"]) >= 8


def test_submit_wait_tasks_show_workers_stats_cancel(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    cluster = make_cluster(1, env={"ORCHESTRATOR_TOKEN": "cli-token"})
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "cli-token"}
    submitted = mloc("submit", "templates/echo.yaml", "--wait", env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout and "hello from MLOC" in submitted.stdout
    listed = mloc("tasks", env=env)
    assert "hello-fleet" in listed.stdout and "succeeded" in listed.stdout
    workers = mloc("workers", env=env)
    assert "local-1" in workers.stdout and "active" in workers.stdout
    stats = mloc("stats", env=env)
    assert "tasks.echo.succeeded" in stats.stdout and "per day" in stats.stdout
    by_month = mloc("stats", "--group-by", "month", "--start-date", "2020-01-01", env=env)
    assert by_month.returncode == 0, by_month.stderr
    assert "per month" in by_month.stdout and re.search(r"\b\d{4}-\d{2}\b", by_month.stdout)
    task_id = json.loads(mloc("submit", "templates/echo.yaml", "--json", env=env).stdout)["task_id"]
    assert json.loads(mloc("show", task_id, "--json", env=env).stdout)["task_id"] == task_id
    followed = mloc("logs", "-f", task_id, env=env)  # exits 0 once the task succeeded
    assert followed.returncode == 0, followed.stderr
    cancelled = mloc("cancel", task_id, env=env)
    assert cancelled.returncode != 0
    assert f"task {task_id} has already ended: it is succeeded, and cannot become cancelled" in cancelled.stderr
    no_token = mloc("tasks", env={"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": ""})
    assert no_token.returncode == 2 and "bearer token" in no_token.stderr
    assert "no token was sent: set MLOC_TOKEN to your API token" in no_token.stderr
    # A token read from a secret file keeps its line break; it is not part of the token.
    from_file = mloc(
        "tasks", env={"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "", "MLOC_TOKEN": "cli-token\n"}
    )
    assert from_file.returncode == 0, from_file.stderr
    added = mloc("users", "add", "carol", env=env)
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("mloc_")
    as_carol = mloc("tasks", env={"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "", "MLOC_TOKEN": token})
    assert as_carol.returncode == 0 and "hello-fleet" not in as_carol.stdout


def test_stats_help_names_the_date_format_and_other_dates_are_refused() -> None:
    helped = mloc("stats", "--help")
    assert helped.returncode == 0 and "YYYY-MM-DD" in helped.stdout and "--group-by" in helped.stdout
    wrong = mloc("stats", "--start-date", "01/02/2026", env={"MLOC_API_URL": "http://127.0.0.1:9"})
    assert wrong.returncode == 2
    assert "'01/02/2026' is not a day; give YYYY-MM-DD, today, yesterday, or Nd for N days ago (7d)" in wrong.stderr
    # Said in the command's own words, before anything is sent.
    backwards = mloc(
        "stats", "--start-date", "2026-03-02", "--end-date", "2026-01-01", env={"MLOC_API_URL": "http://127.0.0.1:9"}
    )
    assert backwards.returncode == 2
    assert "--start-date 2026-03-02 is after --end-date 2026-01-01; swap them" in backwards.stderr
    nothing = mloc("users", "set-budget", "bob", env={"MLOC_API_URL": "http://127.0.0.1:9"})
    assert nothing.returncode == 2
    assert (
        "give at least one limit to set: --tokens, --tokens-in, --tokens-out, --gpu-time, --cpu-time" in nothing.stderr
    )

    # A state filter in the option's own name and with every state it takes, not the API's query field.
    bogus = mloc("tasks", "--state", "done", env={"MLOC_API_URL": "http://127.0.0.1:9"})
    assert bogus.returncode == 2 and "query.state" not in bogus.stderr
    assert "'--state'" in bogus.stderr and "'done' is not one of" in bogus.stderr and "'succeeded'" in bogus.stderr


def test_unreachable_orchestrator_is_a_clear_error() -> None:
    result = mloc("tasks", env={"MLOC_API_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2 and "cannot reach the orchestrator" in result.stderr


def test_a_bad_api_url_or_token_is_named_not_taken_for_a_lost_orchestrator() -> None:
    no_scheme = mloc("tasks", env={"MLOC_API_URL": "127.0.0.1:8000"})
    assert no_scheme.returncode == 2
    assert no_scheme.stderr.splitlines() == [
        "error: MLOC_API_URL 127.0.0.1:8000 must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
    ]
    broken = mloc("tasks", env={"MLOC_API_URL": "http://127.0.0.1:9", "MLOC_TOKEN": "tok\nen"})
    assert broken.returncode == 2 and broken.stderr.startswith("error: MLOC_TOKEN holds a line break, tab")
    assert "lost the orchestrator" not in broken.stderr and "tok" not in broken.stderr.replace("token", "")


def test_start_orchestrator_with_bad_redis_password_explains(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        redis.Redis.from_url(server.url).config_set("requirepass", "right")
        _start_with_wrong_password(server.url.replace("redis://", "redis://default:wrong@"))
    finally:
        redis.Redis.from_url(server.url.replace("redis://", "redis://default:right@")).config_set("requirepass", "")
        server.stop()


def _start_with_wrong_password(url: str) -> None:
    result = mloc("start", "--node-type", "orchestrator", env={"REDIS_URL": url, "MLOC_PORT": "18999"}, timeout=60)
    assert result.returncode == 2
    assert "refused the credentials" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_names_the_variable() -> None:
    result = mloc("start", "--node-type", "orchestrator", env={"MLOC_PORT": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid setting MLOC_PORT / PORT='0': Input should be greater than or equal to 1"
    ]


def test_validate_names_a_quantity_no_machine_has_without_a_traceback(tmp_path: Path) -> None:
    infinite = tmp_path / "infinite.yaml"
    infinite.write_text("taskType: echo\nresources: {hardware: {cpu: .inf}}\n")
    huge = tmp_path / "huge.json"
    huge.write_text('{"taskType": "echo", "resources": {"hardware": {"memory": 1' + "0" * 400 + "}}}")
    result = mloc("validate", str(infinite), str(huge))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cpu: inf is not a finite" in result.stderr and "is more than 1Pi; check the unit" in result.stderr
