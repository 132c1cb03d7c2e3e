"""OpenAI's objects as MLOC answers them: the FileObject of an upload or of a batch's output, and the
Batch object of a batch's task.

A batch is an inference task whose labels mark it (``openai.batch``) and keep what the Batch object
reports; its id is ``batch_<task id>``, its output and error files ``file-<task id>-output`` and
``-errors``. Its status follows the task's state (``finalizing`` once every request is answered, while
the orchestrator joins its chunks' lines into the task's result file), and its request counts the
task's totals once it has ended, or its result lines so far while it runs. A batch whose input file
failed validation runs no task: its Batch object, ``failed`` with the file's problems, is kept as it was
made (:func:`save_failed`).

Once a batch has ended, its output and error files are filed among its owner's files
(:func:`file_batch`): listed, with the size they ended with, and deletable. Their bytes stay the task's
result lines, turned into OpenAI's lines as they are read.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import IO, Any, Literal

from pydantic import BaseModel, Field

from mloc import keys, openai_files, openai_lines
from mloc.api.results import open_lines
from mloc.api.tasks import _own
from mloc.errors import Conflict, NotFound
from mloc.modelroots import TASK_ID
from mloc.openai_files import FileStore, StoredFile
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.records import TaskRecord
from mloc.state import Reason, TaskState

# Labels of a batch's task: they mark it a batch and keep what the Batch object reports.
BATCH = "openai.batch"
ENDPOINT = "openai.endpoint"
INPUT_FILE = openai_files.INPUT_FILE_LABEL
MODEL = "openai.model"
REQUESTS = "openai.requests"
METADATA = "openai.metadata."
WINDOW = "24h"  # the one window OpenAI takes; MLOC runs a batch until it ends (no expiry: see batch_object)
BATCH_PREFIX = "batch_"
OUTPUT, ERRORS = "-output", "-errors"

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None = Field(description="Always null: MLOC runs a batch until it ends or is cancelled.")
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage = Field(description="Tokens of the requests answered so far.")


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def output_id(task_id: str, suffix: str) -> str:
    return f"file-{task_id}{suffix}"


def derived(file_id: str) -> tuple[str, bool] | None:
    """(task id, whether it is the error file) of a batch's output or error file id."""
    for suffix, errors in ((OUTPUT, False), (ERRORS, True)):
        task_id = file_id.removeprefix("file-").removesuffix(suffix)
        if file_id.startswith("file-") and file_id.endswith(suffix) and is_task_id(task_id):
            return task_id, errors
    return None


def is_task_id(value: str) -> bool:
    return bool(TASK_ID.match(value))


def batch_task_id(value: str) -> str:
    task_id = value.removeprefix(BATCH_PREFIX)
    if not value.startswith(BATCH_PREFIX) or not is_task_id(task_id):
        raise NotFound(f"batch {value[:100]} not found", details=[{"path": "batch_id", "message": "no such batch"}])
    return task_id


def _not_found(name: str) -> NotFound:
    return NotFound(f"{name[:100]} not found; GET /v1/batches lists your batches")


async def batch_record(orch: Orchestrator, who: Principal, task_id: str, name: str) -> TaskRecord:
    """The caller's batch task; NotFound for a batch that has none (it failed validation) too."""
    try:
        record = _own(await orch.store.get(task_id, with_spec=False), who)
    except NotFound:
        record = None
    if record is None or record.labels.get(BATCH) != "1":
        raise _not_found(name)
    return record


async def find_batch(orch: Orchestrator, who: Principal, task_id: str, name: str) -> TaskRecord | dict[str, Any]:
    """The caller's batch: its task, or the Batch object of one that failed validation."""
    try:
        return await batch_record(orch, who, task_id, name)
    except NotFound:
        failed = await failed_batch(orch, task_id)
        if failed is None or (not who.admin and failed[0] != who.name):
            raise
        return failed[1]


def files_of(orch: Orchestrator) -> FileStore:
    return FileStore(orch.redis, orch.settings.results_dir)


def kept_for(orch: Orchestrator) -> int | None:
    """How long a record made of a batch that has ended (its filed or deleted output file) is kept, in
    seconds, or None: forever. Its task is kept MLOC_TASK_RETENTION_SEC from its end; the record, made
    then or later, is kept a day longer, so it never goes before its task (a listing drops it once the
    task is gone) and does not stay long after."""
    retention = orch.settings.task_retention_sec
    return int(retention) + 86_400 if retention > 0 else None


# Batches that failed validation


def failed_object(
    task_id: str,
    *,
    endpoint: str,
    model: str,
    input_file_id: str,
    metadata: dict[str, str] | None,
    problems: list[openai_lines.Problem],
    now: float,
) -> dict[str, Any]:
    """The Batch object of a batch whose input file has ``problems``: failed at once, with no request run."""
    at = int(now)
    return {
        "id": BATCH_PREFIX + task_id,
        "object": "batch",
        "endpoint": endpoint,
        "model": model,
        "errors": {"object": "list", "data": [problem.to_openai() for problem in problems]},
        "input_file_id": input_file_id,
        "completion_window": WINDOW,
        "status": "failed",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": at,
        "in_progress_at": None,
        "expires_at": None,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": at,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata or None,
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        },
    }


async def save_failed(orch: Orchestrator, owner: str, task_id: str, batch: dict[str, Any], now: float) -> None:
    """Keep a batch that failed validation, and list it among the owner's batches. It is kept as long as
    a task that ended then would be."""
    key = keys.openai_failed_batch(task_id)
    async with orch.redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"owner": owner, "batch": json.dumps(batch)})
        ttl = orch.settings.task_retention_sec
        if ttl > 0:
            pipe.expire(key, int(ttl))
        pipe.zadd(keys.openai_batches(owner), {task_id: int(now * 1000)})
        await pipe.execute()


async def failed_batch(orch: Orchestrator, task_id: str) -> tuple[str, dict[str, Any]] | None:
    """(owner, Batch object) of a batch that failed validation, or None."""
    owner, batch = await orch.redis.hmget(keys.openai_failed_batch(task_id), ["owner", "batch"])
    if owner is None or batch is None:
        return None
    return _text(owner), json.loads(batch)


async def failed_batches(orch: Orchestrator, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The Batch objects of those of ``task_ids`` that failed validation."""
    if not task_ids:
        return {}
    async with orch.redis.pipeline(transaction=False) as pipe:
        for task_id in task_ids:
            pipe.hget(keys.openai_failed_batch(task_id), "batch")
        found = await pipe.execute()
    return {task_id: json.loads(batch) for task_id, batch in zip(task_ids, found, strict=True) if batch is not None}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# A batch's chunks


@dataclass(frozen=True)
class Chunk:
    """What a batch reads of one of its task's chunks."""

    state: TaskState | None  # None: forgotten
    started_at: float | None
    finished_at: float | None
    rows: int  # the requests it answered or failed, once it has succeeded


async def chunks_of(orch: Orchestrator, record: TaskRecord) -> list[Chunk]:
    if not record.children:
        return []
    async with orch.redis.pipeline(transaction=False) as pipe:
        for task_id in record.children:
            pipe.hmget(keys.task(task_id), "state", "started_at", "finished_at", "result_summary")
        parts = await pipe.execute()
    chunks = []
    for raw, started, finished, summary in parts:
        state = TaskState(_text(raw)) if raw else None
        rows = 0
        if state == TaskState.SUCCEEDED and summary:
            try:
                rows = int(json.loads(summary).get("rows") or 0)
            except (ValueError, TypeError, AttributeError):
                rows = 0
        chunks.append(Chunk(state, float(started) if started else None, float(finished) if finished else None, rows))
    return chunks


def _cancel_end(record: TaskRecord, chunks: list[Chunk]) -> tuple[bool, float | None]:
    """For a cancelled batch: whether a chunk's executor is still stopping (its task ends at once, but a
    chunk finishing the request batch it is in may still add output lines), and else when the last of
    them stopped."""
    if record.state != TaskState.CANCELLED or not chunks:
        return False, record.finished_at
    going = (TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING)
    if any(chunk.state in going for chunk in chunks):
        return True, None
    # The chunks that had not started were cancelled with the task, in the same moment.
    stopped = [chunk.finished_at for chunk in chunks if chunk.finished_at and chunk.started_at]
    return False, max([record.finished_at or 0.0, *stopped]) or None


def _all_answered(record: TaskRecord, chunks: list[Chunk]) -> float | None:
    """When the last of the batch's requests was answered (its chunk ended), or None while some are not.
    From then until the task ends, the orchestrator joins the chunks' lines into the task's result file:
    the batch's ``finalizing``."""
    total = int(record.labels.get(REQUESTS, "0") or 0)
    answered = 0
    last = 0.0
    for chunk in chunks:
        if chunk.state != TaskState.SUCCEEDED:
            return None
        answered += chunk.rows
        last = max(last, chunk.finished_at or 0.0)
        if total and answered >= total:
            return last or None
    return None


def status_of(record: TaskRecord, *, answered: bool = False) -> BatchStatus:
    """The status its task's state gives a batch; ``answered``: every request of it is (its chunks have
    all succeeded), so a task that has not ended is finalizing."""
    state = record.state
    if answered and state in (TaskState.PENDING, TaskState.ASSIGNED, TaskState.RUNNING):
        return "finalizing"
    if state in (TaskState.PENDING, TaskState.ASSIGNED):
        return "validating" if record.started_at is None else "in_progress"
    statuses: dict[TaskState, BatchStatus] = {
        TaskState.RUNNING: "in_progress",
        TaskState.CANCELLING: "cancelling",
        TaskState.SUCCEEDED: "completed",
        TaskState.FAILED: "failed",
        TaskState.CANCELLED: "cancelled",
    }
    return statuses[state]


async def batch_status(orch: Orchestrator, record: TaskRecord) -> BatchStatus:
    """The batch's status: its task's state, finalizing once every request is answered, and cancelling
    while a cancelled batch's chunk stops."""
    chunks = await chunks_of(orch, record)
    stopping, _ = _cancel_end(record, chunks)
    return "cancelling" if stopping else status_of(record, answered=_all_answered(record, chunks) is not None)


async def has_ended(orch: Orchestrator, record: TaskRecord) -> bool:
    """Whether the batch has ended: its task has, and no chunk of a cancelled one is still stopping."""
    if not record.state.terminal:
        return False
    if record.state != TaskState.CANCELLED:
        return True
    stopping, _ = _cancel_end(record, await chunks_of(orch, record))
    return not stopping


# Output and error files


def no_lines(file_id: str, record: TaskRecord) -> NotFound:
    return NotFound(f"file {file_id} has no lines yet: batch {BATCH_PREFIX}{record.task_id} has not written any")


def output_of(record: TaskRecord) -> openai_lines.BatchOutput:
    return openai_lines.BatchOutput(
        key=record.task_id.replace("-", ""),
        endpoint=record.labels.get(ENDPOINT, openai_lines.COMPLETIONS),
        model=record.labels.get(MODEL, ""),
        created=int(record.finished_at or record.started_at or record.created_at),
    )


def _end_mark(record: TaskRecord) -> str:
    """What tells one end of a batch's task from another (a resumed batch ends again)."""
    return repr(float(record.finished_at or record.updated_at or record.created_at))


async def file_batch(orch: Orchestrator, record: TaskRecord) -> None:
    """File the output and error files of a batch that has ended among its owner's files, with the size
    they ended with (one read of its result lines); a file it has none for is not listed."""
    files = files_of(orch)
    mark = _end_mark(record)
    ended_at = float(mark)
    handle = await lines_or_none(orch, record)
    sizes = (0, 0) if handle is None else await asyncio.to_thread(openai_lines.output_sizes, handle, output_of(record))
    for (suffix, label), size in zip(((OUTPUT, "_output"), (ERRORS, "_error")), sizes, strict=True):
        file_id = output_id(record.task_id, suffix)
        if not size:
            earlier = await files.output(file_id)
            if earlier is not None and earlier.ended != mark:
                await files.drop_output(file_id, record.owner)
            continue
        stored = StoredFile(
            file_id,
            size,
            int(ended_at),
            f"{BATCH_PREFIX}{record.task_id}{label}.jsonl",
            openai_files.OUTPUT_PURPOSE,
            record.owner,
            task=record.task_id,
            ended=mark,
        )
        await files.file_output(stored, ended_at=ended_at, ttl=kept_for(orch))
    ends = keys.openai_batch_ends(record.owner)
    if record.state == TaskState.SUCCEEDED:
        await orch.redis.hdel(ends, record.task_id)  # a batch that completed does not run again
    else:
        await orch.redis.hset(ends, record.task_id, mark)


async def filed_output(orch: Orchestrator, record: TaskRecord, file_id: str, errors: bool) -> StoredFile:
    """The filed output (or error) file of a batch that has ended, filing the batch first where it is not
    yet; NotFound when the batch has none, or it was deleted."""
    files = files_of(orch)
    mark = _end_mark(record)
    stored = await files.output(file_id)
    if stored is None or stored.ended != mark:
        await file_batch(orch, record)
        stored = await files.output(file_id)
    batch = BATCH_PREFIX + record.task_id
    if stored is None or stored.ended != mark:
        which = "no request failed" if errors else "no request was answered"
        raise NotFound(
            f"file {file_id} not found: {which} in batch {batch}, so it has no {'error' if errors else 'output'} file"
        )
    if stored.deleted:
        raise NotFound(
            f"file {file_id} was deleted; the lines of batch {batch} stay readable as its task's results "
            f"(GET /api/v1/tasks/{record.task_id}/results) until the task passes its retention"
        )
    return stored


async def output_file_object(orch: Orchestrator, record: TaskRecord, file_id: str, errors: bool) -> dict[str, Any]:
    """The FileObject of a batch's output (or error) file: as filed once the batch has ended; before, the
    size of the lines it holds now."""
    if await has_ended(orch, record):
        return (await filed_output(orch, record, file_id, errors)).to_openai()
    handle = await lines_or_none(orch, record)
    if handle is None:
        raise no_lines(file_id, record)
    blocks = openai_lines.output_blocks(handle, output_of(record), errors=errors)
    size = await asyncio.to_thread(lambda: sum(len(block) for block in blocks))
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": f"{BATCH_PREFIX}{record.task_id}{'_error' if errors else '_output'}.jsonl",
        "purpose": openai_files.OUTPUT_PURPOSE,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def file_ended_batches(orch: Orchestrator, owner: str) -> None:
    """File the output and error files of the owner's batches that have ended (again) since the last look."""
    redis = orch.redis
    ends = keys.openai_batch_ends(owner)
    if not await redis.sismember(keys.OPENAI_OUTPUTS_INDEXED, owner):
        # Batches made before the ends were kept: looked at once, as any other. Filing twice is harmless.
        made = await redis.zrange(keys.openai_batches(owner), 0, -1)
        async with redis.pipeline(transaction=False) as pipe:
            for task_id in made:
                pipe.hsetnx(ends, task_id, "")
            pipe.sadd(keys.OPENAI_OUTPUTS_INDEXED, owner)
            await pipe.execute()
    marks = {_text(task_id): _text(mark) for task_id, mark in (await redis.hgetall(ends)).items()}
    if not marks:
        return
    found = {record.task_id: record for record in await orch.store.get_many(sorted(marks))}
    for task_id, mark in sorted(marks.items()):
        record = found.get(task_id)
        if record is None:
            await redis.hdel(ends, task_id)  # forgotten, or a batch that failed validation: nothing to file
        elif record.state.terminal and mark != _end_mark(record) and await has_ended(orch, record):
            await file_batch(orch, record)


async def stale_outputs(orch: Orchestrator, outputs: list[StoredFile]) -> set[str]:
    """Which of the listed output and error files ``outputs`` no longer hold: their task was forgotten, or
    was resumed (it runs again, or ended again with more lines: it is filed anew by
    :func:`file_ended_batches`)."""
    async with orch.redis.pipeline(transaction=False) as pipe:
        for stored in outputs:
            pipe.hmget(keys.task(stored.task or ""), "state", "finished_at")
        parts = await pipe.execute()
    return {
        stored.id
        for stored, (state, finished) in zip(outputs, parts, strict=True)
        if not (state and TaskState(_text(state)).terminal and finished and repr(float(finished)) == stored.ended)
    }


async def lines_or_none(orch: Orchestrator, record: TaskRecord) -> IO[bytes] | None:
    """The batch's result lines, or None while it has none."""
    try:
        return await open_lines(orch, record)
    except (NotFound, Conflict):
        return None


async def counts_of(orch: Orchestrator, record: TaskRecord) -> openai_lines.Counts:
    """The batch's requests answered and failed: the task's totals once it has them, else its lines so far."""
    if record.state.terminal:
        result = await orch.store.result(record.task_id)
        if isinstance(result, dict) and "succeeded" in result:
            usage = result.get("usage") or {}
            return openai_lines.Counts(
                int(result["succeeded"]),
                int(result.get("failed") or 0),
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            )
    handle = await lines_or_none(orch, record)
    if handle is None:
        return openai_lines.Counts()
    return await asyncio.to_thread(openai_lines.count_lines, handle)


def _time(value: float | None) -> int | None:
    return int(value) if value is not None else None


async def _failure(orch: Orchestrator, record: TaskRecord, answered: int) -> dict[str, Any]:
    """The error entry of a failed batch. A batch runs as chunks of its requests; when one fails, the task's
    reason speaks of chunks and of the `mloc` CLI, so the entry is told from the chunk that failed: which
    requests, why, and how to run the rest (``answered`` of them are in the output file)."""
    error: dict[str, Any] = {
        "code": record.reason_code,
        "message": record.reason or "the batch failed",
        "param": None,
        "line": None,
    }
    if record.reason_code != Reason.REPLICA_FAILED or not record.children:
        return error
    chunks = {chunk.task_id: chunk for chunk in await orch.store.get_many(record.children)}
    failed = [
        chunk
        for task_id in record.children
        # The chunks still going when one failed were cancelled with the batch: the failed one is the cause.
        if (chunk := chunks.get(task_id)) is not None and chunk.state == TaskState.FAILED
    ]
    how = f"POST /api/v1/tasks/{record.task_id}/resume (the same token) or `mloc resume {record.task_id}`"
    resume = (
        f"the {answered:,} request(s) answered are in the output file; to run the others, resume the batch with {how}"
        if answered
        else f"no request was answered; once the cause is fixed, resume the batch with {how}"
    )
    if not failed:
        # Its chunks have passed their retention: the task's own reason is all there is.
        cause = (record.reason or "").split("; `mloc resume", 1)[0] or "a part of it failed"
        return error | {"code": "batch_failed", "message": f"part of the batch failed: {cause}; {resume}"}
    chunk = failed[0]
    cause = chunk.reason or "no reason was given"
    part = "part of the batch"
    if chunk.replica is not None and record.chunk_rows:
        total = int(record.labels.get(REQUESTS, "0")) or None
        first = chunk.replica * record.chunk_rows + 1
        last = (chunk.replica + 1) * record.chunk_rows
        part = f"requests {first}-{min(last, total) if total else last} of the batch (in file order)"
    return error | {"code": chunk.reason_code or "batch_failed", "message": f"{part} could not run: {cause}; {resume}"}


async def batch_object(orch: Orchestrator, record: TaskRecord) -> dict[str, Any]:
    """OpenAI's Batch object for a batch's task."""
    counts = await counts_of(orch, record)
    chunks = await chunks_of(orch, record)
    stopping, stopped = _cancel_end(record, chunks)
    answered = _all_answered(record, chunks)
    status: BatchStatus = "cancelling" if stopping else status_of(record, answered=answered is not None)
    ended = _time(record.finished_at) if record.state.terminal and not stopping else None
    started = record.started_at
    if started is None and status == "finalizing":
        # A task is marked started by the orchestrator's next look at its chunks: a short batch may have
        # had its requests all answered first.
        started = min((chunk.started_at for chunk in chunks if chunk.started_at), default=None)
    errors = None
    if record.state == TaskState.FAILED:
        errors = {"object": "list", "data": [await _failure(orch, record, counts.completed)]}
    metadata = {k.removeprefix(METADATA): v for k, v in record.labels.items() if k.startswith(METADATA)}
    created = int(record.created_at)
    # Cancelling from the cancel (when the task ended); a batch with nothing running is cancelling and
    # cancelled in the same moment.
    cancelling = _time(record.finished_at or record.updated_at) if status in ("cancelling", "cancelled") else None
    return {
        "id": BATCH_PREFIX + record.task_id,
        "object": "batch",
        "endpoint": record.labels.get(ENDPOINT, ""),
        "model": record.labels.get(MODEL, ""),
        "errors": errors,
        "input_file_id": record.labels.get(INPUT_FILE, ""),
        "completion_window": WINDOW,
        "status": status,
        "output_file_id": output_id(record.task_id, OUTPUT) if counts.completed else None,
        "error_file_id": output_id(record.task_id, ERRORS) if counts.failed else None,
        "created_at": created,
        "in_progress_at": _time(started),
        # A self-hosted batch is not thrown away at a deadline: the work it did would be lost for nothing.
        "expires_at": None,
        # Its chunks are forgotten a moment before it is: a completed batch finalized by its end at the latest.
        "finalizing_at": _time(answered) if answered is not None else (ended if status == "completed" else None),
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": cancelling,
        "cancelled_at": _time(stopped) if status == "cancelled" else None,
        "request_counts": {
            "total": int(record.labels.get(REQUESTS, "0")),
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": metadata or None,
        "usage": {
            "input_tokens": counts.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": counts.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts.prompt_tokens + counts.completion_tokens,
        },
    }
