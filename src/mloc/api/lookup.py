"""/api/v1/task-ids and /api/v1/pipeline-ids: which tasks or pipelines an id prefix names, so clients
accept short ids as git and docker do."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query

from mloc import keys
from mloc.api.deps import Caller, Orch

router = APIRouter(tags=["tasks"])
Prefix = Annotated[
    str, Query(min_length=1, max_length=36, pattern=r"^[0-9a-fA-F-]+$", description="The start of an id.")
]
Limit = Annotated[int, Query(ge=1, le=50, description="Most matches to list.")]


@router.get("/api/v1/task-ids")
async def task_ids(orch: Orch, who: Caller, prefix: Prefix, limit: Limit = 10) -> dict[str, Any]:
    """The tasks (yours; every task for the admin) whose id starts with ``prefix``: one item means the
    prefix is unique. ``more`` says whether further tasks match beyond ``limit``."""
    prefix = prefix.lower()
    found, more = _first(await orch.store.ids_starting_with(prefix, None if who.admin else who.name, most=limit), limit)
    pipe = orch.redis.pipeline(transaction=False)
    for task_id in found:
        pipe.hmget(keys.task(task_id), "name", "state", "created_at")
    items = [
        {"task_id": task_id, "name": name or "", "state": state, "created_at": float(created or 0)}
        for task_id, (name, state, created) in zip(found, await pipe.execute() if found else [], strict=True)
        if state is not None  # an index entry whose record retention just removed
    ]
    return {"ok": True, "prefix": prefix, "items": items, "more": more}


@router.get("/api/v1/pipeline-ids", tags=["pipelines"])
async def pipeline_ids(orch: Orch, who: Caller, prefix: Prefix, limit: Limit = 10) -> dict[str, Any]:
    """The pipelines (yours; every one for the admin) whose id starts with ``prefix``, as
    ``/api/v1/task-ids`` lists tasks."""
    prefix = prefix.lower()
    owner = None if who.admin else who.name
    found, more = _first(await orch.store.pipeline_ids_starting_with(prefix, owner, most=limit), limit)
    pipe = orch.redis.pipeline(transaction=False)
    for pipeline_id in found:
        pipe.get(keys.pipeline(pipeline_id))
    items = [
        {"pipeline_id": pipeline_id, "created_at": body["created_at"], "steps": [t["name"] for t in body["tasks"]]}
        for pipeline_id, raw in zip(found, await pipe.execute() if found else [], strict=True)
        if raw is not None and (body := json.loads(raw))
    ]
    return {"ok": True, "prefix": prefix, "items": items, "more": more}


def _first(found: list[str], limit: int) -> tuple[list[str], bool]:
    """The first ``limit`` ids in order, and whether more matched."""
    return sorted(found[:limit]), len(found) > limit
