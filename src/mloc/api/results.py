"""/api/v1/tasks/{id}/results: a dataset task's result lines (results.jsonl), streamed as NDJSON a page
at a time.

The lines are read where the artifact routes read a task's files: the artifact store once the task has
published them, else the orchestrator's RESULTS_DIR, where they grow while the task runs. A last line
without its newline is a batch still being written, and is left for the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Iterator
from typing import IO, Annotated, cast

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from mloc.api.artifacts import _listing, open_listed
from mloc.api.deps import Caller, Orch, TaskId
from mloc.api.responses import raises
from mloc.api.tasks import _own
from mloc.errors import Conflict, NotFound, Unavailable
from mloc.records import TaskRecord
from mloc.spec.dataset import RESULT_LINES
from mloc.state import TaskState

router = APIRouter(prefix="/api/v1/tasks", tags=["artifacts"])
NDJSON = "application/x-ndjson"
# Lines are sent in blocks of about this many bytes rather than one by one.
BLOCK = 64 * 1024


def page(handle: IO[bytes], offset: int, limit: int | None) -> Iterator[bytes]:
    """Whole lines ``offset`` to ``offset + limit`` of ``handle``, in blocks; closes it at the end."""
    with handle:
        block: list[bytes] = []
        size = sent = 0
        for number, line in enumerate(handle):
            if not line.endswith(b"\n"):
                break
            if number < offset:
                continue
            block.append(line)
            size += len(line)
            sent += 1
            if size >= BLOCK:
                yield b"".join(block)
                block, size = [], 0
            if limit is not None and sent >= limit:
                break
        if block:
            yield b"".join(block)


@router.get(
    "/{task_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One JSON object per line, one line per input row in input order: "
            '{"id", "output", "finish_reason", "prompt_tokens", "completion_tokens", "error"}.',
            "content": {NDJSON: {"schema": {"type": "string"}}},
        }
    },
)
@raises(Conflict, NotFound, Unavailable)
async def result_lines(
    task_id: TaskId,
    orch: Orch,
    who: Caller,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="Lines to skip (0-based).")] = 0,
    limit: Annotated[int | None, Query(ge=1, le=1_000_000, description="Lines to send at most; default all.")] = None,
) -> StreamingResponse:
    """A dataset inference task's result lines, a page at a time (they grow while the task runs)."""
    record = _own(await orch.store.get(task_id, with_spec=False), who)
    handle = await open_lines(orch, record)
    # A plain iterator: Starlette reads it in its thread pool, so a slow store never blocks the loop.
    return StreamingResponse(page(handle, offset, limit), media_type=NDJSON)


async def open_lines(orch: Orch, record: TaskRecord) -> IO[bytes]:
    """A task's result lines, in input order, as a binary file whose iteration gives lines (the last
    one may lack its newline while a batch is being written). Raises Conflict when it has none."""
    if record.chunk_rows and record.state != TaskState.SUCCEEDED:
        handles = await _chunk_lines(orch, record)
        if handles:
            return cast(IO[bytes], JoinedLines(handles))  # read only by iteration and close
    found = await _listing(orch, record)
    if not any(item.path == RESULT_LINES for item in found.items):
        # The task exists and is the caller's: what it lacks is lines, so not a 404 (which says "no such task").
        raise Conflict(
            f"task {record.task_id} has no result lines ({RESULT_LINES}): only inference tasks that read a dataset "
            f"(inference.input) write them; GET /api/v1/tasks/{record.task_id}/result has its result"
        )
    return await open_listed(orch, found, RESULT_LINES, record.task_id)


async def _chunk_lines(orch: Orch, record: TaskRecord) -> list[IO[bytes]]:
    """The lines of a dataset task's chunks so far, in row order: every chunk up to the first one not
    finished, and that one's lines as they grow (a succeeded task's are joined in one file)."""
    handles: list[IO[bytes]] = []
    try:
        for child_id in record.children:
            child = await orch.store.get(child_id, with_spec=False)
            try:
                found = await _listing(orch, child)
            except NotFound:
                # A running chunk publishes to the artifact store when it ends; its lines so far are read
                # where its worker writes them, when that is this orchestrator's RESULTS_DIR.
                if child.state != TaskState.SUCCEEDED:
                    with contextlib.suppress(OSError):  # none here: a worker on another host
                        growing = orch.settings.results_dir / child_id / RESULT_LINES
                        handles.append(await asyncio.to_thread(open, growing, "rb"))
                break
            if not any(item.path == RESULT_LINES for item in found.items):
                break
            handles.append(await open_listed(orch, found, RESULT_LINES, child_id))
            if child.state != TaskState.SUCCEEDED:
                break
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return handles


class JoinedLines(io.RawIOBase):
    """Several files read one after the other, line by line: the chunks' lines as one file."""

    def __init__(self, handles: list[IO[bytes]]) -> None:
        super().__init__()
        self.handles = handles

    def readable(self) -> bool:
        return True

    def __iter__(self) -> Iterator[bytes]:
        for handle in self.handles:
            yield from handle

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        super().close()
