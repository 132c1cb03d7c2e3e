"""Admin endpoints: cleanup of stale workers, user tokens, quotas, budgets and fair-share weights."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mloc.api.deps import Admin, BudgetReader, Orch
from mloc.api.responses import raises
from mloc.errors import BadRequest, Conflict, NotFound
from mloc.orchestrator import budgets, cancel, fairshare, users
from mloc.state import Reason

router = APIRouter(tags=["admin"])
# What an admin changes is logged (the operator's record of who did what), never a token.
log = logging.getLogger(__name__)


@router.post("/admin/cleanup")
@router.post("/api/v1/admin/cleanup")
async def cleanup(orch: Orch, who: Admin) -> dict[str, Any]:
    """Mark workers silent for longer than HEARTBEAT_TTL_SEC as lost and requeue their tasks now."""
    report = await orch.cleanup()
    log.info("cleanup by %s: %s", who.name, report.to_dict())
    return {"ok": True, **report.to_dict()}


QUOTA_LIMIT = 1_000_000


class NewUser(BaseModel):
    name: str = Field(..., min_length=1, max_length=128)
    max_tasks: int | None = Field(
        None,
        ge=0,
        le=QUOTA_LIMIT,
        strict=True,
        description="Tasks assigned or running at once; 0 = unlimited; unset = default.",
    )
    max_gpus: int | None = Field(
        None, ge=0, le=QUOTA_LIMIT, strict=True, description="GPUs held at once; 0 = unlimited; unset = default."
    )


class QuotaBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tasks: int | None = Field(
        None, ge=0, le=QUOTA_LIMIT, strict=True, description="0 = unlimited; unset = unchanged."
    )
    max_gpus: int | None = Field(
        None, ge=0, le=QUOTA_LIMIT, strict=True, description="0 = unlimited; unset = unchanged."
    )
    reset: bool = Field(False, description="Return both limits to the defaults first.")


def _defaults(orch: Orch) -> dict[str, int]:
    return {"default_tasks": orch.settings.user_max_tasks, "default_gpus": orch.settings.user_max_gpus}


@router.post("/admin/users", status_code=201)
@router.post("/api/v1/admin/users", status_code=201)
@raises(BadRequest, Conflict)
async def add_user(body: NewUser, orch: Orch, who: Admin) -> dict[str, Any]:
    token = await users.add_user(orch.redis, body.name, users.Quota(body.max_tasks, body.max_gpus))
    state = await users.usage_and_quota(orch.redis, [body.name], **_defaults(orch))
    limits = [("default" if n is None else n) for n in (body.max_tasks, body.max_gpus)]
    log.info("user %s added by %s (max tasks %s, max GPUs %s)", body.name, who.name, *limits)
    return {
        "ok": True,
        "name": body.name,
        "token": token,
        "note": "shown once; only its hash is stored",
        **state[body.name],
    }


@router.get("/admin/users")
@router.get("/api/v1/admin/users")
async def list_users(orch: Orch, who: Admin) -> dict[str, Any]:
    """Users with their limits and what they hold now."""
    return {"ok": True, "items": await users.list_users(orch.redis, **_defaults(orch))}


@router.put("/admin/users/{name}/quota")
@router.put("/api/v1/admin/users/{name}/quota")
@raises(BadRequest, NotFound)
async def set_quota(name: str, body: QuotaBody, orch: Orch, who: Admin) -> dict[str, Any]:
    """Set a user's limits: ``max_tasks`` assigned or running at once, ``max_gpus`` held at once.
    Fields left out are kept; ``reset: true`` returns both to MLOC_USER_MAX_TASKS / MLOC_USER_MAX_GPUS."""
    if body.max_tasks is None and body.max_gpus is None and not body.reset:
        raise BadRequest('give max_tasks and/or max_gpus (0 = unlimited), or "reset": true for the defaults')
    await users.set_quota(orch.redis, name, users.Quota(body.max_tasks, body.max_gpus), reset=body.reset)
    state = await users.usage_and_quota(orch.redis, [name], **_defaults(orch))
    log.info("quota of user %s set by %s: %s", name, who.name, state[name].get("quota"))
    return {"ok": True, "name": name, **state[name]}


@router.get("/admin/users/{name}/quota")
@router.get("/api/v1/admin/users/{name}/quota")
@raises(NotFound)
async def show_quota(name: str, orch: Orch, who: Admin) -> dict[str, Any]:
    """A user's limits and what they hold now (tasks assigned or running, GPUs)."""
    await users.require_user(orch.redis, name)
    state = await users.usage_and_quota(orch.redis, [name], **_defaults(orch))
    return {"ok": True, "name": name, **state[name]}


@router.delete("/admin/users/{name}")
@router.delete("/api/v1/admin/users/{name}")
@raises(NotFound)
async def remove_user(name: str, orch: Orch, who: Admin) -> dict[str, Any]:
    """Remove a user: their token stops working at once, their quota, budgets and weight go, and
    their tasks that have not started are cancelled (reason code ``user_removed``). Tasks already
    running finish (``running`` lists them; cancel them to stop them)."""
    await users.remove_user(orch.redis, name)
    # After the token is gone, so nothing the user submits meanwhile escapes the sweep.
    cancelled = await cancel.cancel_unstarted(
        orch.store,
        name,
        by=who.name,
        reason=f"cancelled: its owner, user {name}, was removed by {who.name} before it started",
        reason_code=Reason.USER_REMOVED,
    )
    running = await cancel.running_of(orch.store, name)
    log.info(
        "user %s removed by %s: %d unstarted task(s) cancelled, %d running left to finish",
        name,
        who.name,
        len(cancelled),
        len(running),
    )
    return {"ok": True, "name": name, "cancelled": cancelled, "running": running}


@router.post("/admin/users/{name}/token")
@router.post("/api/v1/admin/users/{name}/token")
@raises(BadRequest, NotFound, Conflict)
async def rotate_token(name: str, orch: Orch, who: Admin) -> dict[str, Any]:
    """Issue a new token for a user and revoke the old one at once; their quota, budgets, weight and
    tasks stay as they are."""
    token = await users.rotate_token(orch.redis, name)
    log.info("token of user %s replaced by %s; the old one is revoked", name, who.name)
    note = "shown once; only its hash is stored; the old token no longer works"
    return {"ok": True, "name": name, "token": token, "note": note}


Amount = int | float | str | None


class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: str = Field("month", description="The UTC period each limit given here covers: day or month.")
    tokens: Amount = Field(None, description="Prompt and completion tokens: 1000000, '1M', '500k', '2G'.")
    tokens_in: Amount = Field(None, description="Prompt tokens, as tokens.")
    tokens_out: Amount = Field(None, description="Completion tokens, as tokens.")
    gpu_time: Amount = Field(None, description="GPU-seconds: 36000, '10h', '90m', '45s'.")
    cpu_time: Amount = Field(None, description="CPU-seconds (wall time times the cores asked for), as gpu_time.")
    gpu_model: str | None = Field(
        None, max_length=128, description="gpu_time counts this GPU model only ('A100'); unset: every model."
    )
    hard: bool = Field(False, description="Also cancel the user's running tasks once over (default: they finish).")

    @field_validator("tokens", "tokens_in", "tokens_out", "gpu_time", "cpu_time", mode="before")
    @classmethod
    def _not_a_flag(cls, value: Any) -> Any:
        # JSON's true would pass as the number 1.
        if isinstance(value, bool):
            raise ValueError("a budget is an amount ('1M', 36000, '10h'), not true or false")
        return value


class WeightBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(..., description="Fair-share weight: above 0, at most 1000; 1 = an equal share.")


async def _budgets(orch: Orch, name: str) -> dict[str, Any]:
    standing = (await orch.scheduler.standings.read([name]))[name]
    return {"ok": True, "name": name, "budgets": [s.to_dict() for s in standing.budgets]}


@router.put("/admin/users/{name}/budget")
@router.put("/api/v1/admin/users/{name}/budget")
@raises(BadRequest, NotFound)
async def set_budget(name: str, body: BudgetBody, orch: Orch, who: Admin) -> dict[str, Any]:
    """Set budgets for one period (limits given replace those of the same metric, model and period).
    A user over a budget waits; a raised budget or a new period lets their tasks run at the next pass."""
    limits = {
        "tokens": body.tokens,
        "tokens_in": body.tokens_in,
        "tokens_out": body.tokens_out,
        "gpu_time": body.gpu_time,
        "cpu_time": body.cpu_time,
    }
    chosen = budgets.budgets_of(body.period, limits, gpu_model=body.gpu_model, hard=body.hard)
    await budgets.set_budgets(orch.redis, name, chosen)
    log.info("budgets of user %s set by %s: %s", name, who.name, {k: v for k, v in limits.items() if v is not None})
    return await _budgets(orch, name)


@router.get("/admin/users/{name}/budget")
@router.get("/api/v1/admin/users/{name}/budget")
@raises(NotFound)
async def show_budget(name: str, orch: Orch, who: BudgetReader) -> dict[str, Any]:
    """A user's budgets with what they spent in the current day or month, and when each resets."""
    await users.require_user(orch.redis, name)
    return await _budgets(orch, name)


@router.delete("/admin/users/{name}/budget")
@router.delete("/api/v1/admin/users/{name}/budget")
@raises(BadRequest, NotFound)
async def remove_budget(
    name: str,
    orch: Orch,
    who: Admin,
    metric: str | None = Query(None, description="Only this metric's budgets (tokens, tokens_in, ...)."),
    period: str | None = Query(None, description="Only this period's budgets (day, month)."),
) -> dict[str, Any]:
    """Remove a user's budgets: all of them, or those of one metric and/or period."""
    removed = await budgets.remove_budgets(orch.redis, name, metric=metric, period=period)
    log.info("budgets of user %s removed by %s: %s", name, who.name, removed)
    return {**await _budgets(orch, name), "removed": removed}


@router.put("/admin/users/{name}/weight")
@router.put("/api/v1/admin/users/{name}/weight")
@raises(BadRequest, NotFound)
async def set_weight(name: str, body: WeightBody, orch: Orch, who: Admin) -> dict[str, Any]:
    """Set a user's fair-share weight: 2 gets twice the share of a user at 1 when both wait."""
    weight = await fairshare.set_weight(orch.redis, name, body.weight)
    log.info("fair-share weight of user %s set to %s by %s", name, weight, who.name)
    return {"ok": True, "name": name, "weight": weight}
