"""/api/v1/tasks/{id}/artifacts: the files a task left, listed and downloaded from any host."""

from __future__ import annotations

import asyncio
import mimetypes
import posixpath
from typing import IO, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from mloc import artifacts
from mloc.api.deps import Caller, Orch, TaskId
from mloc.api.responses import raises
from mloc.api.tasks import _own
from mloc.errors import BadRequest, NotFound, Unavailable
from mloc.records import TaskRecord
from mloc.state import TaskState

router = APIRouter(prefix="/api/v1/tasks", tags=["artifacts"])


async def _listing(orch: Orch, record: TaskRecord) -> artifacts.Listing:
    if record.children and record.state != TaskState.SUCCEEDED:
        # Such a parent has no worker: its files are written when its last chunk or replica has ended well.
        part, what = ("chunk", "a dataset task") if record.chunk_rows else ("replica", "a replica group")
        lines = f"; its result lines so far: mloc results {record.task_id}" if record.chunk_rows else ""
        raise NotFound(
            f"task {record.task_id} has no files: it is {record.state}, and {what} has files of its own only once "
            f"it succeeds. Each {part} has its own (mloc artifacts {part.upper()}_ID; `mloc show {record.task_id} "
            f"--json` lists them){lines}"
        )
    try:
        return await asyncio.to_thread(
            artifacts.listing, orch.settings, record.task_id, record.state.value, record.attempts, record.worker_id
        )
    except OSError as exc:
        raise Unavailable(f"the artifact store cannot be read: {type(exc).__name__}: {exc}") from exc


async def open_listed(orch: Orch, found: artifacts.Listing, path: str, task_id: str) -> IO[bytes]:
    """A listed file of a task, opened in a thread (the store may be remote); a file the listing names
    but the store lacks, or a store that cannot be read, answers 503."""
    try:
        return await asyncio.to_thread(artifacts.open_artifact, orch.settings, found, path)
    except FileNotFoundError as exc:
        raise Unavailable(f"artifact {path!r} of task {task_id} is listed but missing from the store") from exc
    except OSError as exc:
        raise Unavailable(f"the artifact store cannot be read: {type(exc).__name__}: {exc}") from exc


@router.get("/{task_id}/artifacts")
@raises(NotFound, Unavailable)
async def list_artifacts(task_id: TaskId, orch: Orch, who: Caller) -> dict[str, Any]:
    """The task's result files (path relative to its folder, size in bytes)."""
    record = _own(await orch.store.get(task_id, with_spec=False), who)
    found = await _listing(orch, record)
    return {
        "ok": True,
        "task_id": task_id,
        "source": found.source,
        "attempt": found.attempt,
        "items": [{"path": item.path, "size": item.size} for item in found.items],
    }


@router.get(
    "/{task_id}/artifacts/{path:path}",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes; the media type follows its name (application/octet-stream if unknown).",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
@raises(BadRequest, NotFound, Unavailable)
async def download_artifact(
    task_id: TaskId,
    orch: Orch,
    who: Caller,
    path: Annotated[str, PathParam(description="A path as the artifact list gives it.")],
) -> StreamingResponse:
    """One result file, streamed."""
    artifacts.check_path(path)
    record = _own(await orch.store.get(task_id, with_spec=False), who)
    found = await _listing(orch, record)
    item = found.find(path)
    handle = await open_listed(orch, found, path, task_id)
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    name = quote(posixpath.basename(path))
    headers = {"Content-Length": str(item.size), "Content-Disposition": f"attachment; filename*=UTF-8''{name}"}
    # A plain iterator: Starlette reads it in its thread pool, so a slow store never blocks the loop.
    return StreamingResponse(artifacts.chunks(handle), media_type=media, headers=headers)
