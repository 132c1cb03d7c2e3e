"""A dataset inference task end to end on a real local cluster: submitted over HTTP, its result lines
paged through GET /api/v1/tasks/{id}/results, the Python client and `mloc results`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.api.results import page
from mloc.client import ApiError, Client
from mloc.localcluster import LocalCluster

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}


def test_a_page_is_whole_lines_and_leaves_a_line_still_being_written() -> None:
    data = b"".join(b'{"id": %d}\n' % i for i in range(10)) + b'{"id": 10, "outp'
    assert b"".join(page(io.BytesIO(data), 0, None)).count(b"\n") == 10
    assert [json.loads(line)["id"] for line in b"".join(page(io.BytesIO(data), 3, 4)).splitlines()] == [3, 4, 5, 6]
    assert b"".join(page(io.BytesIO(data), 12, 5)) == b""


@pytest.mark.extra("inference")
def test_a_dataset_task_is_paged_over_http_the_client_and_the_cli(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    rows = [{"qid": f"q{i:02d}", "question": f"Question: what is {i} plus one?\nAnswer:"} for i in range(25)]
    rows[7] = {"qid": "q07", "question": ""}  # a bad row: an empty prompt
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cluster = make_cluster(1)
    client = client_for(cluster)
    task: dict[str, Any] = {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": "dataset"},
        "spec": {
            "taskType": "inference",
            "model": TINY,
            "inference": {
                "max_tokens": 3,
                "temperature": 0,
                "batch_size": 4,
                "input": {
                    "path": str(data),
                    "columns": {"prompt": "question", "id": "qid"},
                    "max_row_errors": 1,
                },
            },
        },
    }
    task_id = client.submit(task)["task_id"]
    record = client.wait(task_id, timeout=300)
    assert record["state"] == "succeeded", record

    summary = client.result(task_id)
    assert (summary["rows"], summary["succeeded"], summary["failed"]) == (25, 24, 1)
    assert summary["results_file"] == "results.jsonl" and summary["usage"]["completion_tokens"] == 24 * 3

    answer = client.http.get(f"/api/v1/tasks/{task_id}/results")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [line["id"] for line in lines] == [row["qid"] for row in rows]
    assert lines[7]["error"] == "prompt column 'question' is empty" and lines[7]["output"] is None
    assert all(line["error"] is None and line["completion_tokens"] == 3 for i, line in enumerate(lines) if i != 7)

    paged = client.http.get(f"/api/v1/tasks/{task_id}/results", params={"offset": 10, "limit": 5})
    assert [json.loads(line)["id"] for line in paged.text.splitlines()] == ["q10", "q11", "q12", "q13", "q14"]
    assert [line["id"] for line in client.result_lines(task_id[:8], offset=23)] == ["q23", "q24"]
    assert list(client.result_lines(task_id, offset=25)) == []

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOC_")}
    env["MLOC_API_URL"] = cluster.api_url

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mloc.cli", "results", task_id, *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    shown = cli("--offset", "6", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    assert "--- q06 (length, " in shown.stdout and "--- q07 (error)" in shown.stdout
    assert "prompt column 'question' is empty" in shown.stdout and "--offset 8" in shown.stderr
    as_json = cli("--json", "--limit", "3")
    assert [json.loads(line)["id"] for line in as_json.stdout.splitlines()] == ["q00", "q01", "q02"]

    # An inline task has no lines; the answer says where its result is.
    inline = client.submit({**task, "spec": {**task["spec"], "inference": {"prompts": ["hi"], "max_tokens": 2}}})
    assert client.wait(inline["task_id"], timeout=120)["state"] == "succeeded"
    with pytest.raises(ApiError) as caught:
        list(client.result_lines(inline["task_id"]))
    assert caught.value.status_code == 409 and "GET /api/v1/tasks/" in caught.value.message
    failing = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "results", inline["task_id"]], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert failing.returncode != 0 and "only inference tasks that read a dataset" in failing.stderr
