"""Eval tasks end to end on a real local cluster with auth on: two runs of custom tasks on the packaged tiny
model, their scores on the task (result and GET /api/v1/tasks/{id}/metrics), and compared through
GET /api/v1/evals/compare, the Python client and `mloc eval compare`; and the bad input of each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster

ADMIN = "eval-admin-token"
TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
MC_ROWS = [
    {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), str(i), "zero"], "answer": i % 4}
    for i in range(8)
]
EM_WORDS = ["yes", "no", "blue", "red", "one", "two"]


def write_data(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mc, em = folder / "arith.jsonl", folder / "words.csv"
    mc.write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    em.write_text("question,target\n" + "".join(f"Say {word}.,{word}\n" for word in EM_WORDS))
    return {"mc": mc, "em": em}


def eval_task(name: str, custom: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mloc/v1",
        "kind": "EvalTask",
        "metadata": {"name": name},
        "spec": {
            "taskType": "eval",
            "model": TINY,
            "eval": {"custom": custom, "batch_size": 4, "max_tokens": 4, **options},
        },
    }


def custom(data: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {"name": "arith", "path": str(data["mc"]), "type": "multiple_choice"},
        {"name": "words", "path": str(data["em"]), "type": "exact_match"},
    ]


@pytest.mark.extra("eval")
def test_two_eval_runs_are_scored_stored_and_compared_over_http_the_client_and_the_cli(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = write_data(tmp_path / "data")
    cluster = make_cluster(1, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_MODEL_ROOTS": str(tmp_path / "data")})
    admin = client_for(cluster, ADMIN)
    alice = client_for(cluster, admin.add_user("alice")["token"])
    bob = client_for(cluster, admin.add_user("bob")["token"])

    base = alice.submit(eval_task("base", custom(data)))["task_id"]
    shots = alice.submit(eval_task("two-shot", custom(data), num_fewshot=2))["task_id"]
    renamed = {"name": "words", "path": str(data["em"]), "type": "exact_match", "columns": {"target": "expected"}}
    broken = alice.submit(eval_task("broken", [renamed]))["task_id"]
    echo = alice.submit({"kind": "EchoTask", "spec": {"taskType": "echo", "payload": {"n": 1}}})["task_id"]
    for task_id in (base, shots, broken, echo):
        alice.wait(task_id, timeout=300)

    # A column the file lacks fails the run, naming it and the file's columns.
    record = alice.task(broken)
    assert record["state"] == "failed"
    assert f"column(s) expected not in {str(data['em'])!r}, whose columns are question, target" in record["reason"]

    result = alice.result(base)
    assert alice.task(base)["state"] == "succeeded" and alice.task(shots)["state"] == "succeeded"
    assert set(result["scores"]) == {"arith", "words"}
    assert set(result["scores"]["arith"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert result["scores"]["arith"]["acc_stderr"] > 0 and result["samples"]["words"] == {"rows": 6, "scored": 6}
    rows = alice.metrics(base)["metrics"]
    assert {row["run"] for row in rows} == {1}  # every entry names the run that logged it
    reported = {key: value for row in rows for key, value in row.items() if key not in ("step", "run")}
    assert reported == {
        f"{task}/{metric}": value for task, values in result["scores"].items() for metric, value in values.items()
    }

    comparison = alice.compare_evals(base[:8], shots[:8])
    assert [(run["task_id"], run["name"], run["num_fewshot"]) for run in comparison["runs"]] == [
        (base, "base", None),
        (shots, "two-shot", 2),
    ]
    assert all(run["model"] == "mloc-tiny-llama" and run["adapter"] is None for run in comparison["runs"])
    second = alice.result(shots)["scores"]
    rows = {(row["task"], row["metric"]): row for row in comparison["rows"]}
    assert set(rows) == {("arith", "acc"), ("arith", "acc_norm"), ("words", "exact_match")}
    for (task, metric), row in rows.items():
        first_value, second_value = result["scores"][task][metric], second[task][metric]
        first_se, second_se = result["scores"][task][f"{metric}_stderr"], second[task][f"{metric}_stderr"]
        assert row["cells"] == [
            {"value": first_value, "stderr": first_se},
            {"value": second_value, "stderr": second_se},
        ]
        assert row["difference"] == pytest.approx(second_value - first_value)
        assert row["combined_stderr"] == pytest.approx(math.hypot(first_se, second_se))
        spread = math.hypot(first_se, second_se)
        assert row["significant"] == (abs(second_value - first_value) > 2 * spread if spread else None)
    over_http = alice.http.get("/api/v1/evals/compare", params={"tasks": f"{base},{shots}"})
    assert over_http.status_code == 200 and over_http.json() == comparison

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOC_")}
    env.update({"MLOC_API_URL": cluster.api_url, "MLOC_TOKEN": alice.http.headers["Authorization"].split()[1]})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mloc.cli", "eval", "compare", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    shown = cli(base[:8], shots[:8])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"[1] {base[:8]} base: mloc-tiny-llama (few-shot task default)"
    assert lines[1] == f"[2] {shots[:8]} two-shot: mloc-tiny-llama (few-shot 2)"
    acc = rows[("arith", "acc")]
    first, second_cell = acc["cells"]
    expected = [
        "arith",
        "acc",
        f"{first['value']:.4f} ± {first['stderr']:.4f}",
        f"{second_cell['value']:.4f} ± {second_cell['stderr']:.4f}",
        f"{acc['difference']:+.4f} ± {acc['combined_stderr']:.4f}",
        {True: "yes", False: "no", None: "-"}[acc["significant"]],
    ]
    assert any(line.split(None, 2)[:2] == ["arith", "acc"] and all(part in line for part in expected) for line in lines)
    as_json = cli(base, shots, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == comparison

    # Bad input: a task that is not an eval, a single run, another user's tasks, an id that names nothing.
    with pytest.raises(ApiError) as caught:
        alice.compare_evals(base, echo)
    echo_name = alice.task(echo)["name"]
    assert caught.value.status_code == 409
    assert caught.value.message == f"task {echo} ({echo_name}) has taskType 'echo', not eval; compare eval tasks only"
    single = alice.http.get("/api/v1/evals/compare", params={"tasks": base})
    assert single.status_code == 400 and "at least two eval tasks" in single.json()["message"]
    assert bob.http.get("/api/v1/evals/compare", params={"tasks": f"{base},{shots}"}).status_code == 404
    unknown = alice.http.get("/api/v1/evals/compare", params={"tasks": f"{base},ffffffff"})
    assert (
        unknown.status_code == 404
        and "no task of yours has an id starting with 'ffffffff'" in unknown.json()["message"]
    )
    failed = alice.http.get("/api/v1/evals/compare", params={"tasks": f"{base},{broken}"})
    assert failed.status_code == 409 and failed.json()["message"].startswith(f"task {broken} (broken) failed (")
    held = eval_task("held", custom(data))
    held["spec"]["resources"] = {"tags": ["no-such-worker"]}  # stays pending
    pending = alice.submit(held)["task_id"]
    waits = alice.http.get("/api/v1/evals/compare", params={"tasks": f"{base},{pending}"})
    assert waits.status_code == 409 and waits.json()["message"] == (
        f"task {pending} (held) is pending; it has scores once it succeeds: follow it to its end with "
        f"`mloc logs -f {pending[:8]}`"
    )
    refused = cli(base[:8], echo[:8])
    assert refused.returncode != 0 and "has taskType 'echo', not eval" in refused.stderr


def test_eval_tasks_are_refused_at_submit_with_the_field_and_nothing_is_stored(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = write_data(tmp_path / "data")
    outside = write_data(tmp_path / "elsewhere")
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_MODEL_ROOTS": str(tmp_path / "data")})
    admin = client_for(cluster, ADMIN)
    alice = client_for(cluster, admin.add_user("alice")["token"])

    with pytest.raises(ApiError) as caught:
        alice.submit(eval_task("outside", custom(outside)))
    assert caught.value.status_code == 403
    assert caught.value.message.startswith(f"spec.eval.custom[0].path {str(outside['mc'])!r} is outside the folders")
    # A home path is said to be one (each worker would expand it to its own user's home).
    homed = [{"name": "arith", "path": "~/.mloc/data/arith.jsonl", "type": "multiple_choice"}]
    with pytest.raises(ApiError) as caught:
        alice.submit(eval_task("home", homed))
    assert caught.value.message.startswith(
        "spec.eval.custom[0].path '~/.mloc/data/arith.jsonl' starts in a home folder, which each worker would "
        f"expand to its own user's; give an absolute path under {tmp_path / 'data'}"
    ), caught.value.message

    bad_metric = [{"name": "gen", "path": str(data["em"]), "type": "generation", "metric": ["rouge"]}]
    with pytest.raises(ApiError) as caught:
        alice.submit(eval_task("rouge", bad_metric))
    assert caught.value.status_code == 422
    assert [detail["path"] for detail in caught.value.details] == ["spec.eval.custom.0.metric.0"]
    assert alice.tasks()["total"] == 0
