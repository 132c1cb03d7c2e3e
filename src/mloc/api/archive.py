"""/api/v1/tasks/{id}/archive: a folder of a task's result files as one streamed tar archive."""

from __future__ import annotations

import logging
import posixpath
import tarfile
import time
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from mloc import artifacts
from mloc.api.artifacts import _listing
from mloc.api.deps import Caller, Orch, TaskId
from mloc.api.responses import raises
from mloc.api.tasks import _own
from mloc.errors import BadRequest, NotFound, Unavailable
from mloc.settings import Settings

router = APIRouter(prefix="/api/v1/tasks", tags=["artifacts"])
log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def _folders(items: list[artifacts.Artifact]) -> list[str]:
    found = set()
    for item in items:
        parent = posixpath.dirname(item.path)
        while parent:
            found.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(found)


def _members(found: artifacts.Listing, folder: str) -> list[tuple[artifacts.Artifact, str]]:
    """The files under ``folder`` with their names inside the archive (relative to that folder)."""
    if not folder:
        return [(item, item.path) for item in found.items]
    if any(item.path == folder for item in found.items):
        raise BadRequest(
            f"{folder!r} is a file of task {found.task_id}, not a folder; download it from "
            f"/api/v1/tasks/{found.task_id}/artifacts/{folder}"
        )
    head = folder + "/"
    members = [(item, item.path[len(head) :]) for item in found.items if item.path.startswith(head)]
    if not members:
        folders = _folders(found.items)
        named = ", ".join(repr(f) for f in folders[:20]) if folders else "none (all its files are at the top)"
        raise NotFound(
            f"task {found.task_id} has no artifact {folder!r} (no file or folder of that name); its folders: {named}"
        )
    return members


def _stream(
    settings: Settings, found: artifacts.Listing, members: list[tuple[artifacts.Artifact, bytes]]
) -> Iterator[bytes]:
    # Each file goes out in blocks as the store yields them: a multi-gigabyte checkpoint never sits in memory.
    for item, header in members:
        yield header
        sent = 0
        with artifacts.open_artifact(settings, found, item.path) as handle:
            while sent < item.size:
                block = handle.read(min(artifacts.CHUNK, item.size - sent))
                if not block:
                    # A short file would shift every later header: end the stream so the reader fails loudly.
                    log.error("task %s: artifact %s ended at %d of %d bytes", found.task_id, item.path, sent, item.size)
                    return
                sent += len(block)
                yield block
        if item.size % BLOCK:
            yield b"\0" * (BLOCK - item.size % BLOCK)
    yield END_OF_ARCHIVE


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


@router.get(
    "/{task_id}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}},
)
@raises(BadRequest, NotFound, Unavailable)
async def download_folder(
    task_id: TaskId,
    orch: Orch,
    who: Caller,
    path: Annotated[str, Query(max_length=4096, description="A folder the artifact list shows; empty: all.")] = "",
) -> StreamingResponse:
    """The files under one folder of the task's results as an uncompressed tar stream, their names
    relative to that folder (``mloc artifacts ID --get FOLDER`` unpacks it)."""
    folder = path.strip("/")
    if folder:
        artifacts.check_path(folder)
    record = _own(await orch.store.get(task_id, with_spec=False), who)
    found = await _listing(orch, record)
    mtime = int(record.finished_at or time.time())
    members = [(item, _header(name, item.size, mtime)) for item, name in _members(found, folder)]
    length = len(END_OF_ARCHIVE) + sum(len(h) + item.size + (-item.size % BLOCK) for item, h in members)
    archive = quote((posixpath.basename(folder) or task_id) + ".tar")
    headers = {"Content-Length": str(length), "Content-Disposition": f"attachment; filename*=UTF-8''{archive}"}
    # A plain iterator: Starlette reads it in its thread pool, so a slow store never blocks the loop.
    return StreamingResponse(_stream(orch.settings, found, members), media_type="application/x-tar", headers=headers)
