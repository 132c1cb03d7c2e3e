"""The whole system on one file: templates/pipeline_gemma3_270m.yaml (SFT of a LoRA adapter on the bundled
Gemma 3 270M, an eval of the base model and one of the adapter, then batch inference with the adapter over
a file of questions) submitted with `mloc submit`, run by a real orchestrator and worker on this machine's
CPUs, each step starting once the steps it names have succeeded and the adapter handed along by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.llm.builders import persistent_models_dir

pytestmark = pytest.mark.extra("train", "inference", "eval")

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "templates" / "pipeline_gemma3_270m.yaml"
CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid"}


def test_sft_then_eval_base_and_adapter_then_batch_inference_from_one_file(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "capitals-eval.jsonl").write_text(
        "".join(
            json.dumps({"question": f"What is the capital of {c}?", "target": t}) + "\n" for c, t in CAPITALS.items()
        )
    )
    (data / "capitals-questions.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": f"Question: What is the capital of {c}?\nAnswer:"}) + "\n"
            for i, c in enumerate(CAPITALS)
        )
    )
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(TEMPLATE.read_text().replace("~/.mloc/data/", f"{data}/"))
    cluster = make_cluster(1, env={"MLOC_MODELS_DIR": str(persistent_models_dir())})
    client = client_for(cluster)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOC_")}
    env["MLOC_API_URL"] = cluster.api_url
    submitted = subprocess.run(
        [sys.executable, "-m", "mloc.cli", "submit", "--json", str(pipeline)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    tasks = json.loads(submitted.stdout)["tasks"]
    ids = {task["name"]: task["task_id"] for task in tasks}
    assert list(ids) == ["tune", "eval-base", "eval-adapter", "answer"]
    pipeline_id = tasks[0]["pipeline_id"]

    deadline = time.monotonic() + 1800
    while (graph := client.pipeline(pipeline_id))["state"] == "running":
        assert time.monotonic() < deadline, graph
        time.sleep(2)
    records = {name: client.task(task_id) for name, task_id in ids.items()}
    assert {name: r["state"] for name, r in records.items()} == dict.fromkeys(ids, "succeeded"), {
        name: r.get("reason") for name, r in records.items()
    }
    # Each step started after what it waits for; the adapter is the SFT task's, by id.
    assert records["eval-adapter"]["started_at"] >= records["tune"]["finished_at"]
    assert records["answer"]["started_at"] >= records["eval-adapter"]["finished_at"]
    for name in ("eval-adapter", "answer"):
        assert records[name]["spec"]["spec"]["model"]["adapter"]["path"] == ids["tune"]

    compared = client.compare_evals(ids["eval-base"], ids["eval-adapter"])
    assert len(compared["runs"]) == 2 and compared["rows"]
    answer = client.result(ids["answer"])
    assert answer["rows"] == len(CAPITALS) and answer["failed"] == 0
    lines = list(client.result_lines(ids["answer"]))
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(len(CAPITALS))]
    assert all(line["completion_tokens"] > 0 for line in lines)
