"""A custom eval task's JSON-lines file with a line that is not a JSON object: the task fails naming the
file, the line and the fix, before any model loads; blank lines and a byte order mark are no problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import mloc.spec
from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.eval import EvalExecutor
from mloc.executors.eval_tasks import check_custom
from mloc.spec.eval import CustomTask

pytestmark = pytest.mark.extra("eval")

ROWS = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i), "zero"], "answer": 0} for i in range(6)]
FIX = 'fix or remove that line (each line of the file is one row, a JSON object such as {"question": ..., ...})'


def lines(*rows: Any) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def arith(path: Path) -> CustomTask:
    return CustomTask.model_validate({"name": "arith", "path": str(path), "type": "multiple_choice"})


def refusal(path: Path) -> str:
    with pytest.raises(ExecutionError) as caught:
        check_custom(arith(path), 0, 0)
    return caught.value.message


def test_an_eval_task_whose_file_has_a_line_that_is_not_json_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "badarith.jsonl"
    path.write_text(lines(ROWS[0], ROWS[1], "not json", ROWS[2]))
    # The model is never loaded: the file is checked first.
    source = {"source": {"type": "local", "identifier": str(tmp_path / "no-model")}, "engine": "transformers"}
    eval_section = {"custom": [{"name": "arith", "path": str(path), "type": "multiple_choice"}]}
    spec = {"taskType": "eval", "model": source, "eval": eval_section}
    doc = mloc.spec.load(yaml.safe_dump({"apiVersion": "mloc/v1", "kind": "EvalTask", "spec": spec}))
    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=doc,
        out_dir=tmp_path / "out",
        models_dir=tmp_path / "models",
        worker_id="w1",
        emit=lambda event: None,
    )
    executor = EvalExecutor()
    try:
        with pytest.raises(ExecutionError) as caught:
            executor.run(ctx)
    finally:
        executor.close()
    message = caught.value.message
    assert message.startswith(f"eval.custom[0] ('arith'): {str(path)!r} line 3 is not a JSON object: 'not json' (")
    assert "at character 1)" in message and message.endswith(FIX)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("[1, 2]", "'[1, 2]' is a JSON array"),
        ('"just text"', "'\"just text\"' is a JSON string"),
        ('{"question": "cut short", "choices": ["a", "b"', '\'{"question": "cut short", "choices": ["a", "b"\' ('),
    ],
)
def test_a_line_that_is_not_an_object_is_named_by_its_number(tmp_path: Path, bad: str, problem: str) -> None:
    path = tmp_path / "d.jsonl"
    # Blank lines count in the numbering, as an editor counts them.
    path.write_text(lines(ROWS[0], "", ROWS[1], bad, ROWS[2]))
    assert f"{str(path)!r} line 4 is not a JSON object: {problem}" in refusal(path)


def test_a_long_bad_line_is_shown_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(lines(ROWS[0], "x" * 10_000))
    message = refusal(path)
    assert f"line 2 is not a JSON object: '{'x' * 60}...' (" in message and len(message) < 400


def test_blank_lines_and_a_byte_order_mark_pass_the_check(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines(ROWS[0], "", *ROWS[1:], "   ").encode().replace(b"\n", b"\r\n"))
    check_custom(arith(path), 0, 2)


def test_a_json_file_written_as_json_lines_has_its_bad_line_named_too(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(lines(*ROWS[:3], "{oops}"))
    assert f"{str(path)!r} line 4 is not a JSON object: '{{oops}}' (" in refusal(path)


def test_a_json_document_that_is_not_json_lines_keeps_the_readers_message(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2)[:-3])
    message = refusal(path)
    assert f"{str(path)!r} is not readable as JSON" in message and "line 1" not in message
