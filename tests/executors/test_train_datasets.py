"""Training data from every source a task can name, in every format, read into checked records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mloc.errors import ExecutionError
from mloc.executors.train.datasets import load_data
from mloc.spec.train import DatasetFormat, DatasetSpec

pytestmark = pytest.mark.extra("train")

ROOT = Path(__file__).resolve().parents[2]
SFT = (DatasetFormat.PROMPT_COMPLETION, DatasetFormat.MESSAGES, DatasetFormat.TEXT)
ROWS = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(10)]


def test_jsonl_csv_and_parquet_give_the_same_records(tmp_path: Path) -> None:
    import pandas as pd

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + "\n")  # a trailing blank line is fine
    csv = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    for path in (jsonl, csv, parquet):
        data = load_data(DatasetSpec(path=str(path)), SFT, seed=0)
        assert data.format == DatasetFormat.PROMPT_COMPLETION and data.train == ROWS, path


def test_eval_ratio_holds_out_a_reproducible_share() -> None:
    spec = DatasetSpec(examples=ROWS, eval_ratio=0.2, max_samples=10)
    first, second = load_data(spec, SFT, seed=3), load_data(spec, SFT, seed=3)
    assert first.eval is not None and len(first.eval) == 2 and len(first.train) == 8
    assert first.eval == second.eval
    assert sorted(row["prompt"] for row in first.train + first.eval) == sorted(row["prompt"] for row in ROWS)


def test_formats_are_detected_and_alpaca_rows_become_prompt_completion() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert load_data(DatasetSpec(examples=[chat]), SFT, seed=0).format == DatasetFormat.MESSAGES
    assert load_data(DatasetSpec(examples=[{"text": "plain"}]), SFT, seed=0).format == DatasetFormat.TEXT
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    [row] = load_data(DatasetSpec(examples=[alpaca]), SFT, seed=0).train
    assert row == {"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}
    # Prompt-only task types (GRPO, PPO) use the prompts of richer data and keep the other columns.
    [prompt_row] = load_data(DatasetSpec(examples=ROWS[:1]), (DatasetFormat.PROMPT,), seed=0).train
    assert prompt_row == ROWS[0]


def test_a_format_the_task_type_cannot_use_is_refused() -> None:
    with pytest.raises(ExecutionError, match="the prompt_completion format does not fit this task type"):
        load_data(DatasetSpec(examples=ROWS), (DatasetFormat.PREFERENCE,), seed=0)


def test_a_bad_message_list_is_named_with_its_index() -> None:
    bad = {"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}
    with pytest.raises(ExecutionError, match=r"dataset.examples\[1\]: messages\[1\] must be an object"):
        load_data(DatasetSpec(examples=[{"messages": [{"role": "user", "content": "ok"}]}, bad]), SFT, seed=0)


def test_a_hub_dataset_is_read_from_the_local_cache_only(tmp_path: Path) -> None:
    # The layout `huggingface-cli download --repo-type dataset mloc/tiny-qa` leaves in HF_HOME.
    repo = tmp_path / "hf" / "hub" / "datasets--mloc--tiny-qa"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:3]))
    script = textwrap.dedent(
        """
        import json
        from mloc.errors import ExecutionError
        from mloc.executors.train.datasets import load_data
        from mloc.spec.train import DatasetFormat, DatasetSpec
        found = load_data(DatasetSpec(identifier="mloc/tiny-qa"), (DatasetFormat.PROMPT_COMPLETION,), seed=0)
        try:
            load_data(DatasetSpec(identifier="mloc/not-cached"), (DatasetFormat.PROMPT_COMPLETION,), seed=0)
        except ExecutionError as exc:
            missing = exc.message
        print(json.dumps({"rows": found.train, "missing": missing}))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == ROWS[:3]
    assert "mloc/not-cached" in report["missing"] and "local cache only" in report["missing"]


def test_a_files_own_column_names_are_mapped_to_those_the_formats_read(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "id": i}) + "\n" for i in range(3)))
    # Unmapped, it cannot be read, and the error says how to name the columns.
    with pytest.raises(ExecutionError) as unread:
        load_data(DatasetSpec(path=str(path)), SFT, seed=0)
    assert "name the columns the formats read with dataset.columns (e.g. {prompt: question, completion: answer})" in (
        unread.value.message
    )
    with pytest.raises(ExecutionError) as missing:
        load_data(DatasetSpec(path=str(path), format=DatasetFormat.PROMPT_COMPLETION), SFT, seed=0)
    assert "map the data's columns to them with dataset.columns (e.g. {prompt: <column>})" in missing.value.message
    # Mapped, the rows read as prompt/completion, other columns kept.
    spec = DatasetSpec.model_validate({"path": str(path), "columns": {"prompt": "question", "completion": "answer"}})
    data = load_data(spec, SFT, seed=0)
    assert data.format == DatasetFormat.PROMPT_COMPLETION
    assert data.train == [{"id": i, "prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]


@pytest.mark.parametrize(
    ("columns", "said"),
    [
        ({"question": "q"}, "dataset.columns names 'question', which no format reads"),
        ({"prompt": "q", "completion": "q"}, "maps each name to a column of its own"),
    ],
)
def test_a_column_mapping_written_wrong_is_refused_at_submit(columns: dict[str, str], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        DatasetSpec.model_validate({"path": "/d.jsonl", "columns": columns})
