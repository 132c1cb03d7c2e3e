"""The submit endpoint's direct lane: ``POST /api/v1/tasks`` answered without FastAPI's routing.

A submit is the request a busy orchestrator answers most, and on it FastAPI's routing, dependency
solving and response machinery cost about as much CPU as validating and storing the task. This
middleware answers a plain submit (no query string) itself, with the same steps as the route in
:mod:`mloc.api.tasks`: the caller from :func:`mloc.orchestrator.users.authenticate`, the task from
:func:`mloc.api.tasks.submit_body`, errors rendered as the app's handlers render them
(:mod:`mloc.api.responses`). Everything else, ``?dry_run=true`` included, goes on to the app, and
the route stays the operation the OpenAPI document describes.

It sits inside the app's other middlewares: the body limit, the request metrics (it names the
route, so the request is counted under its template) and the server's 500 handler apply to it as
to any route.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from mloc.api.responses import mloc_error_answer, redis_error_answer
from mloc.api.tasks import SUBMIT_PATH, submit_body, submitted
from mloc.errors import MlocError
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.users import authenticate


class SubmitLane:
    def __init__(self, app: ASGIApp, route: BaseRoute) -> None:
        self.app = app
        self.route = route  # the route this lane answers for, as the metrics label it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != SUBMIT_PATH
            or scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        orch: Orchestrator = scope["app"].state.orchestrator
        content_type = authorization = key = None
        for name, value in scope["headers"]:
            # The first of a repeated header, as Starlette's Headers.get gives it.
            if name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
        try:
            who = await authenticate(orch.redis, orch.settings.admin_token, authorization)
            body = await _read(receive)
            if body is None:
                return  # the client went away: there is no one to answer
            response = submitted(await submit_body(orch, who, body, content_type, key=key))
        except MlocError as exc:
            response = mloc_error_answer(exc)
        except aioredis.RedisError as exc:
            response = redis_error_answer(scope["path"], exc)
        await response(scope, receive, send)


async def _read(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
