"""A small HTTP client for the orchestrator API: what the CLI uses, and a Python SDK.

``Client()`` reads the same settings as the ``mloc`` command: ``MLOC_API_URL`` (default
``http://127.0.0.1:$MLOC_PORT``) and the token from ``MLOC_TOKEN``, else ``ORCHESTRATOR_TOKEN``.
Every method that takes a task id also takes a unique prefix of one, as ``mloc tasks`` shows it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from mloc.errors import MlocError

TERMINAL = {"succeeded", "failed", "cancelled"}
# Seconds without a byte from a followed log after which the orchestrator counts as gone.
FOLLOW_SILENCE_SEC = 45.0
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
LOG_PAGE = 10_000  # the API's largest page of log lines
# A submit is sent again after these failures, which may have happened before or after it was stored:
# its Idempotency-Key makes the orchestrator store it once either way.
_SUBMIT_RETRIED_STATUS = {502, 503, 504}
_IN_PROGRESS = "idempotency_in_progress"
_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ID_PREFIX = re.compile(r"^[0-9a-f-]+$")
_ID_LENGTH = 36  # a UUID: 32 hex digits and 4 dashes
# The orchestrator's own routes, which a base URL's path cannot end in (see _checked_url).
_ROUTE_IN_PATH = re.compile(
    r"/(?:api/v1|v1|admin|dashboard|docs|openapi\.json|healthz|readyz|metrics|workers)(?:/.*)?$"
)
# What a bearer token may hold: printable ASCII. Spaces pass, as `mloc up` lets the admin's token have
# them (ORCHESTRATOR_TOKEN='up token'); a line break or other control character cannot be sent.
_TOKEN = re.compile(r"[ -~]*")


class ApiError(MlocError):
    """The orchestrator answered with an error; ``status_code`` and ``code`` say which."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("message") or body), details=body.get("details"))
        self.status_code = status
        self.code = str(body.get("error", "error"))


class ClientError(MlocError):
    """A problem found before anything was sent: a task the client cannot read, a bad id."""

    status_code = 400
    code = "bad_request"


class TaskIdError(ClientError):
    """A task id prefix that matches no task, or several (``candidates`` lists them)."""

    def __init__(self, message: str, candidates: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.candidates = candidates or []


class Unreachable(MlocError):
    """No answer from the orchestrator (not running, wrong URL, or it went away mid-request)."""

    status_code = 503
    code = "unavailable"


class Lost(Unreachable):
    """The orchestrator went away in the middle of an answer or a followed log."""


class WaitTimeout(MlocError):
    """:meth:`Client.wait` gave up before the task ended; the task goes on (``task_id``, ``state``)."""

    status_code = 408
    code = "timeout"

    def __init__(self, task_id: str, state: str, timeout: float) -> None:
        super().__init__(f"task {task_id} is still {state} after {timeout:g}s; it goes on")
        self.task_id, self.state = task_id, state


def default_target() -> tuple[str, str | None]:
    """The API URL and token the CLI and ``Client()`` use: MLOC_API_URL, MLOC_TOKEN / ORCHESTRATOR_TOKEN.

    Read from the environment now, not from the process's cached settings: a program may set them
    after something else first read the settings."""
    url, token, _ = _default_target()
    return url, token


def _default_target() -> tuple[str, str | None, str]:
    """:func:`default_target`, and the name of the variable the token came from."""
    from pydantic import ValidationError

    from mloc.errors import ConfigError
    from mloc.settings import Settings, describe_invalid

    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc)) from None
    return settings.resolved_api_url, settings.client_token, "MLOC_TOKEN" if settings.token else "ORCHESTRATOR_TOKEN"


def _checked_url(url: str, name: str) -> str:
    """``url`` without surrounding whitespace or trailing '/'; ClientError naming ``name`` when it has
    no scheme, which httpx would only report mid-request, as if the orchestrator had gone away."""
    url = url.strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        shown = url[:200]
        raise ClientError(f"{name} {shown} must start with http:// or https:// (e.g. http://{shown})")
    # A base URL may have a path (an orchestrator behind a proxy at /mloc), but not one of the
    # orchestrator's own routes: every call adds its route, and would answer "no such endpoint".
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    route = _ROUTE_IN_PATH.search(slash + path)
    if route:
        base = f"{scheme}://{host}{(slash + path)[: route.start()]}"
        raise ClientError(
            f"{name} {url[:200]} ends in {route.group(0)[:100]}, a route of the orchestrator that every call "
            f"adds itself; give the orchestrator's base URL: {name}={base}"
        )
    return url


def _checked_token(token: str | None, name: str) -> str | None:
    """``token`` without the line break a secret file leaves at its end; ClientError naming ``name``
    for a character no token has, which httpx would only report mid-request. The token is never shown."""
    if token is None:
        return None
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise ClientError(
            f"{name} holds a line break, tab, control or non-ASCII character inside the token; "
            "set it to the token alone, exactly as `mloc users add` printed it"
        )
    return token


def _task_body(task: Any) -> tuple[bytes, str]:
    """The request body and content type for one task given as a dict, a file, text, bytes or a model."""
    if isinstance(task, Mapping) or hasattr(task, "to_wire"):  # a dict, or a validated mloc.spec Document
        data = task.to_wire() if hasattr(task, "to_wire") else dict(task)
        try:
            return json.dumps(data).encode(), "application/json"
        except (TypeError, ValueError) as exc:
            raise ClientError(
                f"the task holds a value JSON cannot carry ({exc}); use strings, numbers, booleans, lists and dicts"
            ) from None
    if isinstance(task, Path):
        return _read_task_file(task), "text/yaml"
    if isinstance(task, str):
        text = task.strip()
        looks_like_a_file = "\n" not in text and text.lower().endswith(TASK_FILE_SUFFIXES)
        if looks_like_a_file:
            return _read_task_file(Path(text).expanduser()), "text/yaml"
        return task.encode(), "text/yaml"
    if isinstance(task, bytes | bytearray | memoryview):
        return bytes(task), "text/yaml"
    raise ClientError(
        f"submit() got a {type(task).__name__}; give the task as a dict, a Path or file name "
        "(.yaml, .yml, .json), YAML or JSON text, bytes, or a mloc.spec Document"
    )


def _several_documents(body: bytes) -> bool:
    """Whether YAML text holds more than one document (the orchestrator would refuse it as one task)."""
    from mloc.spec.loader import MAX_DOCUMENT_BYTES, parse_stream

    try:
        return len(parse_stream(body, limit=16 * MAX_DOCUMENT_BYTES)) > 1
    except MlocError:
        return False  # the orchestrator says what is wrong with it, pointing into the text as sent


def _read_task_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ClientError(
            f"task file {str(path)!r} does not exist (a string ending in .yaml/.yml/.json is read as a file; "
            "pass YAML text with line breaks, or a dict, to send it as is)"
        ) from None
    except IsADirectoryError:
        raise ClientError(f"{str(path)!r} is a folder; give a task file") from None
    except OSError as exc:
        raise ClientError(f"cannot read task file {str(path)!r}: {exc.strerror or exc}") from None


def _log_params(source: str | Iterable[str] | None, tail: int | None, since: str | float | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if source is not None:
        params["source"] = source if isinstance(source, str) else ",".join(source)
    if tail is not None:
        params["tail"] = str(tail)
    if since is not None:
        params["since"] = repr(float(since)) if isinstance(since, int | float) else since
    return params


def _error_of(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:500] or f"HTTP {response.status_code}"}
    return ApiError(response.status_code, body if isinstance(body, dict) else {"message": str(body)})


class Client:
    """The orchestrator's API. ``Client()`` reads MLOC_API_URL and the token as the CLI does;
    ``Client(url, token)`` uses exactly what it is given."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0, max_retries: int = 2
    ) -> None:
        """``max_retries``: how often a submit is sent again when the orchestrator could not be reached,
        did not answer in time, or was busy (502, 503, 504): each send carries the same Idempotency-Key, so
        the task is stored once."""
        self.max_retries = max(0, max_retries)
        url_name, token_name = "base_url", "token"
        if base_url is None:
            base_url, default_token, default_name = _default_target()
            url_name = "MLOC_API_URL"
            if token is None:
                token, token_name = default_token, default_name
        token = _checked_token(token, token_name)
        # Said with a 401 when no token was sent: the variable Client() reads, or the argument.
        self._no_token_hint = "set MLOC_TOKEN to your API token" if url_name == "MLOC_API_URL" else "pass token="
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = _checked_url(base_url, url_name)
        self.sends_token = bool(token)
        try:
            self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        except httpx.InvalidURL as exc:
            raise ClientError(f"{url_name} {self.base_url[:200]!r} is not a URL: {exc}") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.HTTPError) -> Unreachable:
        if isinstance(exc, httpx.ConnectError):
            return Unreachable(
                f"cannot reach the orchestrator at {self.base_url}: {exc}; is it running? (MLOC_API_URL)"
            )
        return Lost(f"lost the orchestrator at {self.base_url}: {type(exc).__name__}: {exc}")

    def _error(self, response: httpx.Response) -> ApiError:
        """The orchestrator's error; a 401 to a client that sent no token also says how to send one
        (the orchestrator's own words are for curl: an Authorization header)."""
        error = _error_of(response)
        if response.status_code != 401 or self.sends_token:
            return error
        message = f"{error.message} (no token was sent: {self._no_token_hint}; `mloc users add` makes one)"
        return ApiError(401, {"error": error.code, "message": message, "details": error.details})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response)
        try:
            return response.json()
        except ValueError:
            return {"message": response.text[:500]}

    def _submit_call(self, path: str, key: str | None, **kwargs: Any) -> Any:
        """POST a submit with an Idempotency-Key (``key``, else a new one), sent again up to
        ``max_retries`` times while it may not have gone through."""
        headers = {**kwargs.pop("headers", {}), "Idempotency-Key": key or str(uuid.uuid4())}
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self.http.post(path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                if last or not isinstance(exc, httpx.TransportError):
                    raise self._unreachable(exc) from exc
                time.sleep(_backoff(attempt, None))
                continue
            if response.status_code < 400:
                return response.json()
            error = self._error(response)
            busy = response.status_code in _SUBMIT_RETRIED_STATUS or error.code == _IN_PROGRESS
            if last or not busy:
                raise error
            time.sleep(_backoff(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _stream(
        self, path: str, params: dict[str, str] | None = None, *, read_timeout: float | None = None
    ) -> Iterator[bytes]:
        try:
            timeout = httpx.Timeout(30.0, read=read_timeout)
            with self.http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    # ------------------------------------------------------------------ ids
    def resolve(self, task_id: str) -> str:
        """The full id of the one task whose id starts with ``task_id`` (a full id is returned as is)."""
        text = task_id.strip().lower()
        if _FULL_ID.match(text):
            return text
        if not _ID_PREFIX.match(text) or len(text) > _ID_LENGTH:
            raise TaskIdError(
                f"{task_id[:80]!r} is not a task id: ids are UUIDs of {_ID_LENGTH} characters (hex digits and "
                "'-'); `mloc tasks` lists them, and any unique prefix of one works"
            )
        body = self._call("GET", "/api/v1/task-ids", params={"prefix": text})
        items: list[dict[str, Any]] = body["items"]
        if len(items) == 1:
            return str(items[0]["task_id"])
        if not items:
            raise TaskIdError(f"no task id starts with {text!r}; `mloc tasks` lists yours")
        listed = ", ".join(f"{i['task_id']} ({i.get('name', '')}, {i.get('state', '')})" for i in items)
        more = " and more" if body.get("more") else ""
        raise TaskIdError(
            f"task id prefix {text!r} is ambiguous: it matches {listed}{more}; give more characters", items
        )

    def _path(self, task_id: str, tail: str = "") -> str:
        return f"/api/v1/tasks/{self.resolve(task_id)}{tail}"

    # --------------------------------------------------------------- tasks
    def submit(self, task: Any, *, dry_run: bool = False, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit one task: a dict, a Path or file name (.yaml/.yml/.json), YAML or JSON text, bytes, or a
        mloc.spec Document. The answer names the task id and the worker it went to, or why it waits.
        ``idempotency_key``: the same key sent with the same task, by this call's retries or a later
        call, stores it once (a new key is made for each call without one)."""
        body, content_type = _task_body(task)
        if content_type != "application/json" and b"---" in body and _several_documents(body):
            raise ClientError(
                "the task holds several YAML documents (---): submit them together with "
                "client.submit_bulk([...]), which stores all of them or none, as `mloc submit FILE` does"
            )
        headers = {"Content-Type": content_type}
        if dry_run:
            return self._call("POST", "/api/v1/tasks", content=body, params={"dry_run": "true"}, headers=headers)
        return self._submit_call("/api/v1/tasks", idempotency_key, content=body, headers=headers)

    def submit_bulk(
        self, tasks: list[Any], *, dry_run: bool = False, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit many tasks at once (all are validated first; if any is invalid none is stored).
        Each item is a dict, or anything :meth:`submit` takes: a file or text of several YAML documents
        (---) gives them all, as a pipeline file does. ``dry_run``: validate them all and show placement,
        storing nothing. ``idempotency_key`` as for :meth:`submit`, for the whole bulk."""
        from mloc.spec.loader import MAX_DOCUMENT_BYTES, parse_stream

        documents = []
        for number, task in enumerate(tasks, 1):
            body, content_type = _task_body(task)
            if content_type == "application/json":
                documents.append(json.loads(body))
                continue
            try:
                documents.extend(parse_stream(body, limit=16 * MAX_DOCUMENT_BYTES))
            except MlocError as exc:
                named = f"task file {str(task)!r}" if isinstance(task, Path | str) and len(str(task)) < 300 else ""
                raise ClientError(f"{named or f'task {number}'}: {exc.message}") from None
        if dry_run:
            return self._call("POST", "/api/v1/tasks/bulk", json={"tasks": documents}, params={"dry_run": "true"})
        return self._submit_call("/api/v1/tasks/bulk", idempotency_key, json={"tasks": documents})

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", self._path(task_id))

    def tasks(self, **params: Any) -> dict[str, Any]:
        """A page of tasks, newest first (page or after, page_size, state, owner, task_type, children)."""
        return self._call("GET", "/api/v1/tasks", params={k: v for k, v in params.items() if v is not None})

    def each_task(self, *, page_size: int = 500, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every task that matches ``filters`` (state, owner, task_type, children), newest first, a page at a
        time: each once, whatever is submitted or ends while they are read."""
        after = None
        while True:
            body = self.tasks(**filters, page_size=page_size, after=after)
            yield from body["items"]
            after = body.get("next_after")
            if not after:
                return

    def result(self, task_id: str) -> Any:
        """The task's full result (responses.json)."""
        return self._call("GET", self._path(task_id, "/result"))

    def metrics(self, task_id: str, *, limit: int | None = None) -> dict[str, Any]:
        """Per-step training metrics, oldest first: {"metrics": [{"step": 1, "loss": ...}, ...]}."""
        params = {"limit": str(limit)} if limit else None
        return self._call("GET", self._path(task_id, "/metrics"), params=params)

    def compare_evals(self, *task_ids: str) -> dict[str, Any]:
        """Two or more succeeded eval tasks' scores side by side: {"runs": [...], "rows": [{"task", "metric",
        "cells": [{"value", "stderr"}, ...], "difference", "combined_stderr", "significant"}, ...]}."""
        resolved = ",".join(self.resolve(task_id) for task_id in task_ids)
        return self._call("GET", "/api/v1/evals/compare", params={"tasks": resolved})

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", self._path(task_id, "/cancel"))

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        """A pipeline's tasks, each with what it waits for and its state. ``pipeline_id``: the full id
        `mloc submit` printed, or the id (or a unique prefix) of one of its tasks."""
        return self._on_pipeline("GET", pipeline_id)

    def cancel_pipeline(self, pipeline_id: str) -> dict[str, Any]:
        """Cancel every task of the pipeline that has not ended (``pipeline_id`` as :meth:`pipeline` takes it)."""
        return self._on_pipeline("POST", pipeline_id, "/cancel")

    def _on_pipeline(self, method: str, given: str, tail: str = "") -> dict[str, Any]:
        text = given.strip().lower()
        if not _FULL_ID.match(text):
            pipeline_id = self._pipeline_by_prefix(given, text)
            if pipeline_id:
                return self._call(method, f"/api/v1/pipelines/{pipeline_id}{tail}")
            # No pipeline id starts so: perhaps one of its tasks' does, and the task knows its pipeline.
            try:
                task_id = self.resolve(text)
            except TaskIdError as exc:
                raise TaskIdError(
                    f"{given[:80]!r} names no pipeline: give the pipeline id `mloc submit` printed or a unique "
                    f"prefix of it, or the id of one of its tasks or a unique prefix of that ({exc.message})"
                ) from None
            return self._call(method, f"/api/v1/pipelines/{self._pipeline_of(task_id)}{tail}")
        try:
            return self._call(method, f"/api/v1/pipelines/{text}{tail}")
        except ApiError as exc:
            if exc.status_code != 404:
                raise
            try:  # perhaps the full id of one of its tasks
                pipeline_id = self._pipeline_of(text)
            except ApiError:
                raise exc from None
        return self._call(method, f"/api/v1/pipelines/{pipeline_id}{tail}")

    def _pipeline_by_prefix(self, given: str, text: str) -> str | None:
        """The one pipeline whose id starts with ``text``; None when none does."""
        if not _ID_PREFIX.match(text) or len(text) > _ID_LENGTH:
            return None
        body = self._call("GET", "/api/v1/pipeline-ids", params={"prefix": text})
        items: list[dict[str, Any]] = body["items"]
        if len(items) > 1:
            listed = ", ".join(f"{i['pipeline_id']} ({', '.join(i['steps'])})" for i in items)
            more = " and more" if body.get("more") else ""
            raise TaskIdError(
                f"pipeline id prefix {given[:80]!r} is ambiguous: it matches {listed}{more}; give more characters"
            )
        return str(items[0]["pipeline_id"]) if items else None

    def _pipeline_of(self, task_id: str) -> str:
        pipeline_id = self.task(task_id).get("pipeline_id")
        if not pipeline_id:
            raise ClientError(f"task {task_id} is not part of a pipeline; `mloc show {task_id}` shows it")
        return str(pipeline_id)

    def resume(self, task_id: str) -> dict[str, Any]:
        """Run a failed or cancelled dataset task's unfinished chunks again."""
        return self._call("POST", self._path(task_id, "/resume"))

    def logs(
        self,
        task_id: str,
        *,
        source: str | Iterable[str] | None = None,
        tail: int | None = None,
        since: str | float | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """The task's log so far: {"lines": [{"id", "ts", "level", "source", "text", "event"?}, ...]},
        oldest first. ``source`` keeps only those sources (mloc, executor, library, stdout, stderr);
        ``tail`` the last N entries; ``since`` entries from a time on (unix seconds, ISO 8601, or a
        duration ago: "10m") or after an entry id; ``limit`` at most that many (``more`` says if cut,
        and ``after=`` its ``next`` reads on)."""
        params = _log_params(source, tail, since)
        if limit is not None:
            params["limit"] = str(limit)
        if after is not None:
            params["after"] = after
        return self._call("GET", self._path(task_id, "/logs"), params=params)

    def all_logs(
        self,
        task_id: str,
        *,
        source: str | Iterable[str] | None = None,
        tail: int | None = None,
        since: str | float | None = None,
    ) -> dict[str, Any]:
        """:meth:`logs`, every page of it: all the lines, however many (a log keeps about 10,000)."""
        body = self.logs(task_id, source=source, tail=tail, since=since)
        lines = list(body["lines"])
        while body.get("more"):
            body = self.logs(task_id, source=source, since=since, limit=LOG_PAGE, after=body["next"])
            lines.extend(body["lines"])
        return {**body, "lines": lines, "more": False}

    def follow_logs(
        self,
        task_id: str,
        *,
        source: str | Iterable[str] | None = None,
        tail: int | None = None,
        since: str | float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Log entries as they come (filtered as :meth:`logs` does), until the task ends; the last item
        is {"end": True, "state": ..., "reason": ...}. Raises :class:`Lost` if the orchestrator goes
        away meanwhile (the task goes on)."""
        path = self._path(task_id, "/logs")
        event = ""
        buffer = b""
        params = {"follow": "true", **_log_params(source, tail, since)}
        # The orchestrator writes a comment every 10 s while the log is quiet: a longer silence means it is gone.
        for block in self._stream(path, params=params, read_timeout=FOLLOW_SILENCE_SEC):
            buffer += block
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "end":
                        yield {"end": True, **data}
                        return
                    yield data
                elif not line:
                    event = ""
        raise Lost(f"lost the orchestrator at {self.base_url}: the log stream ended before the task did")

    def result_lines(self, task_id: str, *, offset: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """A dataset task's result lines, one dict per input row in input order ({"id", "output",
        "finish_reason", "prompt_tokens", "completion_tokens", "error"}), streamed; ``offset`` lines are
        skipped and at most ``limit`` come (all when None). They grow while the task runs."""
        params = {"offset": str(offset)}
        if limit is not None:
            params["limit"] = str(limit)
        pending = b""
        for block in self._stream(self._path(task_id, "/results"), params=params):
            *complete, pending = (pending + block).split(b"\n")
            for line in complete:
                if line.strip():
                    yield json.loads(line)
        if pending.strip():
            yield json.loads(pending)

    def artifacts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's result files: [{"path", "size"}, ...]."""
        return list(self._call("GET", self._path(task_id, "/artifacts"))["items"])

    def artifact(self, task_id: str, path: str) -> Iterator[bytes]:
        """One result file, streamed in blocks."""
        yield from self._stream(self._path(task_id, f"/artifacts/{quote(path)}"))

    def archive(self, task_id: str, folder: str = "") -> Iterator[bytes]:
        """A folder of the task's result files as a tar stream (paths relative to that folder)."""
        yield from self._stream(self._path(task_id, "/archive"), params={"path": folder} if folder else None)

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the task ends; returns its final record. ``on_update`` sees every record read."""
        task_id = self.resolve(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            record = self.task(task_id)
            if on_update is not None:
                on_update(record)
            if record["state"] in TERMINAL:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(task_id, record["state"], timeout or 0.0)
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    # ------------------------------------------------------------- fleet
    def workers(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/workers", params={k: v for k, v in params.items() if v is not None})

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/workers/{quote(worker_id, safe='')}")

    def cordon_worker(self, worker_id: str, *, on: bool = True) -> dict[str, Any]:
        """Stop (or, with ``on=False``, resume) placing new tasks on a live worker (admin)."""
        action = "cordon" if on else "uncordon"
        return self._call("POST", f"/api/v1/workers/{quote(worker_id, safe='')}/{action}")

    def remove_worker(self, worker_id: str) -> dict[str, Any]:
        """Forget a worker that is offline or lost (admin); a live one is refused (409)."""
        return self._call("DELETE", f"/api/v1/workers/{quote(worker_id, safe='')}")

    def stats(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/v1/stats", params={k: v for k, v in params.items() if v is not None})

    def cleanup(self) -> dict[str, Any]:
        return self._call("POST", "/admin/cleanup")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    # ------------------------------------------------------------- users
    def add_user(self, name: str, *, max_tasks: int | None = None, max_gpus: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if max_tasks is not None:
            body["max_tasks"] = max_tasks
        if max_gpus is not None:
            body["max_gpus"] = max_gpus
        return self._call("POST", "/admin/users", json=body)

    def set_quota(
        self, name: str, *, max_tasks: int | None = None, max_gpus: int | None = None, reset: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"reset": reset}
        if max_tasks is not None:
            body["max_tasks"] = max_tasks
        if max_gpus is not None:
            body["max_gpus"] = max_gpus
        return self._call("PUT", f"/admin/users/{quote(name, safe='')}/quota", json=body)

    def users(self) -> dict[str, Any]:
        return self._call("GET", "/admin/users")

    def remove_user(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/users/{quote(name, safe='')}")

    def rotate_token(self, name: str) -> dict[str, Any]:
        """Issue a new token for a user, revoking the old one at once; their limits stay (admin)."""
        return self._call("POST", f"/admin/users/{quote(name, safe='')}/token")

    def set_budget(self, name: str, *, period: str, hard: bool = False, **limits: Any) -> dict[str, Any]:
        """Set budgets for one period: ``limits`` are tokens, tokens_in, tokens_out, gpu_time, cpu_time
        (numbers, or text with a unit: '1M', '10h') and gpu_model; None leaves one out."""
        body = {"period": period, "hard": hard, **{k: v for k, v in limits.items() if v is not None}}
        return self._call("PUT", f"/admin/users/{quote(name, safe='')}/budget", json=body)

    def budgets(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/admin/users/{quote(name, safe='')}/budget")

    def remove_budget(self, name: str, *, metric: str | None = None, period: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"metric": metric, "period": period}.items() if v is not None}
        return self._call("DELETE", f"/admin/users/{quote(name, safe='')}/budget", params=params)

    def set_weight(self, name: str, weight: float) -> dict[str, Any]:
        return self._call("PUT", f"/admin/users/{quote(name, safe='')}/weight", json={"weight": weight})


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before a submit is sent again: the orchestrator's Retry-After when it gave one."""
    try:
        if retry_after is not None:
            return min(30.0, max(0.0, float(retry_after)))
    except ValueError:
        pass  # an HTTP date: the doubling below waits a sensible while instead
    return min(8.0, 0.5 * 2**attempt)
