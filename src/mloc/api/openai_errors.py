"""OpenAI's error shape on the /v1 routes: ``{"error": {"message", "type", "param", "code"}}``.

MLOC's handlers answer every error as an :class:`~mloc.api.responses.ErrorBody`; OpenAI's clients read
``error.message``. :class:`OpenAIErrors` rewrites the body of each /v1 error answer on its way out (the
status stays MLOC's), so the handlers, the body limit and the router's 404 and 405 stay in one place.
:func:`document_errors` states the same in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/v1/"
_MLOC_BODY = {"$ref": "#/components/schemas/ErrorBody"}
_OPENAI_BODY = {"$ref": "#/components/schemas/OpenAIErrorBody"}


class OpenAIError(BaseModel):
    message: str = Field(description="What went wrong and what to do, for a person.")
    type: str = Field(description="invalid_request_error, or server_error for a 5xx.")
    param: str | None = Field(description="The call's parameter at fault (`input_file_id`, `order`), or null.")
    code: str | None = Field(description="MLOC's stable code (`error` of its own error body).")


class OpenAIErrorBody(BaseModel):
    """The body of every error answer on the /v1 (OpenAI) routes."""

    error: OpenAIError


def openai_body(body: bytes, status: int) -> bytes:
    """MLOC's error body as OpenAI's (a body that is not MLOC's is passed on as the message)."""
    try:
        mloc = orjson.loads(body)
    except orjson.JSONDecodeError:
        mloc = None
    if not isinstance(mloc, dict) or not isinstance(mloc.get("message"), str):
        mloc = {"error": "http_error", "message": body.decode(errors="replace")[:1000]}
    details = mloc.get("details") or []
    first = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
    param = first.get("path")
    if isinstance(param, str) and param.startswith(("body.", "query.")):
        # A field of the call's own body or query is named as OpenAI names it ("input_file_id", "order").
        param = param.split(".", 1)[1]
    error = {
        "message": mloc["message"],
        "type": "server_error" if status >= 500 else "invalid_request_error",
        "param": param,
        "code": mloc.get("error"),
    }
    return orjson.dumps({"error": error})


class OpenAIErrors:
    """Give the error answers of /v1 routes OpenAI's body; every other answer passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            # An error body is small: held whole, then sent again in OpenAI's shape.
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = openai_body(b"".join(chunks), start["status"])
            replaced = (b"content-length", b"content-type")
            kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in replaced]
            headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Point the error answers of the /v1 operations in ``schema`` at OpenAI's error body."""
    used = False
    for path, item in schema.get("paths", {}).items():
        if not path.startswith(PREFIX):
            continue
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {}).get("application/json", {})
                if status.isdigit() and int(status) >= 400 and content.get("schema") == _MLOC_BODY:
                    content["schema"] = dict(_OPENAI_BODY)
                    used = True
    if used:
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = OpenAIErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["OpenAIErrorBody"] = body
    return schema
