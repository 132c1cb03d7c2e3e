"""A row's own sampling values out of the engines' range: the row fails alone with its error line while
the rows that share its batch (and its engine call) are answered, for a dataset and for an OpenAI batch,
whose bad request lands in the error file."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import mloc.spec
from mloc.api.openai_batch import COMPLETION_DEFAULTS
from mloc.executors.base import RunContext
from mloc.executors.inference import InferenceExecutor
from mloc.openai_lines import COMPLETIONS, SAMPLING, BatchOutput, convert, output_blocks
from tests.llm.builders import TINY_HIDDEN
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("inference")

PROMPTS = [f"Question {i}: what is {i} plus {i}?\nAnswer:" for i in range(4)]
TOO_HOT = (
    "temperature must be in [0, 2], got 5; use 0 for greedy output and at most 2 for the most varied "
    "(vLLM and OpenAI take no more)"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", hidden_size=TINY_HIDDEN)


def model(path: Path, engine: str) -> dict[str, Any]:
    section: dict[str, Any] = {"source": {"type": "local", "identifier": str(path)}, "engine": engine}
    if engine == "vllm":
        section["vllm"] = {"max_model_len": 256, "enforce_eager": True}
    return section


def run(section: dict[str, Any], inference: dict[str, Any], results_dir: Path) -> tuple[dict[str, Any], Path]:
    spec = {"taskType": "inference", "model": section, "inference": inference}
    body = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "t"}, "spec": spec}
    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=mloc.spec.load(yaml.safe_dump(body)),
        out_dir=results_dir / "task-1",
        models_dir=results_dir / "models",
        worker_id="w1",
        emit=lambda event: None,
    )
    executor = InferenceExecutor()
    try:
        return executor.run(ctx), results_dir / "task-1" / "results.jsonl"
    finally:
        executor.close()


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def test_a_row_with_a_temperature_out_of_range_fails_alone(tiny_model: Path, tmp_path: Path) -> None:
    temperatures: list[Any] = [0, 5, None, 0.5]
    rows = [{"prompt": p, "t": t} for p, t in zip(PROMPTS, temperatures, strict=True)]
    inputs = {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "columns": {"temperature": "t"}}
    # One batch: the bad row and the good ones would share one engine call.
    inference = {"input": inputs | {"max_row_errors": 1}, "max_tokens": 2, "temperature": 0, "batch_size": 4}
    result, results = run(model(tiny_model, "transformers"), inference, tmp_path)
    lines = lines_of(results)
    assert [line["error"] for line in lines] == [None, f"column 't' (temperature) is 5: {TOO_HOT}", None, None]
    assert [line["completion_tokens"] for line in lines] == [2, 0, 2, 2]
    assert (result["rows"], result["succeeded"], result["failed"]) == (4, 3, 1)


def test_a_greedy_row_of_a_task_that_asks_for_several_samples_fails_alone(tiny_model: Path, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"prompt": PROMPTS[0], "t": 0}, {"prompt": PROMPTS[1]}]
    inputs = {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "columns": {"temperature": "t"}}
    inference = {"input": inputs | {"max_row_errors": 1}, "max_tokens": 2, "temperature": 0.8, "n": 2, "seed": 1}
    result, results = run(model(tiny_model, "transformers"), inference, tmp_path)
    first, second = lines_of(results)
    assert first["error"] == (
        "column 't' (temperature) is 0: n is 2 with temperature 0, and greedy decoding gives one completion; set "
        "temperature above 0 (e.g. 0.7) for several different completions, or n to 1"
    )
    assert second["error"] is None and len(second["output"]) == 2
    assert (result["succeeded"], result["failed"]) == (1, 1)


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.extra("vllm"))])
@pytest.mark.usefixtures("small_vllm_kv_cache")
def test_a_batch_request_with_temperature_5_lands_in_the_error_file_and_the_others_are_answered(
    engine: str, tiny_model: Path, tmp_path: Path
) -> None:
    bodies: list[dict[str, Any]] = [{"model": "tiny", "prompt": prompt, "max_tokens": 2} for prompt in PROMPTS]
    bodies[2]["temperature"] = 5
    requests = [{"custom_id": f"r{i}", "method": "POST", "url": COMPLETIONS, "body": b} for i, b in enumerate(bodies)]
    rows = io.BytesIO()
    converted = convert(
        io.BytesIO(b"".join(orjson.dumps(line) + b"\n" for line in requests)), rows, endpoint=COMPLETIONS
    )
    (tmp_path / "rows.jsonl").write_bytes(rows.getvalue())
    # The task a batch over /v1/completions runs: the request fields are the row's columns.
    columns = {"id": "id", "prompt": "prompt", **{name: name for name in SAMPLING}}
    source = {"path": str(tmp_path / "rows.jsonl"), "format": "jsonl", "columns": columns}
    inference = {**COMPLETION_DEFAULTS, "input": source | {"max_row_errors": converted.requests}}
    result, results = run(model(tiny_model, engine), inference, tmp_path)
    assert (result["engine"], result["succeeded"], result["failed"]) == (engine, 3, 1)

    batch = BatchOutput(key="k", endpoint=COMPLETIONS, model="tiny", created=100)
    data = results.read_bytes()
    output = [json.loads(x) for x in b"".join(output_blocks(io.BytesIO(data), batch, errors=False)).splitlines()]
    errors = [json.loads(x) for x in b"".join(output_blocks(io.BytesIO(data), batch, errors=True)).splitlines()]
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r3"]
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert [line["custom_id"] for line in errors] == ["r2"]
    assert errors[0]["response"]["status_code"] == 400
    error = errors[0]["response"]["body"]["error"]
    assert (error["message"], error["param"]) == (f"body.temperature is 5: {TOO_HOT}", "body.temperature")
