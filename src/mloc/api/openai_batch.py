"""/v1/files and /v1/batches: the OpenAI Batch API, served by ordinary MLOC inference tasks.

An upload is kept by :mod:`mloc.openai_files`. Creating a batch checks its file line by line and writes
the lines as dataset rows (:mod:`mloc.openai_lines`), then submits an inference task over them; the
batch *is* that task (``batch_<task id>``), marked by its labels and listed from the owner's batch index.
A file with problems makes a batch that failed validation, as at OpenAI: no task, its problems in its
``errors``. A batch's output and error files are the task's result lines, turned into OpenAI's lines
as they are sent; once the batch has ended they are listed among its owner's files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mloc import artifacts, keys, openai_lines
from mloc.api import openai_objects as objects
from mloc.api.deps import Caller, Orch
from mloc.api.responses import raises
from mloc.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    SpecError,
    Unavailable,
)
from mloc.openai_files import FileStore, StoredFile
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.records import TaskRecord
from mloc.spec import Document, validate
from mloc.spec.packaged import PACKAGED_MODELS, find_packaged

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
UPLOAD_PATH = "/v1/files"  # its file may be up to MLOC_MAX_FILE_BYTES
# What a multipart form adds around the file (boundaries, part headers, the purpose field): the
# request may be this much larger than the file limit.
UPLOAD_MARGIN = 64 << 10

# OpenAI's limits on a batch's metadata; a value is held to MLOC's label limit.
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256
JSONL = "application/jsonl"
# The defaults OpenAI applies where a line leaves a value out (MLOC's own default for a chat's length).
COMPLETION_DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0}
CHAT_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


class CreateBatch(BaseModel):
    # OpenAI's clients may send fields MLOC has no use for (output_expires_after): they are ignored.
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(max_length=200)
    endpoint: str = Field(max_length=200)
    completion_window: str = Field(max_length=20)
    metadata: dict[str, str] | None = None


def _files(orch: Orchestrator) -> FileStore:
    return objects.files_of(orch)


def _visible(stored: StoredFile | None, who: Principal, file_id: str) -> StoredFile:
    if stored is None or (not who.admin and stored.owner != who.name):
        # Another user's file gets the answer of a missing one, so its id is not disclosed.
        raise NotFound(f"file {file_id[:100]} not found", details=[{"path": "file_id", "message": "no such file"}])
    return stored


@router.post("/files", response_model=objects.FileObject)
@raises(BadRequest, PayloadTooLarge, Unavailable)
async def upload_file(
    orch: Orch,
    who: Caller,
    file: Annotated[UploadFile, File(description="The batch file: one JSON request per line.")],
    purpose: Annotated[str, Form(max_length=64, description="Must be `batch`.")],
) -> dict[str, Any]:
    """Upload a batch input file (OpenAI's Files API)."""
    if purpose != "batch":
        raise BadRequest(
            f"purpose {purpose!r} is not supported: MLOC stores batch input files only; set purpose to 'batch'",
            details=[{"path": "purpose", "message": f"is {purpose!r}", "fix": "set it to 'batch'"}],
        )
    limit = orch.settings.max_file_bytes
    if file.size is not None and file.size > limit:
        # The request may carry the form's own bytes past the limit (see UPLOAD_MARGIN): the file may not.
        name = file.filename or "the file"
        raise PayloadTooLarge(f"{name} is {file.size} bytes; the limit is {limit} (MLOC_MAX_FILE_BYTES)")
    stored = await _files(orch).save(
        file.file, filename=file.filename or "upload.jsonl", purpose=purpose, owner=who.name
    )
    return stored.to_openai()


@router.get("/files", response_model=objects.FileList)
@raises(BadRequest, Conflict, Unavailable)
async def list_files(
    orch: Orch,
    who: Caller,
    purpose: Annotated[str | None, Query(max_length=64, description="Only the files of this purpose.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[
        Literal["asc", "desc"], Query(description="By upload time (a batch's end for its files): `desc`, newest first.")
    ] = "desc",
    after: Annotated[str | None, Query(max_length=100, description="A file id: list the ones past it.")] = None,
) -> dict[str, Any]:
    """The caller's files (OpenAI's Files API): uploads, and the output and error files of the batches
    that have ended (purpose `batch_output`)."""
    await objects.file_ended_batches(orch, who.name)

    async def stale(outputs: list[StoredFile]) -> set[str]:
        return await objects.stale_outputs(orch, outputs)

    page = await _files(orch).listed(
        who.name, purpose=purpose, after=after, limit=limit, newest_first=order == "desc", stale=stale
    )
    if page is None:
        raise BadRequest(
            f"after {str(after)[:100]!r} is not one of your files; give the last id of the previous page",
            details=[{"path": "after", "message": "no such file"}],
        )
    stored, more = page
    return _page([file.to_openai() for file in stored], more)


@router.get("/files/{file_id}", response_model=objects.FileObject)
@raises(NotFound, Conflict, Unavailable)
async def retrieve_file(file_id: str, orch: Orch, who: Caller) -> dict[str, Any]:
    """An uploaded file's record, or a batch's output or error file's."""
    derived = objects.derived(file_id)
    if derived is None:
        return _visible(await _files(orch).get(file_id), who, file_id).to_openai()
    record = await objects.batch_record(orch, who, derived[0], file_id)
    return await objects.output_file_object(orch, record, file_id, derived[1])


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"description": "The file's bytes.", "content": {JSONL: {"schema": {"type": "string"}}}}},
)
@raises(NotFound, Conflict, Unavailable)
async def file_content(file_id: str, orch: Orch, who: Caller) -> StreamingResponse:
    """An uploaded file as it was sent, or a batch's output or error file: one OpenAI line per request
    (while the batch runs, those written so far)."""
    derived = objects.derived(file_id)
    if derived is None:
        files = _files(orch)
        stored = _visible(await files.get(file_id), who, file_id)
        try:
            handle: IO[bytes] = await asyncio.to_thread(files.path(stored.id).open, "rb")
        except OSError as exc:
            raise Unavailable(f"file {file_id} cannot be read: {type(exc).__name__}: {exc}") from exc
        return StreamingResponse(_chunks(handle), media_type=JSONL)
    record = await objects.batch_record(orch, who, derived[0], file_id)
    if await objects.has_ended(orch, record):
        await objects.filed_output(orch, record, file_id, derived[1])  # NotFound once deleted
    lines = await objects.lines_or_none(orch, record)
    if lines is None:
        raise objects.no_lines(file_id, record)
    # A plain iterator: Starlette runs it in its thread pool, so reading the lines never blocks the loop.
    return StreamingResponse(
        openai_lines.output_blocks(lines, objects.output_of(record), errors=derived[1]), media_type=JSONL
    )


@router.delete("/files/{file_id}", response_model=objects.FileDeleted)
@raises(BadRequest, NotFound, Conflict, Unavailable)
async def delete_file(file_id: str, orch: Orch, who: Caller) -> dict[str, Any]:
    """Delete a file. An upload goes with its bytes, its batch rows and its record; one that a batch which
    has not ended reads is kept (409) until the batch ends. A batch's output or error file can be deleted
    once the batch has ended (409 before): it is no longer listed or read, and its lines stay the batch
    task's results until the task passes its retention."""
    derived = objects.derived(file_id)
    if derived is not None:
        return await _delete_output(orch, who, file_id, *derived)
    files = _files(orch)
    _visible(await files.get(file_id), who, file_id)

    async def running(task_ids: list[str]) -> list[str]:
        return [record.task_id for record in await orch.store.get_many(task_ids) if not record.state.terminal]

    try:
        done = await files.delete(file_id, running)
    except OSError as exc:
        raise Unavailable(f"file {file_id} cannot be removed: {type(exc).__name__}: {exc}") from exc
    if done.file is None:
        raise NotFound(f"file {file_id[:100]} not found", details=[{"path": "file_id", "message": "no such file"}])
    if done.in_use is not None:
        raise _in_use(file_id, done.in_use)
    try:
        store = artifacts.store_for(orch.settings)
        if store is not None:
            await asyncio.to_thread(store.remove_upload, files.rows_path(file_id).name)
    except (ConfigError, OSError) as exc:
        # The record and the local copy are gone, so nothing can name the store's copy any more.
        log.warning("file %s: its rows could not be removed from the artifact store: %s", file_id, exc)
    return {"id": file_id, "object": "file", "deleted": True}


async def _delete_output(
    orch: Orchestrator, who: Principal, file_id: str, task_id: str, errors: bool
) -> dict[str, Any]:
    record = await objects.batch_record(orch, who, task_id, file_id)
    if not await objects.has_ended(orch, record):
        batch = objects.BATCH_PREFIX + record.task_id
        raise Conflict(
            f"file {file_id} is the {'error' if errors else 'output'} file of batch {batch}, which has not ended: "
            f"its lines are still being written; delete it once the batch has ended, or cancel the batch with "
            f"POST /v1/batches/{batch}/cancel first",
            details=[{"path": "file_id", "message": "is the output of a batch that has not ended"}],
        )
    stored = await objects.filed_output(orch, record, file_id, errors)
    await _files(orch).delete_output(stored, ttl=objects.kept_for(orch))
    return {"id": file_id, "object": "file", "deleted": True}


def _in_use(file_id: str, tasks: list[str]) -> Conflict:
    details = [{"path": "file_id", "message": "is the input of a batch that has not ended"}]
    if not tasks:
        return Conflict(
            f"file {file_id} is the input of a batch being created right now; delete it once that batch has ended",
            details=details,
        )
    batches = [objects.BATCH_PREFIX + task_id for task_id in tasks]
    shown = ", ".join(batches[:5]) + (f" and {len(batches) - 5} more" if len(batches) > 5 else "")
    return Conflict(
        f"file {file_id} is the input of batch {shown}, which has not ended; wait for it to end, or cancel it "
        f"with POST /v1/batches/{batches[0]}/cancel, then delete the file",
        details=details,
    )


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while block := handle.read(1 << 20):
            yield block


@router.post("/batches", response_model=objects.BatchObject)
@raises(BadRequest, NotFound, Forbidden, Conflict, SpecError, Unavailable)
async def create_batch(body: CreateBatch, orch: Orch, who: Caller) -> dict[str, Any]:
    """Create a batch: its file is checked line by line and run as one inference task. A file with
    problems makes a batch that has failed validation, each problem in its `errors` (as at OpenAI)."""
    if body.endpoint not in openai_lines.ENDPOINTS:
        raise openai_lines.unsupported_endpoint(body.endpoint)
    if body.completion_window != objects.WINDOW:
        raise BadRequest(
            f"completion_window {body.completion_window!r} is not supported; set it to {objects.WINDOW!r}",
            details=[{"path": "completion_window", "message": f"must be {objects.WINDOW!r}"}],
        )
    labels = _metadata_labels(body.metadata or {})
    files = _files(orch)
    stored = await files.get(body.input_file_id)
    if stored is None and objects.derived(body.input_file_id) is not None:
        raise BadRequest(
            f"input file {body.input_file_id[:100]} is a batch's output or error file; a batch reads an uploaded "
            "file: download its lines, upload them with POST /v1/files (purpose 'batch') and name that file",
            details=[{"path": "input_file_id", "message": "is a batch's output or error file"}],
        )
    if stored is None or (not who.admin and stored.owner != who.name):
        raise NotFound(
            f"input file {body.input_file_id[:100]} not found; upload it with POST /v1/files (purpose 'batch')",
            details=[{"path": "input_file_id", "message": "no such file"}],
        )
    if stored.purpose != "batch":
        raise BadRequest(f"input file {stored.id} has purpose {stored.purpose!r}; upload it with purpose 'batch'")
    # Held from here until the task exists, so a delete of the file cannot come in between.
    claim = await files.claim(stored.id)
    if claim is None:
        raise NotFound(
            f"input file {stored.id} was deleted; upload it again with POST /v1/files (purpose 'batch')",
            details=[{"path": "input_file_id", "message": "no such file"}],
        )
    try:
        task_id = await _submit_batch(orch, who, files, stored, body, labels)
    except BaseException:
        await files.release(stored.id, claim)
        raise
    if isinstance(task_id, dict):
        await files.release(stored.id, claim)  # nothing reads the file
        return task_id
    await files.used_by(stored.id, claim, task_id)
    record = await orch.store.get(task_id, with_spec=False)
    async with orch.redis.pipeline(transaction=True) as pipe:
        pipe.zadd(keys.openai_batches(record.owner), {task_id: int(record.created_at * 1000)})
        pipe.hset(keys.openai_batch_ends(record.owner), task_id, "")
        await pipe.execute()
    return await objects.batch_object(orch, record)


async def _submit_batch(
    orch: Orchestrator, who: Principal, files: FileStore, stored: StoredFile, body: CreateBatch, labels: dict[str, str]
) -> str | dict[str, Any]:
    """Check the file, write its rows and submit the batch's task; the answer is the task's id, or for a
    file with problems the Batch object of a batch that failed validation (kept; no task is made). With
    an artifact store the rows go there too, and the task reads them from there, so any host's worker can."""
    rows = files.rows_path(stored.id)
    try:
        store = artifacts.store_for(orch.settings)
    except ConfigError as exc:
        raise Unavailable(f"the artifact store is misconfigured: {exc.message}") from exc
    where = store.upload_url(rows.name) if store is not None else str(rows)
    try:
        converted, partial = await asyncio.to_thread(_convert, files, stored.id, body.endpoint)
    except OSError as exc:
        raise Unavailable(f"input file {stored.id} cannot be read: {type(exc).__name__}: {exc}") from exc
    try:
        labels = labels | {
            objects.BATCH: "1",
            objects.ENDPOINT: body.endpoint,
            objects.INPUT_FILE: stored.id,
            objects.MODEL: (converted.model or "")[:256],
            objects.REQUESTS: str(converted.requests),
        }
        problems = list(converted.problems)
        document: Document | None = None
        try:
            if converted.model is not None:
                # Told beside the lines' problems, so that one new file fixes them all.
                _model_section(orch.settings.openai_model_sections, converted, stored.id)
            if not problems:
                document = _document(orch, where, body.endpoint, converted, labels)
        except openai_lines.BatchFileError as exc:
            problems.append(exc.problem)
        if document is None:
            return await _failed(orch, who, stored, body, converted, problems)
        # In place only once the task can be made of it: a failed batch leaves no rows behind.
        os.replace(partial, rows)
    finally:
        partial.unlink(missing_ok=True)
    if store is not None:
        try:
            await asyncio.to_thread(store.put_upload, rows, rows.name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise Unavailable(
                f"the rows of input file {stored.id} could not be put in the artifact store {store.url}: "
                f"{type(exc).__name__}: {exc}; check MLOC_ARTIFACT_STORE, its credentials and free space"
            ) from exc
    answer = await orch.submit(document, who)
    return str(answer["task_id"])


async def _failed(
    orch: Orchestrator,
    who: Principal,
    stored: StoredFile,
    body: CreateBatch,
    converted: openai_lines.Converted,
    problems: list[openai_lines.Problem],
) -> dict[str, Any]:
    """Keep a batch whose file has ``problems`` as one that failed validation; its Batch object."""
    task_id = str(uuid.uuid4())
    now = time.time()
    # In line order; what concerns the whole file (no line) comes last.
    problems.sort(key=lambda problem: (problem.line is None, problem.line or 0))
    batch = objects.failed_object(
        task_id,
        endpoint=body.endpoint,
        model=converted.model or "",
        input_file_id=stored.id,
        metadata=body.metadata,
        problems=problems,
        now=now,
    )
    await objects.save_failed(orch, who.name, task_id, batch, now)
    return batch


def _convert(files: FileStore, file_id: str, endpoint: str) -> tuple[openai_lines.Converted, Path]:
    """Check the upload and write its rows to a new file beside it; the answer names that file."""
    target, partial = files.temporary()
    try:
        with target, files.path(file_id).open("rb") as source:
            return openai_lines.convert(source, target, endpoint=endpoint), partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _document(
    orch: Orchestrator, rows: str, endpoint: str, converted: openai_lines.Converted, labels: dict[str, str]
) -> Document:
    try:
        return validate(_task(orch, rows, endpoint, converted, labels))
    except SpecError as exc:
        # What the file can get wrong here is its model; the task's field names would mean nothing to its author.
        known = ", ".join(sorted(orch.settings.openai_model_sections)) or "none are set"
        raise openai_lines.refusal(
            labels[objects.INPUT_FILE],
            converted.model_line,
            "body.model",
            f"{(converted.model or '')[:100]!r} cannot be run: {exc.message}",
            f"name a model of MLOC_OPENAI_MODELS ({known}) or a Hugging Face model id",
            openai_lines.MODEL_NOT_FOUND,
        ) from None


def _model_section(
    configured: dict[str, dict[str, Any]], converted: openai_lines.Converted, file_id: str
) -> dict[str, Any]:
    """The task's ``model`` for the batch's model name: its MLOC_OPENAI_MODELS section, else the packaged
    model of that name (the bundled Gemma 3 270M answers to ``gemma3-270m`` with nothing configured), else
    the Hugging Face model of that id.

    Where MLOC_OPENAI_MODELS is set, a name of none of these (an OpenAI model name such as gpt-4o-mini, a
    misspelt name) would only fail on a worker, as a hub download; a bare name is therefore refused here,
    and a hub model is named in its owner/name form."""
    name = converted.model or ""
    if name in configured:
        return configured[name]
    packaged = find_packaged(name)
    if packaged is not None:
        return {"source": {"type": "package", "identifier": packaged.name}}
    if configured and "/" not in name:
        known = ", ".join(repr(known) for known in [*sorted(configured), *(m.name for m in PACKAGED_MODELS)])
        fix = (
            f"name one of {known}, or a Hugging Face model by its full id (owner/name); to serve {name[:100]!r} "
            "under that name, the operator adds it to MLOC_OPENAI_MODELS (JSON: name -> a task's model section)"
        )
        problem = f"is {name[:100]!r}, which is not a model of this MLOC"
        raise openai_lines.refusal(
            file_id, converted.model_line, "body.model", problem, fix, openai_lines.MODEL_NOT_FOUND
        )
    return {"source": {"type": "huggingface", "identifier": name}}


def _metadata_labels(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA:
        raise BadRequest(
            f"metadata has {len(metadata)} keys; give at most {MAX_METADATA}",
            details=[{"path": "metadata", "message": "too many keys"}],
        )
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise BadRequest(
                f"metadata key {key[:80]!r}: keys are 1-{MAX_METADATA_KEY} characters and values at most "
                f"{MAX_METADATA_VALUE} in MLOC; shorten it",
                details=[{"path": f"metadata.{key[:80]}", "message": "too long"}],
            )
    return {objects.METADATA + key: value for key, value in metadata.items()}


def _task(
    orch: Orchestrator, rows: str, endpoint: str, converted: openai_lines.Converted, labels: dict[str, str]
) -> dict[str, Any]:
    """The inference task that runs a batch's rows."""
    model = _model_section(orch.settings.openai_model_sections, converted, labels[objects.INPUT_FILE])
    text = openai_lines.TEXT_FIELD[endpoint]
    columns = {"id": "id", text: text, **{name: name for name in openai_lines.SAMPLING}}
    defaults = COMPLETION_DEFAULTS if endpoint == openai_lines.COMPLETIONS else CHAT_DEFAULTS
    return {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": "openai-batch", "labels": labels},
        "spec": {
            "taskType": "inference",
            "model": model,
            "inference": {
                **defaults,
                "input": {
                    "path": rows,
                    "format": "jsonl",
                    "columns": columns,
                    # A bad request fails alone, as at OpenAI: it gets a line in the error file.
                    "max_row_errors": converted.requests,
                    # Known at create: no chunk is cut past the last request, and each says its own rows.
                    "max_rows": converted.requests,
                },
            },
        },
    }


@router.get("/batches/{batch_id}", response_model=objects.BatchObject)
@raises(NotFound, Unavailable)
async def retrieve_batch(batch_id: str, orch: Orch, who: Caller) -> dict[str, Any]:
    """A batch: its status, times, request counts and output files."""
    found = await objects.find_batch(orch, who, objects.batch_task_id(batch_id), batch_id)
    return found if isinstance(found, dict) else await objects.batch_object(orch, found)


@router.post("/batches/{batch_id}/cancel", response_model=objects.BatchObject)
@raises(NotFound, InvalidTransition, Unavailable)
async def cancel_batch(batch_id: str, orch: Orch, who: Caller) -> dict[str, Any]:
    """Cancel a batch; the requests already answered stay in its output file."""
    record = await objects.find_batch(orch, who, objects.batch_task_id(batch_id), batch_id)
    if isinstance(record, dict):
        raise InvalidTransition(
            f"batch {batch_id} is failed (its input file did not pass validation); only a batch that has not "
            "ended can be cancelled"
        )
    try:
        await cancel(orch.store, record.task_id, by=who.name)
    except InvalidTransition:
        status = await objects.batch_status(orch, await orch.store.get(record.task_id, with_spec=False))
        raise InvalidTransition(
            f"batch {batch_id} is {status}; only a batch that has not ended can be cancelled"
        ) from None
    return await objects.batch_object(orch, await orch.store.get(record.task_id, with_spec=False))


@router.get("/batches", response_model=objects.BatchList)
@raises(BadRequest, Unavailable)
async def list_batches(
    orch: Orch,
    who: Caller,
    after: Annotated[str | None, Query(max_length=100, description="A batch id: list the ones older than it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The caller's batches, newest first."""
    index = keys.openai_batches(who.name)
    start = 0
    if after is not None:
        rank = await orch.redis.zrevrank(index, after.removeprefix(objects.BATCH_PREFIX))
        if rank is None:
            raise BadRequest(
                f"after {after[:100]!r} is not one of your batches; give the last id of the previous page",
                details=[{"path": "after", "message": "no such batch"}],
            )
        start = rank + 1
    records: list[TaskRecord | dict[str, Any]] = []
    more = False
    while len(records) <= limit:
        ids = await orch.redis.zrevrange(index, start, start + limit)
        if not ids:
            break
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        found: dict[str, TaskRecord | dict[str, Any]] = {
            record.task_id: record for record in await orch.store.get_many(ids)
        }
        found |= await objects.failed_batches(orch, [task_id for task_id in ids if task_id not in found])
        gone = [task_id for task_id in ids if task_id not in found]
        if gone:
            # Tasks past their retention are forgotten; so are their batches.
            await orch.redis.zrem(index, *gone)
        records += [found[task_id] for task_id in ids if task_id in found]
        start += len(ids) - len(gone)
    if len(records) > limit:
        records, more = records[:limit], True
    return _page(
        [entry if isinstance(entry, dict) else await objects.batch_object(orch, entry) for entry in records], more
    )


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """One page of an OpenAI list: its objects, the first and last ids (for ``after``), whether more follow."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
