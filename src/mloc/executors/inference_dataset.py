"""The ``inference`` executor's dataset path: rows in a batch at a time, one result line per row out.

Each batch is read, turned into requests (the prompt or chat column, the id, the row's own sampling
values), generated, and appended to ``results.jsonl`` in input order before the next batch is read, so
memory holds one batch and a reader of the file sees the task's progress. A row that cannot become a
request gets a line with ``error`` instead, up to ``inference.input.max_row_errors``; one more fails the
task with a message naming the row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
from pydantic import TypeAdapter, ValidationError

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.dataset_io import Dataset, RawRow, batches, open_dataset
from mloc.llm.text import PLAIN_TURN_STOPS
from mloc.spec.dataset import CHUNK_LABEL, RESULT_LINES, DatasetInput
from mloc.spec.sampling import Message, Sampling

if TYPE_CHECKING:
    from mloc.llm.base import Generation, LLMEngine
    from mloc.spec.sampling import InferenceInput

_MESSAGES = TypeAdapter(list[Message])
# The engine, bound to the task's adapter and cancel signal: prompts with one sampling each.
Generate: TypeAlias = Callable[[list[str], Sequence[Sampling]], "list[list[Generation]]"]
# A result line, as written and as read back.
Line: TypeAlias = dict[str, Any]
# Distinct per-row sampling values kept validated at once; a dataset with more starts the cache afresh.
_SAMPLING_CACHE = 4096


@dataclass(frozen=True)
class RowRequest:
    """One row made ready for the engine, or the reason it cannot be."""

    row: RawRow
    id: Any
    prompt: str = ""
    sampling: Sampling | None = None
    error: str | None = None


class ResultLines:
    """``results.jsonl``, appended a batch at a time with one write, so a reader sees whole lines (a
    reader ignores a last line without its newline: that batch is still being written)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Truncated: a retried attempt starts the file again. Owner-only, as results are the task user's.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    def append(self, lines: list[dict[str, Any]]) -> None:
        data = memoryview(b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE, default=str) for line in lines))
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def close(self) -> None:
        os.close(self.fd)


class EarlierLines:
    """The result lines an earlier run of the same rows left in the task's folder: this chunk's earlier
    attempt (its worker was lost or stopped, or its executor died), or the lines of the chunk a resumed
    task's chunk replaces (copied in by the resume). Their rows are not generated again; each is checked
    by its id against the row read now, and from the first that differs (the data changed) every row is
    generated afresh.

    Their usage is not counted again: the run that wrote them counted it when its end was recorded
    (a lost worker's counters are lost with it)."""

    def __init__(self, lines: list[Line]) -> None:
        self.lines = lines
        self.matched = 0  # lines matched to rows so far
        self.kept = 0  # of those, the ones kept

    @classmethod
    def read(cls, path: Path) -> EarlierLines:
        """The file's lines up to the first that is not whole (a batch cut short while written)."""
        try:
            data = path.read_bytes()
        except OSError:
            return cls([])
        lines: list[Line] = []
        for raw in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                break
            if not isinstance(line, dict) or "id" not in line:
                break
            lines.append(line)
        return cls(lines)

    def take(self, batch: list[RawRow], mapper: RowMapper, ctx: RunContext) -> dict[int, Line]:
        """The earlier lines of the batch's rows that are kept, by row number. A row whose earlier line
        carries an error is run again (its data may have been fixed before a resume)."""
        kept: dict[int, Line] = {}
        for row in batch:
            if self.matched >= len(self.lines):
                break
            line = self.lines[self.matched]
            if line["id"] != mapper.row_id(row):
                ctx.log(
                    f"{row.where} has id {mapper.row_id(row)!r} where the earlier run wrote {line['id']!r}: the "
                    "data changed, so rows from here on are generated again",
                    level="WARNING",
                )
                del self.lines[self.matched :]
                break
            self.matched += 1
            if line.get("error") is None:
                kept[row.number] = line
        self.kept += len(kept)
        return kept


class RowMapper:
    """Turns raw rows into requests by ``inference.input.columns``, checked against the engine."""

    def __init__(self, source: DatasetInput, inputs: InferenceInput, engine: LLMEngine, dataset: Dataset) -> None:
        self.columns = source.columns
        self.id_column = source.columns.id or dataset.default_id_column
        self.overrides = source.columns.sampling()
        self.base = {name: getattr(inputs, name) for name in Sampling.model_fields}
        self.engine = engine
        self.default_text = dataset.default_text_column
        self.plain_chat = not engine.has_chat_template
        self._cache: dict[str, Sampling | str] = {}

    def map(self, row: RawRow) -> RowRequest:
        values = row.values
        if values is None:
            return RowRequest(row, row.number, error=row.problem or "unreadable")
        row_id, problem = self._id(values, row.number)
        if problem is not None:
            return RowRequest(row, row.number, error=problem)
        try:
            prompt, chat = self._text(values)
            sampling = self._sampling(values, chat)
            self._check_length(prompt, sampling)
        except _RowProblem as problem:
            return RowRequest(row, row_id, error=str(problem))
        return RowRequest(row, row_id, prompt, sampling)

    def row_id(self, row: RawRow) -> Any:
        """The id :meth:`map` gives the row's line, without reading its text."""
        return row.number if row.values is None else self._id(row.values, row.number)[0]

    def _id(self, values: dict[str, Any], number: int) -> tuple[Any, str | None]:
        """The row's id (its id column's value, else its number), and what is wrong with that column."""
        if self.id_column is None:
            return number, None
        row_id = values.get(self.id_column)
        if row_id is None or isinstance(row_id, bool) or not isinstance(row_id, str | int):
            problem = "is missing" if row_id is None else f"is a {type(row_id).__name__}, not a string or integer"
            return number, f"id column {self.id_column!r} {problem}"
        return row_id, None

    def _text(self, values: dict[str, Any]) -> tuple[str, bool]:
        column = self.columns.messages or self.columns.prompt or self.default_text
        chat = self.columns.messages is not None
        if not chat and self.columns.prompt is None and column not in values and "messages" in values:
            column, chat = "messages", True  # a chat dataset needs no mapping
        if column not in values:
            raise _RowProblem(
                f"no column {column!r} (it has {', '.join(map(repr, list(values)[:10]))}); map the text with "
                "inference.input.columns.prompt or .messages"
            )
        value = values[column]
        if not chat:
            if not isinstance(value, str) or not value.strip():
                what = "is empty" if isinstance(value, str) else f"is a {type(value).__name__}, not text"
                raise _RowProblem(f"prompt column {column!r} {what}")
            return value, False
        if isinstance(value, str):  # a CSV cell holds the chat as JSON
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise _RowProblem(f"messages column {column!r} is text that is not a JSON list of messages") from None
        try:
            messages = _MESSAGES.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            problem = f"messages column {column!r} is not a chat: at {where or 'top'}: {first['msg']}"
            raise _RowProblem(problem) from None
        if not messages:
            raise _RowProblem(f"messages column {column!r} is an empty chat")
        return self.engine.render_chat(messages), True

    def _sampling(self, values: dict[str, Any], chat: bool) -> Sampling:
        own = {name: values.get(column) for name, column in self.overrides.items()}
        own = {name: value for name, value in own.items() if value is not None and value != ""}
        key = orjson.dumps([own, chat], option=orjson.OPT_SORT_KEYS, default=str).decode()
        found = self._cache.get(key)
        if found is None:
            found = self._validate(own, chat)
            if len(self._cache) >= _SAMPLING_CACHE:
                self._cache.clear()
            self._cache[key] = found
        if isinstance(found, str):
            raise _RowProblem(found)
        return found

    def _validate(self, own: dict[str, Any], chat: bool) -> Sampling | str:
        try:
            sampling = Sampling.model_validate({**self.base, **own})
        except ValidationError as exc:
            # The same checks as the task's own settings at submit: a value the engine would refuse for the
            # whole call (temperature 5) is this row's error instead.
            first = exc.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            if not first["loc"]:
                # A combination (the row's temperature 0 with the task's n > 1): name the row's columns.
                columns = ", ".join(f"{self.overrides[name]!r} ({name}) is {value!r}" for name, value in own.items())
                return f"column {columns}: {message}" if columns else message
            name = str(first["loc"][0])
            column = self.overrides.get(name, name)
            return f"column {column!r} ({name}) is {own.get(name)!r}: {message}"
        if chat and self.plain_chat:
            # Without a chat template a reply is plain text after "Assistant:"; the next turn marker ends it.
            stops = [*sampling.stop, *(stop for stop in PLAIN_TURN_STOPS if stop not in sampling.stop)]
            sampling = sampling.model_copy(update={"stop": stops})
        return sampling

    def _check_length(self, prompt: str, sampling: Sampling) -> None:
        limit = self.engine.max_context
        if limit is None:
            return
        if sampling.max_tokens >= limit:
            raise _RowProblem(f"max_tokens {sampling.max_tokens} is not below the model's context of {limit} tokens")
        # A token is at least one byte of UTF-8, so most prompts pass without being tokenized.
        if len(prompt.encode()) + 8 + sampling.max_tokens <= limit:
            return
        count = self.engine.count_tokens(prompt)
        if count + sampling.max_tokens > limit:
            raise _RowProblem(
                f"the prompt has {count} tokens; with max_tokens {sampling.max_tokens} that is beyond the model's "
                f"context of {limit} tokens"
            )


class _RowProblem(Exception):
    """Why one row cannot be run; it becomes the row's error line."""


def line_of(request: RowRequest, samples: list[Generation] | None) -> dict[str, Any]:
    """The result line of one row: its outputs (a list when the task asks n > 1), or its error."""
    if samples is None:
        return {
            "id": request.id,
            "output": None,
            "finish_reason": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "error": request.error,
        }
    many = len(samples) > 1
    return {
        "id": request.id,
        "output": [s.output for s in samples] if many else samples[0].output,
        "finish_reason": [s.finish_reason for s in samples] if many else samples[0].finish_reason,
        "prompt_tokens": samples[0].prompt_tokens,
        "completion_tokens": sum(s.completion_tokens for s in samples),
        "error": None,
    }


def run_dataset(
    ctx: RunContext,
    inputs: InferenceInput,
    engine: LLMEngine,
    batch_size: int,
    generate: Generate,
) -> dict[str, Any]:
    """Run every row of ``inputs.input`` through ``generate`` (the engine, with the task's adapter and
    cancel signal) and write the lines; returns the totals that become responses.json."""
    source = inputs.input
    assert source is not None
    results_dir = ctx.out_dir.parent
    rows = succeeded = failed = prompt_tokens = completion_tokens = 0
    started = time.perf_counter()
    earlier = EarlierLines.read(ctx.out_dir / RESULT_LINES)  # before the writer starts the file again
    writer = ResultLines(ctx.out_dir / RESULT_LINES)
    try:
        with open_dataset(source, results_dir=results_dir) as dataset:
            mapper = RowMapper(source, inputs, engine, dataset)
            ctx.log(f"reading {dataset.label}" + (f": {dataset.total:,} rows" if dataset.total is not None else ""))
            ctx.progress(0, dataset.total, _rows_message(0, dataset.total))
            for batch in batches(dataset.rows, batch_size):
                ctx.check_cancelled()
                kept = earlier.take(batch, mapper, ctx)
                requests = [mapper.map(row) for row in batch if row.number not in kept]
                for request in requests:
                    if request.error is not None:
                        failed += 1
                        if failed > source.max_row_errors:
                            raise ExecutionError(_too_many(dataset.label, request, failed, source.max_row_errors))
                outputs = _generate(requests, generate)
                # A cancel mid-batch cuts the batch short; its partial output is not a result.
                ctx.check_cancelled()
                made = {request.row.number: line_of(request, outputs.get(request.row.number)) for request in requests}
                writer.append([kept.get(row.number) or made[row.number] for row in batch])
                # Only the rows run now count towards this run's usage (see EarlierLines).
                batch_prompt = sum(line["prompt_tokens"] for line in made.values())
                batch_completion = sum(line["completion_tokens"] for line in made.values())
                ctx.add_usage(prompt_tokens=batch_prompt, completion_tokens=batch_completion)
                prompt_tokens += batch_prompt + sum(int(line.get("prompt_tokens") or 0) for line in kept.values())
                completion_tokens += batch_completion + sum(
                    int(line.get("completion_tokens") or 0) for line in kept.values()
                )
                succeeded += len(kept)
                rows += len(batch)
                succeeded += len(outputs)
                ctx.progress(rows, dataset.total, _rows_message(rows, dataset.total))
            label, more = dataset.label, bool(dataset.more)
    finally:
        writer.close()
    # A later chunk may start past the end (chunks are cut before the row count is known): it has none.
    later_chunk = ctx.document.metadata.labels.get(CHUNK_LABEL, "0") != "0"
    if rows == 0 and not later_chunk:
        where = f" from row {source.skip_rows:,} on" if source.skip_rows else ""
        raise ExecutionError(f"{label} has no rows{where}; give a dataset with at least one row")
    if rows:
        ctx.progress(rows, rows, _rows_message(rows, rows))
    if earlier.kept:
        ctx.log(f"{earlier.kept:,} rows kept from an earlier run, not generated again")
    if failed:
        ctx.log(f"{failed:,} of {rows:,} rows failed; their lines carry the error", level="WARNING")
    latency = time.perf_counter() - started
    return {
        "ok": True,
        "model": engine.model_id,
        "engine": engine.name,
        "dtype": engine.dtype,
        "input": label,
        "results_file": RESULT_LINES,
        "first_row": source.skip_rows,
        "more": more,
        "rows": rows,
        "kept_rows": earlier.kept,
        "succeeded": succeeded,
        "failed": failed,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "latency_sec": round(latency, 4),
            "num_requests": succeeded,
            "tokens_per_sec": round(completion_tokens / latency, 2) if latency > 0 else None,
        },
    }


def _generate(requests: list[RowRequest], generate: Generate) -> dict[int, list[Generation]]:
    """One engine call for the batch's good rows, each with its own sampling; outputs by row number.

    Chat and plain rows go together: a chat row's sampling already carries the turn stops its rendering
    needs, so nothing else tells them apart."""
    good = [(request, request.sampling) for request in requests if request.sampling is not None]
    if not good:
        return {}
    generations = generate([request.prompt for request, _ in good], [sampling for _, sampling in good])
    return {request.row.number: samples for (request, _), samples in zip(good, generations, strict=True)}


def _rows_message(done: int, total: int | None) -> str:
    return f"{done:,} of {total:,} rows" if total is not None else f"{done:,} rows"


def _too_many(label: str, request: RowRequest, failed: int, allowed: int) -> str:
    budget = (
        "inference.input.max_row_errors is 0, so the first bad row fails the task"
        if allowed == 0
        else f"this is bad row {failed}, beyond inference.input.max_row_errors ({allowed})"
    )
    return (
        f"{label} {request.row.where}: {request.error}; {budget}: fix the row, or raise max_row_errors to let "
        "bad rows through with an 'error' line each"
    )
