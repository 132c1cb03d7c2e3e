"""Admin endpoints: cleanup of stale workers and user tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from mloc import users
from mloc.api.deps import Admin, Orch

router = APIRouter(tags=["admin"])


@router.post("/admin/cleanup")
@router.post("/api/v1/admin/cleanup")
async def cleanup(orch: Orch, who: Admin) -> dict[str, Any]:
    """Mark workers silent for longer than HEARTBEAT_TTL_SEC as lost and requeue their tasks now."""
    report = await orch.cleanup()
    return {"ok": True, **report.to_dict()}


class NewUser(BaseModel):
    name: str = Field(..., min_length=1, max_length=128)


@router.post("/admin/users", status_code=201)
@router.post("/api/v1/admin/users", status_code=201)
async def add_user(body: NewUser, orch: Orch, who: Admin) -> dict[str, Any]:
    token = await users.add_user(orch.redis, body.name)
    return {"ok": True, "name": body.name, "token": token, "note": "shown once; only its hash is stored"}


@router.get("/admin/users")
@router.get("/api/v1/admin/users")
async def list_users(orch: Orch, who: Admin) -> dict[str, Any]:
    return {"ok": True, "items": await users.list_users(orch.redis)}


@router.delete("/admin/users/{name}")
@router.delete("/api/v1/admin/users/{name}")
async def remove_user(name: str, orch: Orch, who: Admin) -> dict[str, Any]:
    await users.remove_user(orch.redis, name)
    return {"ok": True, "name": name}
