"""The lines of OpenAI batch files: request lines checked and turned into MLOC dataset rows, and MLOC's
result lines turned into OpenAI's output and error lines.

A request line is ``{"custom_id", "method": "POST", "url": ENDPOINT, "body": {...}}``. What makes the
whole file unusable (not JSON, a field missing, a duplicate ``custom_id``, a second model, an option
MLOC cannot honour) refuses the batch with the line, the field and the fix. What concerns one request
only (an empty prompt, a temperature out of range) is left to the worker, where the row fails alone
and lands in the error file, as it does at OpenAI.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson

from mloc.errors import BadRequest

COMPLETIONS: Final = "/v1/completions"
CHAT: Final = "/v1/chat/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
# The request field that holds the text, per endpoint; it is also the row's column.
TEXT_FIELD = {COMPLETIONS: "prompt", CHAT: "messages"}
# Body fields passed to the row as they are (the worker checks their values, row by row).
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
# Body fields MLOC accepts only at the value that changes nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "stream": (False,),
    "echo": (False,),
    "logprobs": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
}
# Body fields that do not change what is generated.
IGNORED = ("user", "store", "metadata", "service_tier")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_CUSTOM_ID = 512
# Rows are written in blocks of about this many bytes.
BLOCK = 64 * 1024
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Converted:
    """What a valid batch file holds."""

    requests: int
    model: str
    # Where the model is first named, for a refusal of the model itself.
    model_line: int = dataclasses.field(default=1, compare=False)


class BatchFileError(BadRequest):
    """A batch file MLOC cannot run; the message names the line, the field and the fix."""


class _Reader:
    def __init__(self, file_id: str, endpoint: str) -> None:
        self.file_id = file_id
        self.endpoint = endpoint
        self.text = TEXT_FIELD[endpoint]
        self.model: str | None = None
        self.model_line = 0
        self.seen: dict[str, int] = {}

    def refuse(self, number: int, field: str | None, problem: str, fix: str) -> BatchFileError:
        """The refusal of line ``number``, for its ``field`` (None: the line as a whole)."""
        return refusal(self.file_id, number, field, problem, fix)

    def row(self, number: int, raw: bytes) -> dict[str, Any]:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                problem = f"is not UTF-8 text (byte {bad.start})"
                raise self.refuse(number, None, problem, "save the file as UTF-8") from None
            if raw.startswith(BOM):
                # Editors on Windows write one; the line's JSON after it may be fine, so say what to change.
                problem = "starts with a byte order mark (BOM)"
                raise self.refuse(number, None, problem, "save the file as UTF-8 without a BOM") from None
            # orjson says where as "line 1 column 37 (char 36)": the line is the file's, said once already.
            # Counted in the line's own characters: an object cut short ends at its line break, which
            # orjson would report as column 1 of a line after it.
            column = len(raw[: exc.pos].rstrip(b"\r\n").decode("utf-8", "replace")) + 1
            problem = f"is not JSON ({exc.msg} at column {column})"
            raise self.refuse(number, None, problem, "write one JSON object per line") from None
        if not isinstance(line, dict):
            problem = f"is a JSON {_json_kind(line)}, not an object"
            raise self.refuse(number, None, problem, "write one JSON object per line")
        custom_id = self._custom_id(number, line)
        method = line.get("method")
        if method != "POST":
            raise self.refuse(number, "method", _shown(method), 'set it to "POST"')
        url = line.get("url")
        if url != self.endpoint:
            fix = (
                f"set it to the batch's endpoint {self.endpoint!r}, or create a batch per endpoint"
                if url in ENDPOINTS
                else f"MLOC's batches serve {' and '.join(ENDPOINTS)}: set it to {self.endpoint!r}"
            )
            raise self.refuse(number, "url", _shown(url), fix)
        body = line.get("body")
        if not isinstance(body, dict):
            raise self.refuse(number, "body", "is missing or not an object", "give the request's body as an object")
        self._model(number, body)
        row: dict[str, Any] = {"id": custom_id, self.text: self._text(number, body)}
        for name, value in body.items():
            if value is None or name in ("model", self.text) or name in IGNORED:
                continue
            if name == "max_completion_tokens":
                if body.get("max_tokens") not in (None, value):
                    raise self.refuse(
                        number,
                        "body.max_completion_tokens",
                        f"is {value!r} but body.max_tokens is {body['max_tokens']!r}",
                        "give one of them",
                    )
                row["max_tokens"] = value
            elif name in SAMPLING:
                row[name] = value
            elif name in NEUTRAL:
                if value not in NEUTRAL[name] or isinstance(value, bool) != isinstance(NEUTRAL[name][0], bool):
                    allowed = " or ".join(orjson.dumps(v).decode() for v in NEUTRAL[name])
                    raise self.refuse(
                        number,
                        f"body.{name}",
                        f"{_shown(value)}, which MLOC's batches do not support",
                        f"set it to {allowed} or leave it out",
                    )
            else:
                supported = ", ".join(("model", self.text, "max_completion_tokens", *SAMPLING))
                raise self.refuse(
                    number, f"body.{name}", "is not supported by MLOC's batches", f"remove it (supported: {supported})"
                )
        return row

    def _custom_id(self, number: int, line: dict[str, Any]) -> str:
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem = "is missing" if custom_id is None else "is not a non-empty string"
            raise self.refuse(number, "custom_id", problem, "give each line a unique custom_id string")
        if len(custom_id) > MAX_CUSTOM_ID:
            raise self.refuse(number, "custom_id", f"is over {MAX_CUSTOM_ID} characters", "shorten it")
        first = self.seen.setdefault(custom_id, number)
        if first != number:
            raise self.refuse(
                number,
                "custom_id",
                f"{custom_id[:100]!r} is also the custom_id of line {first}",
                "give each line its own custom_id",
            )
        return custom_id

    def _model(self, number: int, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise self.refuse(number, "body.model", "is missing or empty", "name the model every line runs on")
        if self.model is None:
            self.model, self.model_line = model, number
        elif model != self.model:
            raise self.refuse(
                number,
                "body.model",
                f"is {model[:100]!r} but line {self.model_line} has {self.model[:100]!r}",
                "a batch runs one model: split the file into one per model",
            )

    def _text(self, number: int, body: dict[str, Any]) -> Any:
        value = body.get(self.text)
        if self.endpoint == COMPLETIONS:
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
                raise self.refuse(number, "body.prompt", problem, "give one prompt per line, as a string")
            return value  # an empty prompt fails its own request, on the worker
        if not isinstance(value, list):
            problem = "is missing" if value is None else "is not a list"
            raise self.refuse(number, "body.messages", problem, "give the chat as a list of {role, content}")
        return [self._message(number, index, message) for index, message in enumerate(value)]

    def _message(self, number: int, index: int, message: Any) -> dict[str, str]:
        field = f"body.messages[{index}]"
        if not isinstance(message, dict):
            raise self.refuse(number, field, "is not an object", "give each message as {role, content}")
        given = message.get("role")
        role = ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise self.refuse(number, f"{field}.role", f"is {given!r}", f"use one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI's content parts: MLOC's engines take text, so text parts are joined and others refused.
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise self.refuse(
                        number,
                        f"{field}.content",
                        "has a part that is not text",
                        "MLOC's batches take text only: give the content as a string or text parts",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            problem = "is missing" if content is None else "is not a string"
            raise self.refuse(number, f"{field}.content", problem, "give the message's text as a string")
        return {"role": role, "content": content}


def refusal(file_id: str, number: int, field: str | None, problem: str, fix: str) -> BatchFileError:
    """The refusal of a batch file at line ``number``: about its ``field``, or the line as a whole (None).

    The detail's ``path`` becomes OpenAI's ``param``, which names a request field or is null, and its
    ``line`` the line's number."""
    subject = field or "the line"
    detail: dict[str, Any] = {"message": f"line {number}: {problem}", "fix": fix, "line": number}
    if field is not None:
        detail["path"] = field
    return BatchFileError(f"input file {file_id} line {number}: {subject} {problem}; {fix}", details=[detail])


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """``is VALUE`` as JSON (cut short), or ``is missing``."""
    return "is missing" if value is None else f"is {orjson.dumps(value, default=str).decode()[:100]}"


def convert(source: IO[bytes], target: IO[bytes], *, file_id: str, endpoint: str) -> Converted:
    """Check every line of a batch file and write it to ``target`` as one MLOC dataset row per request.

    Raises :class:`BatchFileError` at the first line MLOC cannot run; ``target`` is then incomplete and
    the caller throws it away."""
    if endpoint not in ENDPOINTS:
        raise unsupported_endpoint(endpoint)
    reader = _Reader(file_id, endpoint)
    block: list[bytes] = []
    size = requests = 0
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        line = orjson.dumps(reader.row(number, raw), option=orjson.OPT_APPEND_NEWLINE)
        block.append(line)
        size += len(line)
        requests += 1
        if size >= BLOCK:
            target.write(b"".join(block))
            block, size = [], 0
    target.write(b"".join(block))
    if reader.model is None:
        raise BatchFileError(
            f"input file {file_id} has no request lines; give one JSON request per line",
            details=[{"path": "input_file_id", "message": "the file is empty"}],
        )
    return Converted(requests, reader.model, reader.model_line)


def unsupported_endpoint(endpoint: str) -> BatchFileError:
    return BatchFileError(
        f"endpoint {endpoint[:100]!r} is not one MLOC's batches serve; use {' or '.join(ENDPOINTS)}",
        details=[{"path": "endpoint", "message": f"is {endpoint[:100]!r}", "fix": f"use {' or '.join(ENDPOINTS)}"}],
    )


@dataclass(frozen=True)
class BatchOutput:
    """What an output or error line says besides the result line itself."""

    key: str  # the batch's own part of every id (its task id without dashes)
    endpoint: str
    model: str
    created: int


# A row's error names the dataset column it read; a batch's rows name their columns after the request's
# body fields, so the column is the field: "column 'temperature' (temperature) is 7: ..." and "prompt
# column 'prompt' is empty" are about body.temperature and body.prompt.
_ROW_FIELD = re.compile(r"^column '(?P<column>\w+)' \((?P<field>\w+)\) is (?P<rest>.*)$", re.DOTALL)
_ROW_TEXT = re.compile(r"^(?:prompt|messages) column '(?P<field>\w+)' (?P<rest>.*)$", re.DOTALL)


def request_error(message: str) -> tuple[str, str | None]:
    """A failed row's error as a request's: the message in terms of the request body, and its ``param``."""
    for pattern in (_ROW_FIELD, _ROW_TEXT):
        found = pattern.match(message)
        if found and found["field"] in (*SAMPLING, *TEXT_FIELD.values()):
            param = f"body.{found['field']}"
            return f"{param} {'is ' if pattern is _ROW_FIELD else ''}{found['rest']}", param
    return message, None


def response_line(line: dict[str, Any], index: int, batch: BatchOutput) -> dict[str, Any]:
    """OpenAI's line for one MLOC result line (``index`` is its place in the batch): the response, or
    for a row that failed a 400 answer with the row's error."""
    tag = f"{batch.key}-{index}"
    if line.get("error") is not None:
        message, param = request_error(str(line["error"]))
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
        response = {"status_code": 400, "request_id": f"req_{tag}", "body": {"error": error}}
        return {"id": f"batch_req_{tag}", "custom_id": line.get("id"), "response": response, "error": None}
    prompt, completion = int(line.get("prompt_tokens") or 0), int(line.get("completion_tokens") or 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    choice: dict[str, Any] = {"index": 0, "finish_reason": line.get("finish_reason"), "logprobs": None}
    if batch.endpoint == CHAT:
        reply = line.get("output")
        # A conversation without a chat template ends "Assistant:", so its reply starts with a space.
        choice["message"] = {"role": "assistant", "content": reply.lstrip() if isinstance(reply, str) else reply}
        body: dict[str, Any] = {"id": f"chatcmpl-{tag}", "object": "chat.completion"}
    else:
        choice["text"] = line.get("output")
        body = {"id": f"cmpl-{tag}", "object": "text_completion"}
    body.update({"created": batch.created, "model": batch.model, "choices": [choice], "usage": usage})
    response = {"status_code": 200, "request_id": f"req_{tag}", "body": body}
    return {"id": f"batch_req_{tag}", "custom_id": line.get("id"), "response": response, "error": None}


def output_blocks(handle: IO[bytes], batch: BatchOutput, *, errors: bool) -> Iterator[bytes]:
    """The output file (``errors=False``: the rows that succeeded) or the error file of a batch, from its
    result lines, in blocks; closes ``handle`` at the end. A last line without its newline is still
    being written, and is left out."""
    with handle:
        block: list[bytes] = []
        size = 0
        for index, raw in enumerate(handle):
            if not raw.endswith(b"\n"):
                break
            line = orjson.loads(raw)
            if (line.get("error") is not None) != errors:
                continue
            out = orjson.dumps(response_line(line, index, batch), option=orjson.OPT_APPEND_NEWLINE)
            block.append(out)
            size += len(out)
            if size >= BLOCK:
                yield b"".join(block)
                block, size = [], 0
        if block:
            yield b"".join(block)


@dataclass(frozen=True)
class Counts:
    """Requests answered and failed, and the tokens of those answered."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def count_lines(handle: IO[bytes]) -> Counts:
    """The counts of the whole result lines of ``handle``; closes it."""
    completed = failed = prompt = completion = 0
    with handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            line = orjson.loads(raw)
            if line.get("error") is None:
                completed += 1
                prompt += int(line.get("prompt_tokens") or 0)
                completion += int(line.get("completion_tokens") or 0)
            else:
                failed += 1
    return Counts(completed, failed, prompt, completion)
