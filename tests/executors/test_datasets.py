"""Inference over a dataset: rows read a batch at a time from every source (local JSONL/CSV/Parquet, S3
through a local server, the Hugging Face cache, another task's result lines), columns mapped, per-row
sampling, bad rows, and one result line per row written in input order as batches finish."""

from __future__ import annotations

import csv
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

import mloc.spec
from mloc.errors import ExecutionError, SpecError
from mloc.executors.base import Event, RunContext
from mloc.executors.dataset_io import open_dataset
from mloc.spec.dataset import COUNTED_BYTES, DatasetInput
from tests.conftest import free_port
from tests.llm.builders import TINY_HIDDEN
from tests.support.s3server import s3_server
from tests.support.tiny_model import build_tiny_causal_lm

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "max": 2 + i % 3} for i in range(7)]
TASK_ID = "0123abcd-0000-4000-8000-000000000001"


def document(**inference: Any) -> mloc.spec.Document:
    spec: dict[str, Any] = {"taskType": "inference", "inference": inference}
    if "model" in inference:
        spec["model"] = inference.pop("model")
    body = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "t"}, "spec": spec}
    return mloc.spec.load(yaml.safe_dump(body))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def read_rows(source: dict[str, Any], results_dir: Path | None = None) -> list[Any]:
    spec = DatasetInput.model_validate(source)
    with open_dataset(spec, results_dir=results_dir or Path("/nonexistent")) as dataset:
        return [row.values if row.values is not None else row.problem for row in dataset.rows]


# --- readers --------------------------------------------------------------------------------------


def test_jsonl_csv_and_parquet_stream_the_same_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "n": str(i)} for i in range(2500)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    gz = tmp_path / "d.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    sources = [jsonl, gz, write_csv(tmp_path / "d.csv", rows), write_parquet(tmp_path / "d.parquet", rows, 700)]
    for path in sources:
        assert read_rows({"path": str(path)}) == rows, path
    # An explicit format reads a file whatever its name; max_rows stops early.
    renamed = tmp_path / "data.txt"
    renamed.write_bytes(jsonl.read_bytes())
    assert read_rows({"path": str(renamed), "format": "jsonl", "max_rows": 3}) == rows[:3]


def test_a_csv_reader_left_unfinished_is_dropped_quietly_after_its_file_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that stops early leaves the CSV reader suspended; the block closes the file, and when
    the reader is collected later, nothing is raised into the void."""
    raised: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: raised.append(unraisable.exc_value))
    path = write_csv(tmp_path / "d.csv", [{"prompt": f"p{i}"} for i in range(100)])
    with open_dataset(DatasetInput(path=str(path)), results_dir=tmp_path) as dataset:
        assert next(dataset.rows).values == {"prompt": "p0"}
    del dataset
    gc.collect()
    assert raised == []


def test_a_parquet_file_reports_its_row_count_and_reads_by_batches(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"prompt": str(i)} for i in range(5000)], row_group_size=5000)
    with open_dataset(DatasetInput(path=str(path), max_rows=4000), results_dir=tmp_path) as dataset:
        assert dataset.total == 4000
        first = next(dataset.rows)
        assert first.number == 0 and first.values == {"prompt": "0"}
        assert sum(1 for _ in dataset.rows) == 3999


def test_unreadable_lines_become_bad_rows_not_a_failed_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\nnot json\n[1, 2]\n{"prompt": "b"}\n')
    spec = DatasetInput(path=str(path))
    with open_dataset(spec, results_dir=tmp_path) as dataset:
        rows = list(dataset.rows)
    assert [row.number for row in rows] == [0, 1, 2, 3]
    assert [row.line for row in rows] == [1, 3, 4, 5]
    assert rows[1].problem is not None and "not valid JSON" in rows[1].problem
    assert rows[2].problem == "a JSON list, not an object"
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text("prompt,x\na,1\nb,2,3\n")
    assert read_rows({"path": str(bad_csv)}) == [
        {"prompt": "a", "x": "1"},
        "the number of cells differs from the header's 2",
    ]


def test_a_missing_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ExecutionError, match=r"dataset .*nope.jsonl does not exist"):
        read_rows({"path": str(tmp_path / "nope.jsonl")})


@pytest.mark.extra("s3")
def test_rows_are_read_from_an_s3_compatible_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    with s3_server() as endpoint:
        _read_from_s3(endpoint, tmp_path, monkeypatch, boto3)


def _read_from_s3(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boto3: Any) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # how a worker points s3:// at a non-AWS service
    }.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="data")
    rows = [{"prompt": f"p{i}", "id": i} for i in range(50)]
    s3.put_object(Bucket="data", Key="in/d.jsonl", Body=write_jsonl(tmp_path / "d.jsonl", rows).read_bytes())
    s3.put_object(Bucket="data", Key="in/d.parquet", Body=write_parquet(tmp_path / "d.parquet", rows).read_bytes())
    import fsspec

    fsspec.config.conf.clear()  # s3fs instances are cached; a fresh one reads the endpoint above
    assert read_rows({"path": "s3://data/in/d.jsonl"}) == rows
    assert read_rows({"path": "s3://data/in/d.parquet"}) == rows
    with pytest.raises(ExecutionError) as missing:
        read_rows({"path": "s3://data/in/missing.csv"})
    assert missing.value.message.startswith("dataset s3://data/in/missing.csv does not exist (as the worker sees it);")
    with pytest.raises(ExecutionError) as missing:
        read_rows({"path": "s3://nosuch/in/d.jsonl"})
    assert missing.value.message.startswith(
        "dataset s3://nosuch/in/d.jsonl does not exist (as the worker sees it: The specified bucket does not exist);"
    ), missing.value.message
    # A worker with no credentials is told which variables to set.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fsspec.config.conf.clear()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ExecutionError) as refused:
        read_rows({"path": "s3://data/in/d.jsonl"})
    assert refused.value.message == (
        "dataset s3://data/in/d.jsonl could not be read: the worker has no AWS credentials; set AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the worker's environment, and AWS_ENDPOINT_URL for an "
        "S3-compatible service"
    )
    # An endpoint nothing answers at: the worker is told which variable points s3:// elsewhere.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.config.conf.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ExecutionError) as unreachable:
        read_rows({"path": "s3://data/in/d.jsonl"})
    assert "could not be read: Could not connect to the endpoint URL" in unreachable.value.message
    assert unreachable.value.message.endswith(
        "for an S3-compatible service set AWS_ENDPOINT_URL to its address in the worker's environment "
        "(MLOC_ARTIFACT_STORE_OPTIONS applies to the artifact store alone)"
    )


@pytest.mark.extra("train")
def test_a_hugging_face_dataset_is_read_from_the_local_cache_only(tmp_path: Path) -> None:
    # Chosen layout: what `huggingface-cli download --repo-type dataset mloc/questions` leaves in HF_HOME
    # (the hub cache), here with a Parquet file written by datasets.Dataset.from_dict(...).to_parquet.
    repo = tmp_path / "hf" / "hub" / "datasets--mloc--questions"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        import datasets
        from mloc.errors import ExecutionError
        from mloc.executors.dataset_io import open_dataset
        from mloc.spec.dataset import COUNTED_BYTES, DatasetInput
        datasets.Dataset.from_dict({{"question": ["a", "b", "c"], "qid": [7, 8, 9]}}).to_parquet(
            "{data}/test-00000-of-00001.parquet")
        spec = DatasetInput.model_validate({{"huggingface": {{"name": "mloc/questions", "split": "test"}}}})
        with open_dataset(spec, results_dir=Path(".")) as dataset:
            rows, total = [row.values for row in dataset.rows], dataset.total
        try:
            with open_dataset(DatasetInput.model_validate({{"huggingface": {{"name": "mloc/absent"}}}}),
                              results_dir=Path(".")):
                pass
        except ExecutionError as exc:
            missing = exc.message
        print(json.dumps({{"rows": rows, "total": total, "missing": missing}}))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == [{"question": "a", "qid": 7}, {"question": "b", "qid": 8}, {"question": "c", "qid": 9}]
    assert report["total"] == 3
    assert "mloc/absent" in report["missing"] and "local cache only" in report["missing"]


def test_another_tasks_result_lines_are_read_from_the_results_dir(tmp_path: Path) -> None:
    folder = tmp_path / TASK_ID
    folder.mkdir()
    lines = [{"id": i, "output": f"out {i}", "error": None} for i in range(3)]
    write_jsonl(folder / "results.jsonl", lines)
    with open_dataset(DatasetInput(task=TASK_ID), results_dir=tmp_path) as dataset:
        assert (dataset.default_text_column, dataset.default_id_column) == ("output", "id")
        assert [row.values for row in dataset.rows] == lines
    with pytest.raises(ExecutionError, match="has no result lines this worker can read"):
        read_rows({"task": TASK_ID.replace("1", "2")}, tmp_path)


def test_the_spec_names_the_field_and_the_fix() -> None:
    cases: dict[str, dict[str, Any]] = {
        "exactly one source": {"input": {"path": "a.csv", "huggingface": {"name": "x"}}},
        "set inference.input.format": {"input": {"path": "a.txt"}},
        "not both": {"prompts": ["hi"], "input": {"path": "a.csv"}},
        "is not a task id": {"input": {"task": "yesterday"}},
        "keep one": {"input": {"path": "a.csv", "columns": {"prompt": "q", "messages": "m"}}},
        "columns.n: unknown field": {"input": {"path": "a.csv", "columns": {"n": "samples"}}},
    }
    for expected, inference in cases.items():
        with pytest.raises(SpecError, match=expected):
            document(**inference)
    for bad, expected in (({"skip_rows": -1}, "skip_rows"), ({"chunk_rows": 0}, "chunk_rows")):
        with pytest.raises(SpecError, match=expected):
            document(input={"path": "a.csv", **bad})
    # With a dataset, replicas is how many chunks run at once.
    body = {"taskType": "inference", "resources": {"replicas": 2}, "inference": {"input": {"path": "a.csv"}}}
    loaded = mloc.spec.load(yaml.safe_dump({"apiVersion": "mloc/v1", "kind": "InferenceTask", "spec": body}))
    assert loaded.spec.resources.replicas == 2
    parsed = document(input={"path": "s3://b/k.parquet", "columns": {"prompt": "q", "temperature": "t"}})
    assert parsed.spec.inference.input.columns.sampling() == {"temperature": "t"}  # type: ignore[attr-defined]


# --- the executor over a dataset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", hidden_size=TINY_HIDDEN)


@pytest.fixture(scope="module")
def executor() -> Any:
    from mloc.executors.inference import InferenceExecutor

    instance = InferenceExecutor()
    yield instance
    instance.close()


def run(executor: Any, doc: mloc.spec.Document, results_dir: Path) -> tuple[dict[str, Any], list[Event], Path]:
    events: list[Event] = []
    out_dir = results_dir / "task-1"
    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=doc,
        out_dir=out_dir,
        models_dir=results_dir / "models",
        worker_id="w1",
        emit=events.append,
    )
    return executor.run(ctx), events, out_dir / "results.jsonl"


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def model(path: Path) -> dict[str, Any]:
    return {"source": {"type": "local", "identifier": str(path)}, "engine": "transformers"}


@pytest.mark.extra("inference")
def test_each_row_gets_one_line_in_input_order_from_every_format(
    executor: Any, tiny_model: Path, tmp_path: Path
) -> None:
    sources = [
        write_jsonl(tmp_path / "d.jsonl", ROWS),
        write_csv(tmp_path / "d.csv", ROWS),
        write_parquet(tmp_path / "d.parquet", ROWS),
    ]
    outputs = []
    for path in sources:
        doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=4, temperature=0, batch_size=3)
        result, events, results = run(executor, doc, tmp_path / path.suffix[1:])
        lines = lines_of(results)
        assert [line["id"] for line in lines] == list(range(len(ROWS)))
        for line in lines:
            assert set(line) == {"id", "output", "finish_reason", "prompt_tokens", "completion_tokens", "error"}
            assert line["error"] is None and isinstance(line["output"], str) and line["prompt_tokens"] > 0
            assert line["finish_reason"] == "length" and line["completion_tokens"] == 4
        outputs.append([line["output"] for line in lines])
        assert result["rows"] == result["succeeded"] == len(ROWS) and result["failed"] == 0
        assert result["results_file"] == "results.jsonl" and "items" not in result
        assert result["usage"]["completion_tokens"] == 4 * len(ROWS)
        assert result["usage"]["prompt_tokens"] == sum(line["prompt_tokens"] for line in lines)
        progress = [event for event in events if event["ev"] == "progress"]
        assert progress[-1]["step"] == progress[-1]["total"] == len(ROWS)
        assert progress[-1]["message"] == f"{len(ROWS)} of {len(ROWS)} rows"
    # Greedy decoding: the same rows give the same outputs whatever the file format.
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.extra("inference")
def test_columns_map_prompt_id_and_per_row_sampling(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"question": row["prompt"], "qid": f"q-{i}", "budget": row["max"]} for i, row in enumerate(ROWS)
    ]
    rows[2]["budget"] = None  # no override: the task's max_tokens
    path = write_parquet(tmp_path / "d.parquet", rows)
    inputs = {"path": str(path), "columns": {"prompt": "question", "id": "qid", "max_tokens": "budget"}}
    doc = document(model=model(tiny_model), input=inputs, max_tokens=6, temperature=0)
    result, logged, results = run(executor, doc, tmp_path)
    lines = lines_of(results)
    assert [line["id"] for line in lines] == [f"q-{i}" for i in range(len(ROWS))]
    expected = [row["budget"] or 6 for row in rows]
    assert [line["completion_tokens"] for line in lines] == expected
    assert result["usage"]["completion_tokens"] == sum(expected)
    hint = "the rows have an 'id' column, which the result lines do not use"
    assert not any(hint in str(e.get("message")) for e in logged if e["ev"] == "log")

    # An 'id' column left unnamed is not taken for the id (rows are numbered), and the log says how to use it.
    path = write_jsonl(
        tmp_path / "ids.jsonl", [{"id": f"q-{i}", "prompt": row["prompt"]} for i, row in enumerate(ROWS)]
    )
    result, events, results = run(
        executor, document(model=model(tiny_model), input={"path": str(path)}), path.parent / "ids"
    )
    assert [line["id"] for line in lines_of(results)] == list(range(len(ROWS)))
    said = [e for e in events if e["ev"] == "log" and hint in e["message"]]
    assert len(said) == 1 and said[0]["level"] == "WARNING", said
    assert said[0]["message"].endswith("set inference.input.columns.id: id")


@pytest.mark.extra("inference")
@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.extra("vllm"))])
@pytest.mark.usefixtures("small_vllm_kv_cache")
def test_rows_with_their_own_max_tokens_share_a_batch_and_each_stops_at_its_own(
    engine: str, tiny_model: Path, tmp_path: Path
) -> None:
    from mloc.executors.inference import InferenceExecutor

    budgets = [5, 1, 8, 3, 8, 2, 6]
    rows = [{"prompt": row["prompt"], "budget": budget} for row, budget in zip(ROWS, budgets, strict=True)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    section = model(tiny_model) | {"engine": engine}
    if engine == "vllm":
        section["vllm"] = {"max_model_len": 256, "enforce_eager": True}
    inputs = {"path": str(path), "columns": {"max_tokens": "budget"}}
    executor = InferenceExecutor()
    try:
        # One batch holds every row, so the engine gets them in one call, each with its own limit.
        doc = document(model=section, input=inputs, max_tokens=30, temperature=0, batch_size=len(ROWS))
        result, _, results = run(executor, doc, tmp_path / "own")
        # The same rows with one limit for all, the longest: greedy, so each row's own output is its prefix.
        same = document(model=section, input={"path": str(path)}, max_tokens=max(budgets), temperature=0)
        _, _, reference = run(executor, same, tmp_path / "same")
    finally:
        executor.close()
    assert result["engine"] == engine
    lines, longest = lines_of(results), lines_of(reference)
    assert [line["completion_tokens"] for line in lines] == budgets
    assert [line["finish_reason"] for line in lines] == ["length"] * len(ROWS)
    assert [line["completion_tokens"] for line in longest] == [max(budgets)] * len(ROWS)
    for line, full in zip(lines, longest, strict=True):
        assert full["output"].startswith(line["output"]), (line, full)
    assert [line["output"] for line in lines if line["completion_tokens"] == max(budgets)] == [
        full["output"] for full, budget in zip(longest, budgets, strict=True) if budget == max(budgets)
    ]
    assert result["usage"]["completion_tokens"] == sum(budgets)


@pytest.mark.extra("inference")
def test_chat_rows_and_several_samples(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hello there"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}, {"messages": json.dumps(chat)}])
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=3, temperature=0.8, n=2, seed=1)
    result, _, results = run(executor, doc, tmp_path)
    lines = lines_of(results)
    assert [line["error"] for line in lines] == [None, None]
    for line in lines:
        assert isinstance(line["output"], list) and len(line["output"]) == 2 and len(line["finish_reason"]) == 2
    assert result["succeeded"] == 2


@pytest.mark.extra("inference")
def test_bad_rows_get_error_lines_up_to_max_row_errors(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    rows: list[Any] = [
        {"prompt": "fine"},
        {"text": "no prompt column"},
        {"prompt": 42},
        {"prompt": "bad budget", "budget": "many"},
        {"prompt": "also fine"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{broken\n")
    inputs = {"path": str(path), "columns": {"max_tokens": "budget"}, "max_row_errors": 4}
    result, _, results = run(executor, document(model=model(tiny_model), input=inputs, max_tokens=2), tmp_path / "a")
    lines = lines_of(results)
    assert [line["id"] for line in lines] == [0, 1, 2, 3, 4, 5]
    errors = [line["error"] for line in lines]
    assert errors[0] is None and errors[4] is None
    assert errors[1] is not None and "no column 'prompt'" in errors[1] and "columns.prompt" in errors[1]
    assert errors[2] == "prompt column 'prompt' is a int, not text"
    assert errors[3] is not None and errors[3].startswith("column 'budget' (max_tokens) is 'many'")
    assert errors[5] is not None and "not valid JSON" in errors[5]
    assert lines[1]["output"] is None and lines[1]["completion_tokens"] == 0
    assert (result["rows"], result["succeeded"], result["failed"]) == (6, 2, 4)

    # One bad row more than allowed fails the task, naming the row and its line.
    inputs["max_row_errors"] = 3
    with pytest.raises(
        ExecutionError, match=r"row 5 \(line 6\): not valid JSON.*beyond inference.input.max_row_errors"
    ):
        run(executor, document(model=model(tiny_model), input=inputs, max_tokens=2), tmp_path / "b")
    # The default (0): the first bad row fails it.
    with pytest.raises(ExecutionError, match=r"row 1 \(line 2\): no column 'prompt'.*max_row_errors is 0"):
        run(executor, document(model=model(tiny_model), input={"path": str(path)}, max_tokens=2), tmp_path / "c")


@pytest.mark.extra("inference")
def test_a_prompt_beyond_the_context_is_a_bad_row(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    long_prompt = "word " * (config["max_position_embeddings"] + 10)
    limit = config["max_position_embeddings"]
    rows = [{"prompt": "short"}, {"prompt": long_prompt}, {"prompt": "short", "budget": limit + 5}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    inputs = {"path": str(path), "max_row_errors": 2, "columns": {"max_tokens": "budget"}}
    result, _, results = run(executor, document(model=model(tiny_model), input=inputs, max_tokens=2), tmp_path)
    lines = lines_of(results)
    assert lines[0]["error"] is None
    assert (
        "beyond the model's context" in lines[1]["error"]
        and "shorten the prompt, or lower max_tokens" in lines[1]["error"]
    )
    # The row's own max_tokens is named by its column, with the fix.
    assert lines[2]["error"] == (
        f"column 'budget' (max_tokens) is {limit + 5}: not below the model's context of {limit} tokens; "
        f"set it below {limit}"
    )
    assert result["failed"] == 2


@pytest.mark.extra("inference")
def test_a_dataset_task_reads_another_tasks_result_lines(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    first = document(model=model(tiny_model), input={"path": str(tmp_path / "d.jsonl")}, max_tokens=3)
    run(executor, first, tmp_path)
    (tmp_path / "task-1").rename(tmp_path / TASK_ID)
    # Its lines keep the first task's ids; a row whose output was empty (noise from a tiny model) is a bad row.
    second = document(model=model(tiny_model), input={"task": TASK_ID, "max_row_errors": 3}, max_tokens=2)
    result, _, results = run(executor, second, tmp_path)
    assert [line["id"] for line in lines_of(results)] == [0, 1, 2]
    assert result["succeeded"] + result["failed"] == 3 and TASK_ID in result["input"]


@pytest.mark.extra("inference")
def test_a_cancelled_dataset_task_stops_between_batches(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    from mloc.errors import TaskCancelled

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=2, batch_size=2)
    out_dir = tmp_path / "task-1"

    def cancel_once_the_engine_is_up(event: dict[str, Any]) -> None:
        # A cancel asked for earlier stops the model's loading instead (see tests/llm/test_preparation_reports.py).
        said = str(event.get("message") or "")
        if event["ev"] == "log" and (" ready in " in said or said.startswith("reusing warm")):
            ctx.cancel_event.set()

    ctx = RunContext("task-1", 1, "alice", doc, out_dir, tmp_path / "models", "w1", emit=cancel_once_the_engine_is_up)
    with pytest.raises(TaskCancelled):
        executor.run(ctx)
    assert (out_dir / "results.jsonl").read_text() == ""


@pytest.mark.extra("inference")
def test_a_cancel_inside_a_batch_writes_none_of_it_and_stops_without_an_error(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mloc.errors import TaskCancelled
    from mloc.executors.inference import InferenceExecutor
    from mloc.llm.hf_engine import TransformersEngine

    # Rows of three max_tokens budgets: the engine makes a call per budget, and the cancel comes in the
    # first of them, so the engine answers only the rows that call finished.
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    inputs = {"path": str(path), "columns": {"max_tokens": "max"}}
    doc = document(model=model(tiny_model), input=inputs, batch_size=8)
    out_dir = tmp_path / "task-1"
    events: list[Event] = []
    ctx = RunContext("task-1", 1, "alice", doc, out_dir, tmp_path / "models", "w1", emit=events.append)
    generate_group = TransformersEngine._generate

    def cancelled_while_generating(self: Any, *args: Any) -> Any:
        ctx.cancel_event.set()
        return generate_group(self, *args)

    monkeypatch.setattr(TransformersEngine, "_generate", cancelled_while_generating)
    executor = InferenceExecutor()
    try:
        with pytest.raises(TaskCancelled):
            executor.run(ctx)
    finally:
        executor.close()
    assert (out_dir / "results.jsonl").read_text() == ""
    assert not [event for event in events if event.get("level") == "ERROR"], events


def fake_outputs(results: Path, *, error_at: int | None = None, keep: int | None = None) -> bytes:
    """An earlier run's lines with outputs no model writes (so a kept line is told from a generated one),
    the first ``keep`` of them, one turned into an error line; the bytes written."""
    lines = lines_of(results)[:keep]
    for index, line in enumerate(lines):
        line["output"] = f"kept {index}"
        if index == error_at:
            line.update(output=None, error="prompt column 'prompt' is empty")
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    results.write_bytes(data)
    return data


def said(events: list[Event]) -> list[str]:
    return [str(event.get("message")) for event in events if event["ev"] == "log"]


@pytest.mark.extra("inference")
def test_an_earlier_runs_finished_lines_are_kept_and_only_the_rest_generated(
    executor: Any, tiny_model: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=3, temperature=0, batch_size=2)
    _, _, results = run(executor, doc, tmp_path / "a")
    # What a lost worker left: four whole lines (the third an error line) and a batch cut short.
    fake_outputs(results, error_at=2, keep=4)
    with results.open("a") as handle:
        handle.write('{"id": 4, "output": "cut')

    result, events, _ = run(executor, doc, tmp_path / "a")
    lines = lines_of(results)
    assert [line["id"] for line in lines] == list(range(len(ROWS)))
    assert [line["output"] for line in lines[:2]] == ["kept 0", "kept 1"]
    # From the error line on (its row may have been fixed) every row ran again, "kept 3" too.
    assert all(isinstance(line["output"], str) and not line["output"].startswith("kept") for line in lines[2:])
    assert all(line["error"] is None for line in lines)
    assert (result["rows"], result["kept_rows"], result["succeeded"], result["failed"]) == (7, 2, 7, 0)
    # The task's totals cover every line. The lost worker never recorded the usage of the lines it
    # wrote (no count of them beside the lines), so this run reports the kept ones too: each line once.
    assert result["usage"]["prompt_tokens"] == sum(line["prompt_tokens"] for line in lines)
    reported = [event["counters"] for event in events if event["ev"] == "usage"]
    assert sum(c["prompt_tokens"] for c in reported) == sum(line["prompt_tokens"] for line in lines)
    assert sum(c["completion_tokens"] for c in reported) == sum(line["completion_tokens"] for line in lines)
    assert "2 rows kept from an earlier run, not generated again" in said(events)
    assert "2 of them came from a run whose worker was lost before it recorded their usage: counted now" in said(events)


@pytest.mark.extra("inference")
def test_kept_lines_a_recorded_run_counted_are_not_counted_again(
    executor: Any, tiny_model: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=3, temperature=0, batch_size=2)
    _, _, results = run(executor, doc, tmp_path / "a")
    written = fake_outputs(results, keep=5)
    # As the worker writes it once it recorded a run: that run counted the first three lines; the
    # lines after them come from a later run, whose worker was lost.
    counted = sum(len(line) for line in written.splitlines(keepends=True)[:3])
    (results.parent / COUNTED_BYTES).write_text(str(counted))

    result, events, _ = run(executor, doc, tmp_path / "a")
    lines = lines_of(results)
    assert result["kept_rows"] == 5 and [line["output"] for line in lines[:5]] == [f"kept {i}" for i in range(5)]
    reported = [event["counters"] for event in events if event["ev"] == "usage"]
    assert sum(c["prompt_tokens"] for c in reported) == sum(line["prompt_tokens"] for line in lines[3:])
    assert sum(c["completion_tokens"] for c in reported) == sum(line["completion_tokens"] for line in lines[3:])
    assert "2 of them came from a run whose worker was lost before it recorded their usage: counted now" in said(events)


@pytest.mark.extra("inference")
def test_earlier_lines_stop_being_kept_where_the_data_changed(executor: Any, tiny_model: Path, tmp_path: Path) -> None:
    # No id column: each row is told by its content and place, not by an id that would still match.
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=2, temperature=0, batch_size=3)
    _, _, results = run(executor, doc, tmp_path / "a")
    fake_outputs(results)
    changed = list(ROWS)
    changed[2] = {"prompt": "Question: what is the capital of France?\nAnswer:"}
    write_jsonl(path, changed)

    result, events, _ = run(executor, doc, tmp_path / "a")
    lines = lines_of(results)
    assert [line["id"] for line in lines] == list(range(len(ROWS)))
    assert [line["output"] for line in lines[:2]] == ["kept 0", "kept 1"]
    assert not any(str(line["output"]).startswith("kept") for line in lines[2:])
    assert result["kept_rows"] == 2
    assert (
        "row 2 (line 3) is not the row the earlier run answered: the data changed, so rows from here on are "
        "generated again"
    ) in said(events)


@pytest.mark.extra("inference")
def test_a_run_that_stops_before_it_reached_the_earlier_lines_leaves_them_for_the_next(
    executor: Any, tiny_model: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    doc = document(model=model(tiny_model), input={"path": str(path)}, max_tokens=2, temperature=0, batch_size=2)
    _, _, results = run(executor, doc, tmp_path / "a")
    written = fake_outputs(results)
    (results.parent / COUNTED_BYTES).write_text(str(len(written)))  # its worker recorded it: all counted
    path.rename(tmp_path / "moved.jsonl")  # the next run cannot read its data: it fails before any row
    with pytest.raises(ExecutionError):
        run(executor, doc, tmp_path / "a")
    assert results.read_bytes() == written
    (tmp_path / "moved.jsonl").rename(path)

    result, events, _ = run(executor, doc, tmp_path / "a")
    assert [line["output"] for line in lines_of(results)] == [f"kept {i}" for i in range(len(ROWS))]
    assert result["kept_rows"] == len(ROWS) and result["usage"]["tokens_per_sec"] == 0
    assert not any(event["ev"] == "usage" for event in events)  # nothing ran, so nothing is counted again

    # The data got shorter: the lines past its last row are no result of this run.
    write_jsonl(path, ROWS[:4])
    result, _, _ = run(executor, doc, tmp_path / "a")
    assert [line["output"] for line in lines_of(results)] == [f"kept {i}" for i in range(4)]
    assert (result["rows"], result["kept_rows"]) == (4, 4)


@pytest.mark.extra("inference")
def test_a_missing_dataset_fails_the_task_before_its_model_is_loaded(executor: Any, tmp_path: Path) -> None:
    # The model named cannot load either: the dataset's error comes first, without the minutes a load takes.
    doc = document(model=model(tmp_path / "no-model"), input={"path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ExecutionError) as missing:
        run(executor, doc, tmp_path)
    assert missing.value.message.startswith(f"dataset {tmp_path / 'nope.jsonl'} does not exist"), missing.value
