"""`mloc results` for scripts on a real local cluster: a full page says so on stderr even with --json,
--all prints every line, and a task without result lines is named with the command that shows its
result. And a submit refusal is printed once, not again as a detail that repeats it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}


def inference(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": name},
        "spec": {"taskType": "inference", "model": TINY, "inference": {"max_tokens": 2, "temperature": 0, **options}},
    }


@pytest.mark.extra("inference")
def test_results_for_scripts_say_when_more_may_follow_and_print_all_with_all(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"Count: {i}, "}) + "\n" for i in range(25)))
    cluster = make_cluster(1)
    client = client_for(cluster)
    env = {"MLOC_API_URL": cluster.api_url}
    task_id = client.submit(
        inference("rows", {"batch_size": 8, "input": {"path": str(rows), "columns": {"id": "id"}}})
    )["task_id"]
    assert client.wait(task_id, timeout=300)["state"] == "succeeded"
    every = [f"r{i:02d}" for i in range(25)]

    def ids(stdout: str) -> list[str]:
        return [json.loads(line)["id"] for line in stdout.splitlines()]

    # The default page is cut at 20 lines: stdout stays NDJSON, and stderr says where the rest starts.
    page = mloc("results", task_id, "--json", env=env)
    assert page.returncode == 0, page.stderr
    assert ids(page.stdout) == every[:20]
    assert page.stderr.strip() == "... 5 more: --offset 20 (or --all for every line)"
    # A finished task's page that happens to be the last says nothing more: its row count is known.
    exact = mloc("results", task_id, "--json", "--limit", "25", env=env)
    assert ids(exact.stdout) == every and exact.stderr == ""

    whole = mloc("results", task_id[:8], "--json", "--all", env=env)
    assert whole.returncode == 0, whole.stderr
    assert ids(whole.stdout) == every and whole.stderr == ""
    tail = mloc("results", task_id, "--all", "--offset", "22", env=env)
    assert tail.returncode == 0, tail.stderr
    assert [line.split()[1] for line in tail.stdout.splitlines() if line.startswith("--- ")] == every[22:]
    assert "more may follow" not in tail.stderr

    both = mloc("results", task_id, "--all", "--limit", "3", env=env)
    assert both.returncode == 2 and both.stderr == "error: give --all or --limit, not both\n"
    helped = mloc("results", "--help", env=env)
    assert helped.returncode == 0 and "--all" in helped.stdout and "Print every line" in helped.stdout

    # A task of inline prompts has no lines: said in the CLI's words, not the HTTP route's.
    inline = client.submit(inference("inline", {"prompts": ["hi"]}))["task_id"]
    assert client.wait(inline, timeout=120)["state"] == "succeeded"
    none = mloc("results", inline[:8], "--json", env=env)
    assert none.returncode == 2 and none.stdout == ""
    assert none.stderr == (
        f"error: task {inline} is not a dataset task, so it has no result lines (only inference tasks that read a "
        f"dataset, inference.input, write them); `mloc result {inline}` prints its result\n"
    )

    # A refusal with one detail is that detail's text: printed once. Several stay listed one a line.
    def submitted(name: str, source: dict[str, Any]) -> list[str]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(inference(name, {"input": source})))
        said = mloc("submit", str(path), env=env)
        assert said.returncode == 2 and said.stdout == "", said.stdout
        return said.stderr.splitlines()

    assert submitted("bad", {"task": "g3n!"}) == [
        "error: invalid task: spec.inference.input.task: inference.input.task 'g3n!' is not a task id; give the id "
        "of an inference task over a dataset, or its first 4 or more characters (`mloc tasks` lists them)"
    ]
    assert submitted("nothing", {"task": "ffff0000"}) == [
        "error: task 1 of the submission: spec.inference.input.task: 'ffff0000' is neither a task of this "
        "submission (metadata.name: nothing) nor a task id of yours; name one of them; nothing was stored"
    ]
    several = submitted("worse", {"task": "g3n!", "max_rows": 0})
    assert len(several) == 3 and several[0].startswith("error: invalid task: "), several
    assert sorted(line.split(":")[0] for line in several[1:]) == [
        "  - spec.inference.input.max_rows",
        "  - spec.inference.input.task",
    ]
