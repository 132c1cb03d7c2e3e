"""Request dependencies: the orchestrator services and the authenticated caller."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mloc.api.responses import raises
from mloc.errors import BadRequest, Forbidden, InvalidParameters, Unauthorized, Unavailable
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


# By id: routes live as long as the app, and APIRoute is not hashable.
_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(route: APIRoute) -> frozenset[str]:
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        names = frozenset(param.alias for param in get_flat_dependant(route.dependant).query_params)
        _QUERY_NAMES[id(route)] = names
    return names


@raises(InvalidParameters)
async def known_query(request: Request) -> None:
    """Refuse a query parameter the operation does not take: a misspelt filter (``?stat=pending``)
    would otherwise be ignored, and the answer read as if it had been applied."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema:
        return  # the dashboard's pages: a browser's or a link's own parameters are not requests
    known = _query_names(route)
    unknown = [name for name in dict.fromkeys(request.query_params) if name not in known]
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        raise InvalidParameters(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} {names} for {route.path}: {takes}",
            details=[{"path": f"query.{name[:40]}", "message": "not a parameter of this endpoint"} for name in unknown],
        )
