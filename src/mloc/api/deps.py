"""Request dependencies: the orchestrator services and the authenticated caller."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mloc.api.responses import raises
from mloc.errors import BadRequest, Forbidden, Unauthorized, Unavailable
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import Principal, authenticate
from mloc.settings import WORKER_ID

# Either case: ids are stored in lower case, but UUIDs are often written in upper case (the CLI takes both).
_TASK_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


async def orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


_bearer = HTTPBearer(
    auto_error=False,
    description="ORCHESTRATOR_TOKEN (the admin) or a user's token from `mloc users add`; not needed while auth is off.",
)


# Every route that knows its caller reads Redis, so a Redis outage (503) is declared here with the token's errors.
@raises(Unauthorized, Unavailable)
async def principal(
    request: Request, _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> Principal:
    # The scheme names the bearer token in the OpenAPI document; the header is checked as sent, so a
    # malformed one gets MLOC's own message rather than the scheme's silent None.
    orch: Orchestrator = request.app.state.orchestrator
    return await authenticate(orch.redis, orch.settings.admin_token, request.headers.get("authorization"))


def _admin_only(who: Principal, hint: str = "") -> Principal:
    if not who.admin:
        raise Forbidden(
            f"this endpoint is for the admin (ORCHESTRATOR_TOKEN); the token sent is that of user {who.name!r}{hint}"
        )
    return who


@raises(Forbidden)
async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    return _admin_only(who)


@raises(Forbidden)
async def budget_reader(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """The admin, who reads any user's budgets; a user is told where their own are."""
    return _admin_only(who, "; your own budgets and usage are in GET /api/v1/stats (`mloc stats`)")


# The id patterns are documented for clients but checked below, so a bad id gets MLOC's 400 and message.
_TASK_ID_PATH = Path(description="The task's id (a UUID).", json_schema_extra={"pattern": _TASK_ID.pattern})
_WORKER_ID_PATH = Path(description="The worker's id.", json_schema_extra={"pattern": WORKER_ID.pattern})


@raises(BadRequest)
async def task_id(task_id: Annotated[str, _TASK_ID_PATH]) -> str:
    if not _TASK_ID.match(task_id):
        raise BadRequest(
            f"{task_id[:80]!r} is not a task id; task ids are UUIDs such as the submit response gives "
            "(GET /api/v1/task-ids?prefix=... lists the ids a prefix names)"
        )
    return task_id.lower()


@raises(BadRequest)
async def worker_id(worker_id: Annotated[str, _WORKER_ID_PATH]) -> str:
    if not WORKER_ID.match(worker_id):
        raise BadRequest(f"{worker_id[:80]!r} is not a worker id")
    return worker_id


Orch = Annotated[Orchestrator, Depends(orchestrator)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
BudgetReader = Annotated[Principal, Depends(budget_reader)]
TaskId = Annotated[str, Depends(task_id)]
WorkerId = Annotated[str, Depends(worker_id)]
