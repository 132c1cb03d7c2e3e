"""Request dependencies: the orchestrator services and the authenticated caller."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from mloc.errors import BadRequest, Forbidden
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.users import Principal, authenticate

_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


async def orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


async def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    orch: Orchestrator = request.app.state.orchestrator
    return await authenticate(orch.redis, orch.settings.admin_token, authorization)


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.admin:
        raise Forbidden("this endpoint is for the admin (ORCHESTRATOR_TOKEN)")
    return who


async def task_id(task_id: Annotated[str, Path(description="The task's id (a UUID).")]) -> str:
    if not _TASK_ID.match(task_id):
        raise BadRequest(f"{task_id[:80]!r} is not a task id; task ids are UUIDs such as the submit response gives")
    return task_id


async def worker_id(worker_id: Annotated[str, Path(description="The worker's id.")]) -> str:
    if not _WORKER_ID.match(worker_id):
        raise BadRequest(f"{worker_id[:80]!r} is not a worker id")
    return worker_id


Orch = Annotated[Orchestrator, Depends(orchestrator)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
TaskId = Annotated[str, Depends(task_id)]
WorkerId = Annotated[str, Depends(worker_id)]
