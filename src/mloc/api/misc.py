"""Health, readiness, usage statistics and the task JSON Schema."""

from __future__ import annotations

import asyncio
import re
from datetime import date
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from mloc import __version__
from mloc.api.answers import NotReady, Ready, Stats
from mloc.api.deps import Caller, Orch
from mloc.api.responses import raises
from mloc.errors import BadRequest, Forbidden
from mloc.orchestrator.orchestrator import MAX_STATS_USERS, STATS_PAGE_USERS
from mloc.orchestrator.usage import Grouping
from mloc.spec import json_schema

router = APIRouter()


# How long a health check waits for Redis. The client retries a lost Redis for 20-30 s, so that a task's
# moves land once it is back; a probe must answer within its own timeout (Kubernetes: a few seconds), or
# a Redis outage would get every orchestrator restarted by its liveness probe.
PING_TIMEOUT_SEC = 1.0


async def _redis_answers(orch: Orch) -> str | None:
    """None when Redis answers a PING within PING_TIMEOUT_SEC, else why not."""
    try:
        await asyncio.wait_for(orch.redis.ping(), PING_TIMEOUT_SEC)
    except TimeoutError:
        return f"no answer within {PING_TIMEOUT_SEC:g}s"
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


@router.get("/healthz", tags=["health"])
@router.get("/health", tags=["health"])
async def health(orch: Orch) -> dict[str, Any]:
    """Liveness: the process answers, at once. Redis reachability is reported, not required."""
    redis_ok = await _redis_answers(orch) is None
    return {"ok": True, "status": "ok", "version": __version__, "redis": "ok" if redis_ok else "unreachable"}


@router.get(
    "/readyz",
    tags=["health"],
    responses={
        200: {"model": Ready, "description": "Redis answers."},
        503: {"model": NotReady, "description": "Redis does not answer."},
    },
)
async def ready(orch: Orch) -> JSONResponse:
    """Readiness: 200 only when Redis answers (within a second: a probe is not kept waiting)."""
    problem = await _redis_answers(orch)
    if problem is not None:
        return JSONResponse({"ok": False, "status": "redis unreachable", "error": problem}, status_code=503)
    return JSONResponse({"ok": True, "status": "ready"})


# A day is written YYYY-MM-DD: a lax date would also take 0 (as 1970-01-01) or a timestamp.
_DAY: dict[str, Any] = {"json_schema_extra": {"format": "date"}}
_DAY_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}")


def _day(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        if not _DAY_TEXT.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{name} {value[:40]!r} is not a day of the calendar; give YYYY-MM-DD, e.g. 2026-01-31"
        ) from None


@router.get("/api/v1/stats", tags=["stats"], responses={200: {"model": Stats}})
@raises(BadRequest, Forbidden)
async def stats(
    orch: Orch,
    who: Caller,
    user: Annotated[str | None, Query(max_length=128, description="One user; default: every user you may see.")] = None,
    start_date: Annotated[
        str | None, Query(description="First UTC day, YYYY-MM-DD; default: 29 days before end_date.", **_DAY)
    ] = None,
    end_date: Annotated[
        str | None, Query(description="Last UTC day, YYYY-MM-DD; default: today (UTC).", **_DAY)
    ] = None,
    group_by: Annotated[
        Grouping,
        Query(description="Rows per day ('days'), ISO week or month ('periods'), or none ('total')."),
    ] = Grouping.DAY,
    after: Annotated[
        str | None,
        Query(max_length=128, description="All users: start after this user (the last answer's next_after)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_STATS_USERS, description="All users: most users per page.")] = (
        STATS_PAGE_USERS
    ),
) -> Response:
    """Usage per user over any range of UTC days: tasks by type and final state, tokens, wall and GPU
    seconds. Only days with usage cost anything, so a range of years is as cheap as its busy days."""
    first, last = _day(start_date, "start_date"), _day(end_date, "end_date")
    body = await orch.stats(
        orch.check_stats_access(who, user), first, last, group_by=group_by, after=after, limit=limit
    )
    # Sent as is: FastAPI's encoder would walk every counter of every user and day once more.
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/api/v1/schema", tags=["tasks"])
async def schema() -> dict[str, Any]:
    """JSON Schema of mloc/v1 tasks, for editors and client-side validation."""
    return json_schema()
