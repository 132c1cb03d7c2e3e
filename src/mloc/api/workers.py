"""Workers, in both seeds' spellings: /workers and /api/v1/workers."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response

from mloc.api.answers import WorkerPage
from mloc.api.deps import Admin, Caller, Orch, WorkerId
from mloc.api.responses import raises
from mloc.errors import Conflict, NotFound

router = APIRouter(tags=["workers"])
log = logging.getLogger(__name__)

_PAGE: dict[int | str, dict[str, Any]] = {200: {"model": WorkerPage}}


@router.get("/workers", responses=_PAGE)
@router.get("/api/v1/workers", responses=_PAGE)
async def list_workers(
    orch: Orch,
    who: Caller,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Registered workers by id, a page at a time (``total`` counts them all). A user sees only their
    own tasks' ids on each worker, and how many others it holds (``hidden_tasks``)."""
    ids = sorted(await orch.registry.ids())
    records = await orch.registry.records(ids[(page - 1) * page_size : page * page_size])
    body = {
        "ok": True,
        "page": page,
        "page_size": page_size,
        "total": len(ids),
        "items": await orch.workers_seen_by(who, records),
    }
    # Sent as is: FastAPI's encoder walks every value again, which costs more than building the page.
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/workers/{worker_id}")
@router.get("/api/v1/workers/{worker_id}")
@raises(NotFound)
async def show_worker(worker_id: WorkerId, orch: Orch, who: Caller) -> dict[str, Any]:
    """One worker; a user sees only their own tasks' ids on it, and how many others it holds."""
    (seen,) = await orch.workers_seen_by(who, [await orch.registry.record(worker_id)])
    return {"ok": True, **seen}


@router.post("/workers/{worker_id}/cordon")
@router.post("/api/v1/workers/{worker_id}/cordon")
@raises(NotFound, Conflict)
async def cordon_worker(worker_id: WorkerId, orch: Orch, who: Admin) -> dict[str, Any]:
    """Place no new task on a live worker (admin): it becomes draining, finishes what it runs and
    heartbeats on, until uncordoned or restarted. A worker that is not active is refused with 409."""
    before = await orch.registry.cordon(worker_id, on=True)
    log.info("worker %s cordoned by %s (it was %s): it takes no new task", worker_id, who.name, before)
    return {"ok": True, "worker_id": worker_id, "cordoned": True, "status": "draining", "was": before}


@router.post("/workers/{worker_id}/uncordon")
@router.post("/api/v1/workers/{worker_id}/uncordon")
@raises(NotFound, Conflict)
async def uncordon_worker(worker_id: WorkerId, orch: Orch, who: Admin) -> dict[str, Any]:
    """Place tasks on a cordoned worker again (admin); a worker draining because it stops is refused with 409."""
    before = await orch.registry.cordon(worker_id, on=False)
    log.info("worker %s uncordoned by %s (it was %s)", worker_id, who.name, before)
    return {"ok": True, "worker_id": worker_id, "cordoned": False, "status": "active", "was": before}


@router.delete("/workers/{worker_id}")
@router.delete("/api/v1/workers/{worker_id}")
@raises(NotFound, Conflict)
async def remove_worker(worker_id: WorkerId, orch: Orch, who: Admin) -> dict[str, Any]:
    """Forget a worker that is offline or lost (admin); one that is active, draining or restarting, or
    still holds tasks, is refused with 409."""
    status = await orch.registry.remove_stopped(worker_id)
    log.info("worker %s (%s) removed by %s", worker_id, status, who.name)
    return {"ok": True, "worker_id": worker_id, "removed": True, "status": status}
