"""OpenAI's objects as MLOC answers them: the FileObject of an upload or of a batch's output, and the
Batch object of a batch's task.

A batch is an inference task whose labels mark it (``openai.batch``) and keep what the Batch object
reports; its id is ``batch_<task id>``, its output and error files ``file-<task id>-output`` and
``-errors``. Its status follows the task's state, and its request counts the task's totals once it has
ended, or its result lines so far while it runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import IO, Any, Literal

from pydantic import BaseModel, Field

from mloc import keys, openai_files, openai_lines
from mloc.api.results import open_lines
from mloc.api.tasks import _own
from mloc.errors import Conflict, NotFound
from mloc.modelroots import TASK_ID
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


async def batch_record(orch: Orchestrator, who: Principal, task_id: str, name: str) -> TaskRecord:
    try:
        record = _own(await orch.store.get(task_id, with_spec=False), who)
    except NotFound:
        record = None
    if record is None or record.labels.get(BATCH) != "1":
        raise NotFound(f"{name[:100]} not found; GET /v1/batches lists your batches")
    return record


async def output_file_object(orch: Orchestrator, record: TaskRecord, file_id: str, errors: bool) -> dict[str, Any]:
    """The FileObject of a batch's output (or error) file; its size is that of the lines it holds now."""
    handle = await lines_or_none(orch, record)
    if handle is None:
        raise no_lines(file_id, record)
    blocks = openai_lines.output_blocks(handle, output_of(record), errors=errors)
    size = await asyncio.to_thread(lambda: sum(len(block) for block in blocks))
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(record.finished_at or time.time()),
        "filename": f"{BATCH_PREFIX}{record.task_id}{'_error' if errors else '_output'}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def no_lines(file_id: str, record: TaskRecord) -> NotFound:
    return NotFound(f"file {file_id} has no lines yet: batch {BATCH_PREFIX}{record.task_id} has not written any")


def output_of(record: TaskRecord) -> openai_lines.BatchOutput:
    return openai_lines.BatchOutput(
        key=record.task_id.replace("-", ""),
        endpoint=record.labels.get(ENDPOINT, openai_lines.COMPLETIONS),
        model=record.labels.get(MODEL, ""),
        created=int(record.finished_at or record.started_at or record.created_at),
    )


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


def status_of(record: TaskRecord) -> BatchStatus:
    state = record.state
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


async def _cancel_end(orch: Orchestrator, record: TaskRecord) -> tuple[bool, float | None]:
    """For a cancelled batch: whether a chunk's executor is still stopping (its task ends at once, but a
    chunk finishing the request batch it is in may still add output lines), and else when the last of
    them stopped."""
    if record.state != TaskState.CANCELLED or not record.children:
        return False, record.finished_at
    pipe = orch.redis.pipeline(transaction=False)
    for task_id in record.children:
        pipe.hmget(keys.task(task_id), "state", "finished_at", "started_at")
    parts = await pipe.execute()
    going = (TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING)
    if any(state in going for state, _, _ in parts):
        return True, None
    # The chunks that had not started were cancelled with the task, in the same moment.
    stopped = [float(at) for _, at, started in parts if at and started]
    return False, max([record.finished_at or 0.0, *stopped]) or None


async def batch_status(orch: Orchestrator, record: TaskRecord) -> BatchStatus:
    """The batch's status: its task's state, and cancelling while a cancelled batch's chunk stops."""
    stopping, _ = await _cancel_end(orch, record)
    return "cancelling" if stopping else status_of(record)


async def batch_object(orch: Orchestrator, record: TaskRecord) -> dict[str, Any]:
    """OpenAI's Batch object for a batch's task."""
    counts = await counts_of(orch, record)
    stopping, stopped = await _cancel_end(orch, record)
    status: BatchStatus = "cancelling" if stopping else status_of(record)
    ended = _time(record.finished_at) if record.state.terminal and not stopping else None
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
        "in_progress_at": _time(record.started_at),
        # A self-hosted batch is not thrown away at a deadline: the work it did would be lost for nothing.
        "expires_at": None,
        "finalizing_at": None,
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
