"""/api/v1/tasks: submit, list, show, result, cancel, resume, logs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from starlette.routing import BaseRoute

from mloc import keys, tasklog
from mloc.api.answers import BulkDryRun, BulkSubmitted, DryRun, Submitted, TaskDetail, TaskPage, TaskResult
from mloc.api.deps import Caller, Orch, TaskId
from mloc.api.responses import raises
from mloc.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    SpecError,
    SubmitInProgress,
)
from mloc.orchestrator import chunks, groups, idempotency
from mloc.orchestrator.cancel import cancel
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal
from mloc.records import TaskRecord, current_metrics
from mloc.spec import Document, parse_body, validate
from mloc.spec.loader import parse_stream
from mloc.spec.registry import spec_types
from mloc.state import TaskState
from mloc.store import Cursor, task_not_found

SUBMIT_PATH = "/api/v1/tasks"
router = APIRouter(prefix=SUBMIT_PATH, tags=["tasks"])

TASK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "text/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/Task"}},
        },
        "description": "A mloc/v1 task as YAML or JSON (see GET /api/v1/schema).",
    }
}

LOG_SOURCES = ", ".join(source.value for source in tasklog.Source)
LOG_STREAM: dict[str, Any] = {
    "description": "The lines as JSON, or with `follow=true` a stream of server-sent events.",
    # Under OpenAPI 3.1 the schema of an event stream describes each event.
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": (
                    "A log entry (`id`, `data`), a comment while nothing is written, or the last event, `end`, "
                    'whose data is {"state": FINAL, "reason": TEXT}.'
                ),
                "properties": {
                    "id": {"type": "string", "description": "The entry's id; `since=ID` resumes after it."},
                    # A log entry carries no event line, which an event-stream reader takes as "message".
                    "event": {"type": "string", "enum": ["message", "end"]},
                    "data": {"type": "string", "contentMediaType": "application/json"},
                },
                "required": ["data"],
            }
        }
    },
}


def _own(record: TaskRecord, who: Principal) -> TaskRecord:
    if not who.admin and record.owner != who.name:
        # The very answer a missing task gets, so ids of other users' tasks are not disclosed.
        raise task_not_found(record.task_id)
    return record


# Documented only: the answers are sent as built (see mloc.api.answers).
REPLAYED = {
    idempotency.REPLAYED_HEADER: {
        "description": "`true` when this is the answer to an earlier send of the same request (Idempotency-Key).",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
SUBMIT_ANSWER: dict[int | str, dict[str, Any]] = {
    201: {
        "model": Submitted | DryRun,
        "description": "The task stored and placed, or with dry_run=true checked.",
        "headers": REPLAYED,
    }
}
BULK_ANSWER: dict[int | str, dict[str, Any]] = {
    201: {
        "model": BulkSubmitted | BulkDryRun,
        "description": "Every task stored, or with dry_run=true checked.",
        "headers": REPLAYED,
    }
}


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        description=(
            "Makes the submit safe to send again: the same request with the same key (per user, for "
            "MLOC_IDEMPOTENCY_TTL_SEC) answers as the first did, with `Idempotent-Replayed: true`, and stores "
            "nothing new. 409 while the first is still being stored; 422 if the key came with another request. "
            "Ignored with dry_run=true."
        ),
    ),
]


@router.post("", status_code=201, openapi_extra=TASK_BODY, responses=SUBMIT_ANSWER)
@raises(BadRequest, Forbidden, SpecError, SubmitInProgress, IdempotencyKeyReused)
async def submit(
    request: Request,
    orch: Orch,
    who: Caller,
    dry_run: Annotated[bool, Query(description="Validate and show placement only.")] = False,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Submit a task. The answer names the worker it was placed on, or why it waits."""
    # A Response is sent as is, skipping FastAPI's validation of a plain dict. A plain submit (no
    # query) is answered before it gets here, by mloc.api.submit_lane.
    body = await request.body()
    content_type = request.headers.get("content-type")
    return submitted(await submit_body(orch, who, body, content_type, dry_run=dry_run, key=idempotency_key))


async def submit_body(
    orch: Orchestrator,
    who: Principal,
    body: bytes,
    content_type: str | None,
    *,
    dry_run: bool = False,
    key: str | None = None,
) -> idempotency.Answered:
    """A submit's answer: the task in ``body`` validated, then stored and placed (or only checked);
    with an Idempotency-Key ``key``, stored once however often it is sent."""
    checked = None if key is None or dry_run else idempotency.checked_key(key)
    if checked is None:
        document = validate(parse_body(body, content_type, limit=orch.settings.max_body_bytes))
        if dry_run:
            return idempotency.Answered(await orch.dry_run(document, who))
        return idempotency.Answered(await orch.submit(document, who))
    # Claimed while the body is validated: the claim's round trip overlaps the validation.
    digest = idempotency.request_digest(SUBMIT_PATH, content_type, body)
    claim = orch.idempotency.claim(who.name, checked, digest, 1)
    try:
        document = validate(parse_body(body, content_type, limit=orch.settings.max_body_bytes))
    except BaseException:
        await orch.idempotency.drop(claim)
        raise

    async def store(ids: list[str]) -> dict[str, Any]:
        return await orch.submit(document, who, task_id=ids[0])

    return await orch.idempotency.run(claim, store, bulk=False)


def submitted(answered: idempotency.Answered) -> JSONResponse:
    """A submit's 201, saying so when it is the answer to an earlier send of the same request."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if answered.replayed else None
    return JSONResponse(answered.body, status_code=201, headers=headers)


def submit_route(routes: Iterable[BaseRoute]) -> APIRoute:
    """The submit operation among ``routes``."""
    return next(route for route in routes if isinstance(route, APIRoute) and route.endpoint is submit)


@router.post("/bulk", status_code=201, openapi_extra=TASK_BODY, responses=BULK_ANSWER)
@raises(BadRequest, Forbidden, PayloadTooLarge, SpecError, SubmitInProgress, IdempotencyKeyReused)
async def submit_bulk(
    request: Request,
    orch: Orch,
    who: Caller,
    dry_run: Annotated[bool, Query(description="Validate every task and show placement only.")] = False,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Submit many tasks at once: a JSON list, {"tasks": [...]}, or a multi-document YAML stream
    (empty documents, as a trailing ``---`` leaves, are skipped). All are validated first; if any is
    invalid, none is stored. The body may be 16 times MLOC_MAX_BODY_BYTES, each task in it no larger
    than that limit, as when it is submitted alone."""
    raw = await request.body()
    content_type = request.headers.get("content-type") or ""
    key = None if idempotency_key is None or dry_run else idempotency.checked_key(idempotency_key)
    limit = orch.settings.max_body_bytes
    items: Any
    if raw.lstrip().startswith((b"[", b"{")) or "json" in content_type:
        items = parse_body(raw, "application/json", limit=limit * 16)
        if isinstance(items, dict):
            items = items.get("tasks")
    else:
        items = [item for item in parse_stream(raw, limit=limit * 16) if item is not None]
    if not isinstance(items, list) or not items:
        raise BadRequest('send a non-empty JSON list of tasks, {"tasks": [...]}, or YAML documents')
    if len(raw) > limit:  # else no task in it can be over the limit
        _check_task_sizes(items, limit)
    claim = None
    if key is not None:  # claimed while the tasks are validated
        digest = idempotency.request_digest(request.url.path, content_type, raw)
        claim = orch.idempotency.claim(who.name, key, digest, len(items))
    try:
        documents = _valid(items)
    except BaseException:
        if claim is not None:
            await orch.idempotency.drop(claim)
        raise
    if dry_run:
        checked = await orch.dry_run_many(documents, who)
        return JSONResponse({"ok": True, "valid": True, "count": len(checked), "tasks": checked}, status_code=201)

    async def store(ids: list[str] | None) -> dict[str, Any]:
        results = await orch.submit_many(documents, who, ids=ids)
        return {"ok": True, "count": len(results), "tasks": results}

    if claim is None:
        return submitted(idempotency.Answered(await store(None)))
    return submitted(await orch.idempotency.run(claim, store, bulk=True))


def _valid(items: list[Any]) -> list[Document]:
    """Every task of a bulk submit validated, or SpecError naming each invalid one."""
    documents: list[Document] = []
    problems = []
    for index, item in enumerate(items):
        try:
            documents.append(validate(item))
        except SpecError as exc:
            problems.append({"index": index, "message": exc.message, "details": exc.details})
    if problems:
        raise SpecError(
            f"{len(problems)} of {len(items)} tasks are invalid; nothing was stored",
            details=problems[:50],
        )
    return documents


def _check_task_sizes(items: list[Any], limit: int) -> None:
    """Refuse a bulk submit holding a task larger than ``limit`` (MLOC_MAX_BODY_BYTES), which the task
    alone would be refused for. A task is measured as compact JSON, whatever form it came in."""
    for index, item in enumerate(items):
        try:
            size = len(orjson.dumps(item, default=str, option=orjson.OPT_NON_STR_KEYS))
        except orjson.JSONEncodeError:
            continue  # nested past what orjson writes: validation refuses it as too deep
        if size > limit:
            message = (
                f"task {index} of the bulk submit is {size} bytes as JSON; each task is held to MLOC_MAX_BODY_BYTES "
                f"({limit} bytes), as when submitted alone"
            )
            raise PayloadTooLarge(message, details=[{"index": index, "message": message}])


def _blank_is_none(value: object) -> object:
    # A filter given empty (`state=`, as a form or a template sends it) is no filter, as `owner=` is.
    return None if value == "" else value


@router.get("", responses={200: {"model": TaskPage}})
@raises(BadRequest, Forbidden)
async def list_tasks(
    orch: Orch,
    who: Caller,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 20,
    state: Annotated[TaskState | None, BeforeValidator(_blank_is_none)] = None,
    owner: Annotated[str | None, Query(max_length=128)] = None,
    task_type: Annotated[str | None, Query(max_length=64)] = None,
    children: Annotated[
        bool,
        BeforeValidator(lambda value: value or False),
        Query(description="Also the tasks that make up another: a dataset task's chunks, a replica group's shards."),
    ] = False,
    after: Annotated[
        str | None,
        Query(
            max_length=200,
            description=(
                "The page after this cursor (a page's `next_after`), in place of `page`: tasks submitted or "
                "ended meanwhile do not shift it, so walking with it lists each task once."
            ),
        ),
    ] = None,
) -> Response:
    """Tasks, newest first; a user sees their own, the admin everyone's."""
    cursor = _cursor(after, page)
    if not who.admin and owner not in (None, who.name):
        # Answering with the caller's own tasks would read as the other user's.
        raise Forbidden(f"you may list only your own tasks; leave out owner= or give owner={who.name}")
    if not who.admin:
        owner = who.name
    items, total, last = await orch.store.page(
        page=page, page_size=page_size, state=state, owner=owner, task_type=task_type, children=children, after=cursor
    )
    if not total and task_type:
        # A misspelt type matches nothing, which must not read as "no such tasks".
        known = sorted(spec_types())
        if task_type not in known:
            raise BadRequest(
                f"task_type {task_type[:64]!r} is not a task type MLOC knows; give one of {', '.join(known)}",
                details=[{"path": "task_type", "message": "unknown task type"}],
            )
    rows = [item.model_dump(mode="json", exclude={"spec"}) for item in items]
    waiting = [row for row in rows if row["state"] == TaskState.PENDING]
    for row, position in zip(waiting, await orch.queue_positions([row["task_id"] for row in waiting]), strict=True):
        row["queue_position"] = position
    body = {
        "ok": True,
        "page": page,
        "page_size": page_size,
        "total": total,
        "items": rows,
        "next_after": last.encode() if last else None,
    }
    # Sent as is: FastAPI's encoder would walk the page again, which costs as much as reading it.
    return Response(orjson.dumps(body), media_type="application/json")


def _cursor(after: str | None, page: int) -> Cursor | None:
    if after is None:
        return None
    if page != 1:
        raise BadRequest("give page= or after=, not both: after= is the page after a page's next_after")
    cursor = Cursor.decode(after)
    if cursor is None:
        raise BadRequest(
            f"after={after[:80]!r} is not a cursor: give the next_after of the page before, as it was answered",
            details=[{"path": "after", "message": "not a cursor"}],
        )
    return cursor


@router.get("/{task_id}", responses={200: {"model": TaskDetail}})
@raises(NotFound)
async def show_task(task_id: TaskId, orch: Orch, who: Caller) -> Response:
    record = _own(await orch.store.get(task_id), who)
    body = record.model_dump(mode="json")
    body["ok"] = True
    # A waiting task's place in the queue and about when it starts.
    body["queue"] = await orch.queue_estimate(record)
    if record.chunk_rows:
        body["progress"] = await chunks.live_progress(orch.store, record)
    elif record.children:
        body["progress"] = await groups.live_progress(orch.store, record)
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/{task_id}/result", responses={200: {"model": TaskResult}})
@raises(NotFound)
async def task_result(task_id: TaskId, orch: Orch, who: Caller) -> JSONResponse:
    """The task's full result (responses.json), readable wherever the worker ran."""
    record = _own(await orch.store.get(task_id, with_spec=False), who)
    result = await orch.store.result(task_id)
    if result is None:
        yet = "" if record.state.terminal else " yet"
        lines = f"; the lines its chunks finished: mloc results {task_id}" if record.chunk_rows else ""
        raise NotFound(f"task {task_id} has no result{yet} (it is {record.state}){lines}")
    return JSONResponse(result)


@router.get("/{task_id}/metrics")
@raises(NotFound)
async def task_metrics(
    task_id: TaskId,
    orch: Orch,
    who: Caller,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> dict[str, Any]:
    """Per-step metrics an executor reported (loss, reward, KL, learning rate...), oldest first, each
    with the ``run`` (attempt) that logged it; a step a later run trained again (from a checkpoint)
    is that run's."""
    _own(await orch.store.get(task_id, with_spec=False), who)
    rows = await orch.redis.lrange(keys.task_metrics(task_id), -limit, -1)
    return {"ok": True, "task_id": task_id, "metrics": current_metrics([json.loads(row) for row in rows])}


@router.post("/{task_id}/cancel")
@raises(NotFound, InvalidTransition)
async def cancel_task(task_id: TaskId, orch: Orch, who: Caller) -> dict[str, Any]:
    _own(await orch.store.get(task_id, with_spec=False), who)
    outcome = await cancel(orch.store, task_id, by=who.name)
    state = "cancelling" if outcome.state == TaskState.CANCELLING else "cancelled"
    return {"ok": True, "task_id": task_id, "state": state}


@router.post("/{task_id}/resume")
@raises(NotFound, Conflict)
async def resume_task(task_id: TaskId, orch: Orch, who: Caller) -> dict[str, Any]:
    """Run a failed or cancelled task again from where it stopped: a dataset task's finished chunks
    (and their result lines) stand and the others run again; a training task goes back to the queue and
    continues from its last checkpoint (``checkpoint`` and ``from_step`` in the answer, null when it
    saved none and starts over)."""
    _own(await orch.store.get(task_id, with_spec=False), who)
    return await orch.resume(task_id, who)


@router.get("/{task_id}/logs", responses={200: LOG_STREAM})
@raises(NotFound, BadRequest)
async def task_logs(
    task_id: TaskId,
    orch: Orch,
    who: Caller,
    follow: bool = False,
    since: Annotated[str, Query(max_length=64, description=f"Entries from then on: {tasklog.SINCE_FORMS}.")] = "0",
    source: Annotated[
        str | None, Query(max_length=200, description="Only these sources, comma-separated: " + LOG_SOURCES + ".")
    ] = None,
    tail: Annotated[int | None, Query(ge=1, le=10_000, description="Only the last N entries (then follow).")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[
        str | None,
        Query(
            pattern=r"^\d{1,20}-\d{1,20}$",
            description="Entries after this entry id (a page's `next`, when `more` said the page was cut); "
            "since's time still applies.",
        ),
    ] = None,
) -> Any:
    """Log entries of a task (``ts``, ``level``, ``source``, ``text``, and ``event`` on lifecycle lines),
    oldest first; ``follow=true`` streams them (server-sent events) until the task ends."""
    _own(await orch.store.get(task_id, with_spec=False), who)
    try:
        start, sources = tasklog.parse_since(since), tasklog.parse_sources(source)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if after:
        start = tasklog.Since(after_id=after, ts=start.ts)
    if not follow:
        page = await tasklog.read(orch.redis, task_id, sources=sources, since=start, tail=tail, limit=limit)
        body = {"ok": True, "task_id": task_id, "lines": page.entries, "next": page.next_id, "more": page.more}
        return Response(orjson.dumps(body), media_type="application/json")

    async def events() -> AsyncIterator[bytes]:
        async for item in tasklog.follow(orch.redis, task_id, sources=sources, since=start, tail=tail):
            if item is None:
                yield b": still following\n\n"
            elif isinstance(item, tasklog.End):
                end = {"state": item.state, "reason": item.reason}
                yield b"event: end\ndata: " + orjson.dumps(end) + b"\n\n"
                return
            else:
                yield f"id: {item['id']}\n".encode() + b"data: " + orjson.dumps(item) + b"\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
