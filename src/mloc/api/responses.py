"""The error answers in the OpenAPI document: one body schema, and each operation's error statuses.

Routes and dependencies declare the :class:`~mloc.errors.MlocError` classes they may raise with
:func:`raises`; :func:`document_errors` turns the union along each route's dependency tree into that
operation's responses, adding once what the app does for every route: 413 where there is a body,
MLOC's own 422 where FastAPI validates parameters (and 400 where it parses a JSON body), and the
``WWW-Authenticate`` header of a 401. Each error class carries its status, its ``error``
code and, in its docstring, when it happens: the handlers and the document read the same classes, and
tests/test_openapi_conformance.py fuzzes every operation against the result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Literal, Required, TypeVar

import redis.asyncio as aioredis
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.routing import BaseRoute
from typing_extensions import TypedDict

from mloc.errors import BadRequest, InvalidParameters, MlocError, PayloadTooLarge, Unauthorized, Unavailable

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

_RAISES = "__mloc_raises__"
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


class ErrorDetail(TypedDict, total=False):
    """One problem of several: a field (``path``) or a task of a bulk submit (``index``)."""

    path: str
    message: Required[str]
    fix: str
    index: int
    details: list[ErrorDetail]


class ErrorBody(BaseModel):
    """The body of every MLOC error answer, whatever its status."""

    ok: Literal[False]
    error: str = Field(description="A stable code for programs; each response lists the ones it can carry.")
    message: str = Field(description="What went wrong and what to do, for a person.")
    details: list[ErrorDetail] = Field(
        default_factory=list, description="Each problem when there are several; left out when there are none."
    )


# RFC 9110 11.6.1: a 401 names the scheme that authenticates (RFC 6750's bearer token).
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def mloc_error_answer(exc: MlocError) -> JSONResponse:
    headers = CHALLENGE if exc.status_code == Unauthorized.status_code else None
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def redis_error_answer(path: str, exc: aioredis.RedisError) -> JSONResponse:
    log.error("Redis error on %s: %s", path, exc)
    error = Unavailable(f"the state store is unavailable: {exc}")
    return JSONResponse(error.to_dict(), status_code=error.status_code)


def raises(*errors: type[MlocError]) -> Callable[[F], F]:
    """Declare the MLOC errors an endpoint or a dependency may answer with, for the OpenAPI document."""

    def mark(func: F) -> F:
        setattr(func, _RAISES, (*getattr(func, _RAISES, ()), *errors))
        return func

    return mark


def _declared(call: Any) -> tuple[type[MlocError], ...]:
    return tuple(getattr(call, _RAISES, ()))


def route_errors(route: APIRoute) -> set[type[MlocError]]:
    """The errors a route declares, with those of every dependency it resolves."""
    found = set(_declared(route.endpoint))
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        found.update(_declared(dependant.call))
        stack.extend(dependant.dependencies)
    return found


def _status_of(error: type[MlocError]) -> type[MlocError]:
    """The class that set ``error``'s status: its docstring says when that status is answered."""
    return next(c for c in error.__mro__ if "status_code" in c.__dict__ and issubclass(c, MlocError))


def _response(errors: Iterable[type[MlocError]]) -> dict[str, Any]:
    ordered = sorted(errors, key=lambda error: error.code)
    whens = dict.fromkeys(" ".join((_status_of(error).__doc__ or "").split()) for error in ordered)
    codes = ", ".join(dict.fromkeys(f"`{error.code}`" for error in ordered))
    lines = [HTTPStatus(ordered[0].status_code).phrase + ".", *(when for when in whens if when), f"`error`: {codes}."]
    response: dict[str, Any] = {
        "description": " ".join(lines),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if ordered[0].status_code == Unauthorized.status_code:
        header = {"description": "`Bearer`: send `Authorization: Bearer <token>`.", "schema": {"type": "string"}}
        response["headers"] = {name: header for name in CHALLENGE}
    return response


def _add_schemas(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components["ErrorBody"] = body


def _drop_unused(schema: dict[str, Any], names: Iterable[str]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in names:
        if name in components and f'"#/components/schemas/{name}"' not in json.dumps(schema):
            del components[name]


def document_errors(schema: dict[str, Any], routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """Give each operation of ``schema`` (FastAPI's document for ``routes``) every error status it can answer."""
    _add_schemas(schema)
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        declared = route_errors(route)
        for method in route.methods:
            operation = schema["paths"][route.path_format][method.lower()]
            responses = operation.setdefault("responses", {})
            errors = set(declared)
            if "requestBody" in operation:
                errors.add(PayloadTooLarge)
            fastapi_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if fastapi_422.get("$ref") == _FASTAPI_422:
                # FastAPI's own validation error body is never sent: MLOC's handler answers it as an ErrorBody.
                errors.add(InvalidParameters)
                del responses["422"]
                if "application/json" in operation.get("requestBody", {}).get("content", {}):
                    errors.add(BadRequest)  # a body that is not JSON at all
            by_status: dict[int, list[type[MlocError]]] = {}
            for error in errors:
                by_status.setdefault(error.status_code, []).append(error)
            for status, group in by_status.items():
                # A status the route documents itself (its own body or media type) is kept as written.
                responses.setdefault(str(status), _response(group))
            operation["responses"] = dict(sorted(responses.items()))
    _drop_unused(schema, ("HTTPValidationError", "ValidationError"))
    return schema
