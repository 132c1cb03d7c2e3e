"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fastapi_offline
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mloc import __version__, heap, stopping
from mloc.api import (
    admin,
    answers,
    archive,
    artifacts,
    dashboard,
    evals,
    lookup,
    metrics,
    misc,
    openai_batch,
    openai_errors,
    pipelines,
    results,
    tasks,
    workers,
)
from mloc.api.deps import known_query
from mloc.api.responses import document_errors, mloc_error_answer, redis_error_answer
from mloc.api.submit_lane import SubmitLane
from mloc.connection import connect, redact, resolve_url
from mloc.errors import BadRequest, InvalidParameters, MlocError
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Swagger UI's and ReDoc's scripts and styles, shipped in a package and served by the orchestrator
# itself: FastAPI's default pages fetch them from a CDN, and are blank on a network without one.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS_STATIC = "/docs/static"


class BodyLimit:
    """Refuse request bodies over the limit before they are read into memory."""

    def __init__(self, app: ASGIApp, limit: int, file_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit or limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == openai_batch.UPLOAD_PATH:
            shown, variable = self.file_limit, "MLOC_MAX_FILE_BYTES"
            limit = shown + openai_batch.UPLOAD_MARGIN  # the form around the file; the route checks the file
        else:
            limit, variable = (self.limit * 16 if path.endswith("/bulk") else self.limit), "MLOC_MAX_BODY_BYTES"
            shown = limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, shown, variable)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send, shown, variable)

    @staticmethod
    async def _refuse(send: Send, limit: int, variable: str) -> None:
        body = (
            b'{"ok":false,"error":"payload_too_large","message":"request body is over the limit of '
            + str(limit).encode()
            + f' bytes ({variable})"}}'.encode()
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


# The scope key under which HeadAsGet keeps the method a HEAD request was sent with.
SENT_METHOD = "mloc.sent_method"


class HeadAsGet:
    """Answer HEAD wherever GET is answered, with the GET's status and headers and no body (RFC 9110
    9.3.2). The routes declare GET only, so the OpenAPI document lists each operation once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # A copy: the server reads the method of its own scope to send no body.
        inner = {**scope, "method": "GET", SENT_METHOD: "HEAD"}

        async def headers_only(message: Message) -> None:
            if message["type"] != "http.response.start":
                return
            if "route" in inner:
                scope["route"] = inner["route"]  # the request metrics label it by the route it reached
            await send(message)
            await send({"type": "http.response.body", "body": b""})
            # Stops the answer there: a followed log would otherwise stream on, unseen, until its task ends.
            raise _Answered

        with contextlib.suppress(_Answered):
            await self.app(inner, receive, headers_only)


class _Answered(Exception):
    pass


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(routes: list[BaseRoute], scope: Scope) -> list[str]:
    """The methods the routes answer on the path of ``scope``; HEAD wherever GET (see HeadAsGet)."""
    found: set[str] = set()
    for route in routes:
        if route.matches(scope)[0] is not Match.NONE:
            found |= getattr(route, "methods", None) or set()
    if "GET" in found:
        found.add("HEAD")
    return sorted(found, key=lambda method: (_METHODS.index(method) if method in _METHODS else len(_METHODS), method))


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def json_error(body: Any, position: int, problem: str) -> BadRequest:
    """A JSON body that does not parse, said as a task body's is: where, and what is wrong there."""
    text = body if isinstance(body, str) else ""
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    # No details: on the /v1 routes a detail's path would become OpenAI's param, and no field is at fault.
    return BadRequest(f"invalid JSON at line {line}, column {column}: {problem}")


def serve_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """The API documents' pages, as FastAPI's own but with every asset from this origin. Plain routes,
    as FastAPI's are: public, and outside the OpenAPI document."""
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(docs_url, swagger_ui, include_in_schema=False)
    if redirect_url:
        app.add_route(redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route(redoc_url, redoc, include_in_schema=False)


def create_app(
    settings: Settings | None = None,
    *,
    redis: aioredis.Redis | None = None,
    orchestrator: Orchestrator | None = None,
) -> FastAPI:
    """The orchestrator's app. Its start-up joins the other orchestrators on its Redis before it
    answers a request, and fails with their refusal (ConfigError). ``orchestrator``: one its host has
    joined already (``mloc.orchestrator.server``), used with its Redis client, which the host closes."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        given = redis if orchestrator is None else orchestrator.redis
        url = resolve_url(settings) if given is None else None
        client = given or await connect(url or "")
        orch = orchestrator or Orchestrator(client, settings)
        app.state.orchestrator = orch
        if settings.admin_token is None:
            log.warning(
                "AUTHENTICATION IS OFF: ORCHESTRATOR_TOKEN is not set, so anyone who can reach this "
                "port can submit and cancel tasks. Set ORCHESTRATOR_TOKEN for any shared deployment."
            )
        try:
            # Before the first request: one refused must not answer as if it ran (see mloc.orchestrators).
            await orch.join()
        except BaseException:
            if given is None:
                await client.aclose()
            raise
        log.info("orchestrator ready (Redis %s)", redact(url) if url else "given")
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(orch.run_scheduler(stop), name="scheduler"),
            asyncio.create_task(orch.run_reaper(stop), name="reaper"),
        ]
        heap.settle()
        try:
            yield
        finally:
            stop.set()
            await stopping.cancel(*loops)
            await orch.leave()
            if given is None:
                await client.aclose()

    app = FastAPI(
        title="MLOC orchestrator",
        version=__version__,
        description="Submit and follow LLM tasks (inference, fine-tuning, RLHF, RAG, agents) on a worker fleet.",
        lifespan=lifespan,
        dependencies=[Depends(known_query)],
        # serve_docs adds both pages at these paths, with their assets served from here.
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(MlocError)
    async def mloc_error(request: Request, exc: MlocError) -> JSONResponse:
        return mloc_error_answer(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        method, path = request.scope.get(SENT_METHOD, request.method), request.url.path
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"no such endpoint: {method} {path}"
        elif exc.status_code == 405:
            allowed = allowed_methods(app.router.routes, request.scope)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            use = f"; use {_either(allowed)}" if allowed else ""
            message = f"method {method} is not allowed on {path}{use}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            {"ok": False, "error": code, "message": message}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        unreadable = next((err for err in exc.errors() if err.get("type") == "json_invalid"), None)
        if unreadable is not None:
            # FastAPI names the offset into the body where the JSON broke, as if it were a field ("body.1").
            problem = unreadable.get("ctx", {}).get("error", "")
            return mloc_error_answer(json_error(exc.body, int(unreadable["loc"][-1]), problem))
        details = [{"path": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()]
        text = "; ".join(f"{d['path']}: {d['message']}" for d in details[:5])
        sent = request.headers.get("content-type") or "none"
        if any(d["path"] == "body" for d in details) and "json" not in sent:
            # curl -d sends a form: the JSON in it is never read as JSON.
            text += f"; send the body as JSON with 'Content-Type: application/json' (this request's: {sent})"
        error = InvalidParameters(f"invalid request: {text}", details=details)
        return JSONResponse(error.to_dict(), status_code=error.status_code)

    @app.exception_handler(aioredis.RedisError)
    async def redis_down(request: Request, exc: aioredis.RedisError) -> JSONResponse:
        return redis_error_answer(request.url.path, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            {"ok": False, "error": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
            status_code=500,
        )

    for router in (tasks.router, workers.router, admin.router, misc.router, metrics.router, dashboard.router):
        app.include_router(router)
    app.include_router(artifacts.router)
    app.include_router(results.router)
    app.include_router(evals.router)
    app.include_router(pipelines.router)
    app.include_router(openai_batch.router)
    app.include_router(archive.router)
    app.include_router(lookup.router)
    serve_docs(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Task"] = {
                "type": "object",
                "description": "A mloc/v1 task; GET /api/v1/schema has the full JSON Schema.",
            }
            schema = answers.link_task_routes(schema, tasks.SUBMIT_PATH)
            app.openapi_schema = openai_errors.document_errors(document_errors(schema, app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Innermost: a plain submit is answered there, after the body limit and inside the metrics.
    app.add_middleware(SubmitLane, route=tasks.submit_route(app.routes))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, file_limit=settings.max_file_bytes)
    # Outside the body limit, so its 413 on a /v1 route is rewritten too.
    app.add_middleware(openai_errors.OpenAIErrors)
    # Outside every answer's rewriting, so a HEAD's headers are those of the GET's final answer.
    app.add_middleware(HeadAsGet)
    app.add_middleware(metrics.RequestMetrics)
    return app
