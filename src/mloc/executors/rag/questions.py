"""A RAG task's questions read from a dataset (``input``), a batch at a time: each batch is retrieved
for, answered and appended to ``results.jsonl`` before the next is read, so memory holds one batch
however many questions there are. A row without a question gets a line with ``error``, up to
``input.max_row_errors``; one more fails the task naming the row."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.dataset_io import RawRow, batches, open_dataset
from mloc.executors.inference_dataset import LineWriter
from mloc.spec.dataset import RESULT_LINES
from mloc.spec.rag import RagSpec

if TYPE_CHECKING:
    from mloc.executors.rag.stores import Hit
    from mloc.llm.base import LLMEngine

# Answer(question hits) -> (the answer text, finish reason, prompt tokens, completion tokens, kept hits)
Answerer = Callable[[list[str], list[list["Hit"]]], list[tuple[str, str | None, int, int, list[dict[str, Any]]]]]


def answer_rows(
    ctx: RunContext,
    spec: RagSpec,
    search: Callable[[Sequence[str]], list[list[Hit]]],
    answer: Answerer,
    engine: Callable[[], LLMEngine],
    batch_size: int,
) -> dict[str, Any]:
    """Answer every row of ``spec.input``; returns the totals that become responses.json."""
    source = spec.input
    assert source is not None
    column = source.columns.prompt or ("output" if source.task else "question")
    rows = failed = prompt_tokens = completion_tokens = 0
    started = time.perf_counter()
    writer = LineWriter(ctx.out_dir / RESULT_LINES)
    try:
        with open_dataset(source, results_dir=ctx.out_dir.parent) as dataset:
            id_column = source.columns.id or dataset.default_id_column
            ctx.log(f"reading questions from {dataset.label}")
            for batch in batches(dataset.rows, batch_size):
                ctx.check_cancelled()
                asked: list[tuple[int, str]] = []
                lines: list[dict[str, Any]] = []
                for row in batch:
                    row_id, question, error = _question(row, column, id_column)
                    lines.append(_blank_line(row_id, question, error))
                    if error is None:
                        asked.append((len(lines) - 1, question))
                    else:
                        failed += 1
                        if failed > source.max_row_errors:
                            raise ExecutionError(
                                f"{dataset.label} {row.where}: {error}; beyond input.max_row_errors "
                                f"({source.max_row_errors}): fix the row, or raise max_row_errors"
                            )
                if asked:
                    questions = [question for _, question in asked]
                    for (index, _), (text, reason, used, made, sources) in zip(
                        asked, answer(questions, search(questions)), strict=True
                    ):
                        line = lines[index]
                        line.update(output=text, finish_reason=reason, sources=sources)
                        line.update(prompt_tokens=used, completion_tokens=made)
                ctx.check_cancelled()
                writer.append(lines)
                batch_prompt = sum(line["prompt_tokens"] for line in lines)
                batch_completion = sum(line["completion_tokens"] for line in lines)
                ctx.add_usage(prompt_tokens=batch_prompt, completion_tokens=batch_completion)
                prompt_tokens += batch_prompt
                completion_tokens += batch_completion
                rows += len(batch)
                ctx.progress(rows, dataset.total, f"{rows:,} questions answered", unit="rows")
            label = dataset.label
    finally:
        writer.close()
    if rows == 0:
        raise ExecutionError(f"{label} has no rows; give a dataset with at least one question")
    loaded = engine()
    latency = time.perf_counter() - started
    return {
        "ok": True,
        "model": loaded.model_id,
        "engine": loaded.name,
        "input": label,
        "results_file": RESULT_LINES,
        "rows": rows,
        "succeeded": rows - failed,
        "failed": failed,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "latency_sec": round(latency, 3),
            "num_requests": rows - failed,
        },
    }


def _question(row: RawRow, column: str, id_column: str | None) -> tuple[Any, str, str | None]:
    """A row's id, its question, and why it cannot be asked (None when it can)."""
    values = row.values
    if values is None:
        return row.number, "", row.problem or "unreadable"
    row_id: Any = values.get(id_column, row.number) if id_column else row.number
    value = values.get(column)
    if not isinstance(value, str) or not value.strip():
        if column not in values:
            return row_id, "", f"question column {column!r} is missing; name the column with input.columns.prompt"
        what = "is empty" if isinstance(value, str) else "is not text"
        return row_id, "", f"question column {column!r} {what} in this row; give it a question, or drop the row"
    return row_id, value, None


def _blank_line(row_id: Any, question: str, error: str | None) -> dict[str, Any]:
    return {
        "id": row_id,
        "question": question,
        "output": None,
        "finish_reason": None,
        "sources": [],
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "error": error,
    }
