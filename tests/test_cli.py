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
    cancelled = mloc("cancel", task_id, env=env)
    assert cancelled.returncode == 0 or "cannot become cancelled" in cancelled.stderr
    no_token = mloc("tasks", env={"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": ""})
    assert no_token.returncode == 2 and "bearer token" in no_token.stderr
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


def test_unreachable_orchestrator_is_a_clear_error() -> None:
    result = mloc("tasks", env={"MLOC_API_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2 and "cannot reach the orchestrator" in result.stderr


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
