"""The ``inference`` executor's dataset path: rows in a batch at a time, one result line per row out.

Each batch is read, turned into requests (the prompt or chat column, the id, the row's own sampling
values), generated, and appended to ``results.jsonl`` in input order before the next batch is read, so
memory holds one batch and a reader of the file sees the task's progress. A row that cannot become a
request gets a line with ``error`` instead, up to ``inference.input.max_row_errors``; one more fails the
task with a message naming the row.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
from pydantic import TypeAdapter, ValidationError

from mloc.errors import ExecutionError
from mloc.executors.base import RunContext
from mloc.executors.dataset_io import Dataset, RawRow, batches, open_dataset
from mloc.llm.text import PLAIN_TURN_STOPS
from mloc.spec.dataset import (
    CHUNK_LABEL,
    COUNTED_BYTES,
    RESULT_LINES,
    ROW_PRINTS,
    DatasetInput,
)
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


class LineWriter:
    """A results file of JSON lines, appended a batch at a time with one write, so a reader sees whole
    lines (a reader ignores a last line without its newline: that batch is still being written). A run
    starts it again."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only, as results are the task user's.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    def append(self, lines: list[Line]) -> None:
        _write(self.fd, _jsonl(lines))

    def close(self) -> None:
        os.close(self.fd)


class ResultLines:
    """``results.jsonl``, appended a batch at a time with one write, so a reader sees whole lines (a
    reader ignores a last line without its newline: that batch is still being written); and beside it
    (:data:`ROW_PRINTS`) a fingerprint of the row each line answers, written first.

    The lines an earlier run of the same rows left there are kept while they still answer the rows
    read now, in order (:meth:`keep`): this chunk's earlier attempt (its worker was lost or stopped, or
    its executor died), or a resumed task's chunk's predecessor (whose files the resume copied in).
    Keeping stops at the first line whose row's fingerprint differs (the data changed), that carries an
    error (its row may have been fixed before a resume), or that is not whole; the files are cut there
    and every row from there on is generated. The files hold a whole prefix at every moment, so a run
    that stops at any point leaves nothing lost for the next. A kept line's usage is not counted again
    where the run that wrote it had it counted (its worker recorded its end: :data:`COUNTED_BYTES` says how
    far); a lost worker's counters died with it, so the lines past that are counted by the run keeping
    them (:meth:`take_uncounted`).
    """

    def __init__(self, folder: Path, log: Callable[..., None]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.counted_bytes = _counted(folder)
        self._uncounted: list[Line] = []
        # Owner-only, as results are the task user's.
        self.fd = os.open(folder / RESULT_LINES, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.prints_fd = os.open(folder / ROW_PRINTS, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._earlier = _earlier_lines(folder / RESULT_LINES, folder / ROW_PRINTS)
        self._log = log
        self.keeping = True
        self.kept = 0
        self._kept_bytes = 0

    def keep(self, row: RawRow) -> Line | None:
        """The earlier line answering ``row`` (the next row, in order) while keeping; None once it stopped."""
        if not self.keeping:
            return None
        earlier = next(self._earlier, None)
        if earlier is not None and earlier[1] != fingerprint(row):
            self._log(
                f"{row.where} is not the row the earlier run answered: the data changed, so rows from here on "
                "are generated again",
                level="WARNING",
            )
        elif earlier is not None and earlier[0].get("error") is None:
            line, _, end = earlier
            self.kept += 1
            self._kept_bytes = end
            if end > self.counted_bytes:
                self._uncounted.append(line)
            return line
        self._stop()
        return None

    def take_uncounted(self) -> list[Line]:
        """The lines kept since the last call whose usage no recorded run counted."""
        taken, self._uncounted = self._uncounted, []
        return taken

    def append(self, rows: list[RawRow], lines: list[Line]) -> None:
        if self.keeping:
            self._stop()
        _write(self.prints_fd, "".join(fingerprint(row) + "\n" for row in rows).encode())
        _write(self.fd, _jsonl(lines))

    def _stop(self) -> None:
        """Cut both files after the lines kept: what an earlier run wrote past them is not a result."""
        self.keeping = False
        self._earlier.close()
        if self.counted_bytes > self._kept_bytes:
            # The lines written from here on are this run's: none of them was counted yet.
            (self.folder / COUNTED_BYTES).write_text(str(self._kept_bytes))
            self.counted_bytes = self._kept_bytes
        os.ftruncate(self.prints_fd, self.kept * _PRINT_WIDTH)
        os.ftruncate(self.fd, self._kept_bytes)

    def finish(self) -> None:
        """Every row was read: earlier lines past the last row are not results (the data got shorter)."""
        if self.keeping:
            self._stop()

    def close(self) -> None:
        # A run that stops while keeping leaves the earlier lines it did not reach for the next one.
        self._earlier.close()
        os.close(self.fd)
        os.close(self.prints_fd)


def fingerprint(row: RawRow) -> str:
    """What identifies a row's content: its values (or why it could not be read) and its number."""
    content = orjson.dumps(
        [row.number, row.values, row.problem], option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str
    )
    return hashlib.blake2b(content, digest_size=_PRINT_BYTES).hexdigest()


_PRINT_BYTES = 8
_PRINT_WIDTH = 2 * _PRINT_BYTES + 1  # hex digits and the newline: line i's fingerprint starts at i * width


def _counted(folder: Path) -> int:
    """How many bytes of the folder's lines a recorded run counted (none without a count: the run that
    wrote them was lost before its worker recorded it)."""
    try:
        return int((folder / COUNTED_BYTES).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _earlier_lines(lines_path: Path, prints_path: Path) -> Generator[tuple[Line, str, int], None, None]:
    """An earlier run's whole lines, each with its row's fingerprint and the file's length through it,
    read one at a time."""
    with lines_path.open("rb") as lines, prints_path.open("rb") as prints:
        end = 0
        for raw in lines:
            printed = prints.read(_PRINT_WIDTH)
            if not raw.endswith(b"\n") or len(printed) != _PRINT_WIDTH:
                return
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return
            if not isinstance(line, dict):
                return
            end += len(raw)
            yield line, printed[:-1].decode(), end


def _jsonl(lines: list[Line]) -> bytes:
    return b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE, default=str) for line in lines)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


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
            column = self.overrides.get("max_tokens")
            self._check_length(prompt, sampling, column if column and values.get(column) not in (None, "") else None)
        except _RowProblem as problem:
            return RowRequest(row, row_id, error=str(problem))
        return RowRequest(row, row_id, prompt, sampling)

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
            raise _RowProblem(f"messages column {column!r} is an empty chat; give at least one message")
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

    def _check_length(self, prompt: str, sampling: Sampling, max_tokens_column: str | None) -> None:
        """Raise when the row cannot fit the model's context; ``max_tokens_column`` is the column the
        row's max_tokens came from, if it came from one."""
        limit = self.engine.max_context
        if limit is None:
            return
        if sampling.max_tokens >= limit:
            problem = f"not below the model's context of {limit} tokens; set it below {limit}"
            if max_tokens_column is not None:
                raise _RowProblem(f"column {max_tokens_column!r} (max_tokens) is {sampling.max_tokens}: {problem}")
            raise _RowProblem(f"max_tokens {sampling.max_tokens} is {problem}")
        # A token is at least one byte of UTF-8, so most prompts pass without being tokenized.
        if len(prompt.encode()) + 8 + sampling.max_tokens <= limit:
            return
        count = self.engine.count_tokens(prompt)
        if count + sampling.max_tokens > limit:
            raise _RowProblem(
                f"the prompt has {count} tokens; with max_tokens {sampling.max_tokens} that is beyond the model's "
                f"context of {limit} tokens: shorten the prompt, or lower max_tokens"
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
    rows = succeeded = failed = prompt_tokens = completion_tokens = generated_completion = late = 0
    hinted = False
    started = time.perf_counter()
    writer = ResultLines(ctx.out_dir, ctx.log)
    try:
        with open_dataset(source, results_dir=results_dir) as dataset:
            mapper = RowMapper(source, inputs, engine, dataset)
            ctx.log(f"reading {dataset.label}" + (f": {dataset.total:,} rows" if dataset.total is not None else ""))
            ctx.progress(0, dataset.total, _rows_message(0, dataset.total), unit="rows")
            for batch in batches(dataset.rows, batch_size):
                ctx.check_cancelled()
                kept = _kept(writer, batch)
                if kept:
                    rows += len(kept)
                    succeeded += len(kept)
                    prompt_tokens += sum(int(line.get("prompt_tokens") or 0) for line in kept)
                    completion_tokens += sum(int(line.get("completion_tokens") or 0) for line in kept)
                    uncounted = writer.take_uncounted()
                    if uncounted:
                        late += len(uncounted)
                        ctx.add_usage(
                            prompt_tokens=sum(int(line.get("prompt_tokens") or 0) for line in uncounted),
                            completion_tokens=sum(int(line.get("completion_tokens") or 0) for line in uncounted),
                        )
                    batch = batch[len(kept) :]
                    if not batch:
                        ctx.progress(rows, dataset.total, _rows_message(rows, dataset.total), unit="rows")
                        continue
                requests = [mapper.map(row) for row in batch]
                if not hinted and mapper.id_column is None:
                    hinted = _hint_unmapped_id(ctx, batch)
                for request in requests:
                    if request.error is not None:
                        failed += 1
                        if failed > source.max_row_errors:
                            raise ExecutionError(_too_many(dataset.label, request, failed, source.max_row_errors))
                outputs = _generate(requests, generate, ctx.check_cancelled)
                ctx.check_cancelled()
                lines = [line_of(request, outputs.get(request.row.number)) for request in requests]
                writer.append(batch, lines)
                batch_prompt = sum(line["prompt_tokens"] for line in lines)
                batch_completion = sum(line["completion_tokens"] for line in lines)
                ctx.add_usage(prompt_tokens=batch_prompt, completion_tokens=batch_completion)
                prompt_tokens += batch_prompt
                completion_tokens += batch_completion
                generated_completion += batch_completion
                rows += len(batch)
                succeeded += len(outputs)
                ctx.progress(rows, dataset.total, _rows_message(rows, dataset.total), unit="rows")
            label, more = dataset.label, bool(dataset.more)
        writer.finish()
    finally:
        writer.close()
    # A later chunk may start past the end (chunks are cut before the row count is known): it has none.
    later_chunk = ctx.document.metadata.labels.get(CHUNK_LABEL, "0") != "0"
    if rows == 0 and not later_chunk:
        where = f" from row {source.skip_rows:,} on" if source.skip_rows else ""
        raise ExecutionError(f"{label} has no rows{where}; give a dataset with at least one row")
    if rows:
        ctx.progress(rows, rows, _rows_message(rows, rows), unit="rows")
    if writer.kept:
        ctx.log(f"{writer.kept:,} rows kept from an earlier run, not generated again")
    if late:
        ctx.log(f"{late:,} of them came from a run whose worker was lost before it recorded their usage: counted now")
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
        "kept_rows": writer.kept,
        "succeeded": succeeded,
        "failed": failed,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "latency_sec": round(latency, 4),
            "num_requests": succeeded,
            # The rows generated now: kept rows took no time here.
            "tokens_per_sec": round(generated_completion / latency, 2) if latency > 0 else None,
        },
    }


def _hint_unmapped_id(ctx: RunContext, batch: list[RawRow]) -> bool:
    """Say once that the rows have an 'id' column the lines do not use (they are numbered by row, unless
    columns.id names it); True once said, or once a readable row shows there is none."""
    first = next((row.values for row in batch if row.values is not None), None)
    if first is None:
        return False
    if "id" in first:
        ctx.log(
            "the rows have an 'id' column, which the result lines do not use: each line's id is its row number; "
            "to use the column, set inference.input.columns.id: id",
            level="WARNING",
        )
    return True


def _kept(writer: ResultLines, batch: list[RawRow]) -> list[Line]:
    """The earlier lines kept for the batch's first rows (see :class:`ResultLines`)."""
    kept = []
    for row in batch:
        line = writer.keep(row)
        if line is None:
            break
        kept.append(line)
    return kept


def _generate(
    requests: list[RowRequest], generate: Generate, check_cancelled: Callable[[], None]
) -> dict[int, list[Generation]]:
    """One engine call for the batch's good rows, each with its own sampling; outputs by row number.

    Chat and plain rows go together: a chat row's sampling already carries the turn stops its rendering
    needs, so nothing else tells them apart."""
    good = [(request, request.sampling) for request in requests if request.sampling is not None]
    if not good:
        return {}
    generations = generate([request.prompt for request, _ in good], [sampling for _, sampling in good])
    if len(generations) != len(good):
        # A cancel cuts the engine's call short, answering the prompts it finished: not the batch's result
        # (its lines are written whole or not at all), so the next run generates the batch again.
        check_cancelled()
        raise ExecutionError(f"the engine answered {len(generations)} of the batch's {len(good)} prompts")
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
