"""Workers, in both seeds' spellings: /workers and /api/v1/workers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from mloc.api.deps import Caller, Orch, WorkerId

router = APIRouter(tags=["workers"])


@router.get("/workers")
@router.get("/api/v1/workers")
async def list_workers(orch: Orch, who: Caller) -> dict[str, Any]:
    records = await orch.registry.records()
    return {"ok": True, "total": len(records), "items": [r.model_dump(mode="json") for r in records]}


@router.get("/workers/{worker_id}")
@router.get("/api/v1/workers/{worker_id}")
async def show_worker(worker_id: WorkerId, orch: Orch, who: Caller) -> dict[str, Any]:
    record = await orch.registry.record(worker_id)
    return {"ok": True, **record.model_dump(mode="json")}
