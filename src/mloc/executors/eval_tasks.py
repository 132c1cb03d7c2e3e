"""Custom eval tasks: a local JSONL or CSV file checked row by row, and the lm-eval task config that scores it.

The config reads the file through the ``json``/``csv`` builder of ``datasets``, as the check does, and
renders each row with templates that name only the task's columns (plain identifiers, checked by the
spec), so the file's contents are data to lm-eval, never template code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from mloc.errors import ExecutionError
from mloc.spec.eval import CustomTask, CustomType, GenerationMetric

DEFAULT_MAX_TOKENS = 64
# Case, punctuation and surrounding spaces do not make an answer wrong.
EXACT_MATCH = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": True,
    "regexes_to_ignore": [r"^\s+", r"\s+$"],
}
HIGHER_IS_BETTER = {GenerationMetric.BLEU: True, GenerationMetric.CHRF: True, GenerationMetric.TER: False}


def where(task: CustomTask, index: int) -> str:
    return f"eval.custom[{index}] ({task.name!r})"


def check_custom(task: CustomTask, index: int, num_fewshot: int) -> None:
    """Read the task's file as lm-eval will and check every row it may score."""
    import datasets

    label = where(task, index)
    path = Path(task.path).expanduser()
    if not path.is_file():
        raise ExecutionError(
            f"{label}: file {task.path!r} does not exist on this worker; put it on the worker (or a folder the "
            "workers share) and give its absolute path in path"
        )
    json_lines = path.suffix.lower() == ".jsonl"
    if json_lines:
        # datasets names no line when one is bad ("An error occurred while generating the dataset").
        raise_bad_line(label, task.path, path)
    try:
        data = datasets.load_dataset(task.builder, data_files={"test": str(path.resolve())}, split="test")
    except Exception as exc:
        if task.builder == "json" and not json_lines:
            # A .json file may be JSON lines too: after a good first row, a bad line is what failed.
            raise_bad_line(label, task.path, path, after_a_row=True)
        raise ExecutionError(f"{label}: {task.path!r} is not readable as {task.builder.upper()}: {exc}") from exc
    missing = [column for column in task.columns_used() if column not in data.column_names]
    if missing:
        raise ExecutionError(
            f"{label}: column(s) {', '.join(missing)} not in {task.path!r}, whose columns are "
            f"{', '.join(data.column_names)}; name the file's columns in columns.question, "
            + ("columns.choices and columns.answer" if task.type == CustomType.MULTIPLE_CHOICE else "columns.target")
        )
    if len(data) == 0:
        raise ExecutionError(f"{label}: {task.path!r} has no rows; give a file with at least one question")
    if num_fewshot >= len(data):
        raise ExecutionError(
            f"{label}: num_fewshot {num_fewshot} needs more rows than the file's {len(data)} (the examples come "
            f"from the other rows); lower num_fewshot below {len(data)} or add rows"
        )
    for number, row in enumerate(data, start=1):
        problem = row_problem(task, row)
        if problem:
            raise ExecutionError(f"{label}: row {number} of {task.path!r}: {problem}")


def raise_bad_line(label: str, shown: str, path: Path, *, after_a_row: bool = False) -> None:
    """Fail naming the first line of a JSON-lines file that is not a JSON object, and the fix.

    One pass, a line at a time, so a large file costs a read and no more memory than its longest line. With
    ``after_a_row``, a bad line before any good one is left alone: the file is then no JSON lines at all."""
    rows = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.removeprefix(_BOM) if number == 1 else raw
            if not line.strip():
                continue  # datasets skips blank lines too
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                problem = f"{_preview(line)} ({exc.msg} at character {exc.pos + 1})"
            else:
                if isinstance(value, dict):
                    rows += 1
                    continue
                problem = f"{_preview(line)} is a JSON {_JSON_KINDS.get(type(value), type(value).__name__)}"
            if after_a_row and rows == 0:
                return
            raise ExecutionError(
                f"{label}: {shown!r} line {number} is not a JSON object: {problem}; fix or remove that line (each "
                'line of the file is one row, a JSON object such as {"question": ..., ...})'
            )


_BOM = b"\xef\xbb\xbf"
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _preview(line: bytes, limit: int = 60) -> str:
    text = line.decode("utf-8", errors="replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def row_problem(task: CustomTask, row: dict[str, Any]) -> str | None:
    """What keeps lm-eval from scoring this row, or None."""
    question = row[task.question_column]
    if question is None or not str(question).strip():
        return f"column {task.question_column!r} is empty; give every row a question"
    if task.type != CustomType.MULTIPLE_CHOICE:
        target = row[task.target_column]
        if target is None or not str(target).strip():
            return f"column {task.target_column!r} is empty; give every row the expected answer"
        return None
    choices = choices_of(task, row)
    if isinstance(choices, str):
        return choices
    if answer_index(task, row, choices) is None:
        answer = row[task.answer_column]
        columns = task.choice_columns
        ways = [f"the right choice's index (0 to {len(choices) - 1})", "its text"]
        if isinstance(columns, list):
            ways.append(f"the name of its column ({', '.join(columns)})")
        return (
            f"answer {answer!r} in column {task.answer_column!r} is not one of the {len(choices)} choices: give "
            f"{', '.join(ways[:-1])} or {ways[-1]}"
        )
    return None


def choices_of(task: CustomTask, row: dict[str, Any]) -> list[str] | str:
    """The row's choices as lm-eval sees them, or what is wrong with them."""
    columns = task.choice_columns
    if isinstance(columns, list):
        empty = [column for column in columns if row[column] is None]
        if empty:
            return f"choice column(s) {', '.join(empty)} are empty; give every row all its choices"
        return [str(row[column]) for column in columns]
    value = row[columns]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(item, str) for item in value):
        return (
            f"column {columns!r} holds {value!r}, not a list of at least two strings; in JSONL give a list, in "
            "CSV one column per choice (columns.choices: [A, B, C, D])"
        )
    return value


def answer_index(task: CustomTask, row: dict[str, Any], choices: list[str]) -> int | None:
    """The index of the right choice, as the target template in :func:`target_template` computes it."""
    answer = row[task.answer_column]
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer)
    if text in choices:
        return choices.index(text)
    columns = task.choice_columns
    if isinstance(columns, list) and text in columns:
        return columns.index(text)
    # lm-eval reads a rendered number as an index ("02" is no number to it).
    if text.isdigit() and str(int(text)) == text and int(text) < len(choices):
        return int(text)
    return None


def target_template(task: CustomTask) -> str:
    """lm-eval's doc_to_target: the right choice's index, from an index, a choice's text or its column."""
    answer = task.answer_column
    columns = task.choice_columns
    if isinstance(columns, list):
        choices = "[" + ", ".join(f"{column}|string" for column in columns) + "]"
        names = "[" + ", ".join(f'"{column}"' for column in columns) + "]"
        by_column = f"{{% elif {answer}|string in {names} %}}{{{{ {names}.index({answer}|string) }}}}"
    else:
        choices, by_column = columns, ""
    # One line without spaces outside the tags: lm-eval reads a rendered number as an index.
    return (
        f"{{% if {answer} is number %}}{{{{ {answer} }}}}"
        f"{{% elif {answer}|string in {choices} %}}{{{{ {choices}.index({answer}|string) }}}}"
        f"{by_column}{{% else %}}{{{{ {answer} }}}}{{% endif %}}"
    )


def task_config(task: CustomTask, max_tokens: int | None) -> dict[str, Any]:
    """The lm-eval task config of a custom task. num_fewshot is left unset: a config that says 0 would
    keep the task's num_fewshot from applying."""
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": task.builder,
        "dataset_kwargs": {"data_files": {"test": str(Path(task.path).expanduser().resolve())}},
        "test_split": "test",
        # Few-shot examples come from the same file; lm-eval leaves out the question being asked.
        "fewshot_split": "test",
        "doc_to_text": "{{" + task.question_column + "}}\nAnswer:",
        "metadata": {"version": 1.0, "source": task.path},
    }
    if task.type == CustomType.MULTIPLE_CHOICE:
        columns = task.choice_columns
        choices = columns if isinstance(columns, str) else "{{[" + ", ".join(f"{c}|string" for c in columns) + "]}}"
        config.update(
            output_type="multiple_choice",
            doc_to_choice=choices,
            doc_to_target=target_template(task),
            metric_list=[
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        )
        return config
    metrics = [
        EXACT_MATCH
        if metric == GenerationMetric.EXACT_MATCH
        else {"metric": metric.value, "aggregation": metric.value, "higher_is_better": HIGHER_IS_BETTER[metric]}
        for metric in task.metrics
    ]
    config.update(
        output_type="generate_until",
        doc_to_target="{{" + task.target_column + "}}",
        generation_kwargs={
            "until": task.stops,
            "max_gen_toks": max_tokens or DEFAULT_MAX_TOKENS,
            "do_sample": False,
            "temperature": 0.0,
        },
        metric_list=metrics,
    )
    return config


def write_config(task: CustomTask, folder: Path, max_tokens: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.yaml"
    path.write_text(yaml.safe_dump(task_config(task, max_tokens), sort_keys=False), encoding="utf-8")
    return path
