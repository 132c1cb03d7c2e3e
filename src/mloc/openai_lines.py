"""The lines of OpenAI batch files: request lines checked and turned into MLOC dataset rows, and MLOC's
result lines turned into OpenAI's output and error lines.

A request line is ``{"custom_id", "method": "POST", "url": ENDPOINT, "body": {...}}``. What makes a
line unusable (not JSON, a field missing, a duplicate ``custom_id``, a second model, an option MLOC
cannot honour) is a :class:`Problem` of the file: as at OpenAI, a batch whose file has any is created
``failed``, every problem an entry of its ``errors`` naming the line, the field and the fix. What
concerns one request only (an empty prompt, a temperature out of range) is left to the worker, where
the row fails alone and lands in the error file, as it does at OpenAI.
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
# A failed batch lists the problems of this many lines; one more entry counts the rest. Every line is
# still checked, so the count is whole.
MAX_PROBLEMS = 100

# The codes of a failed batch's errors: those OpenAI's batches are seen to answer (invalid_json_line,
# missing_required_parameter, invalid_url, model_not_found, streaming_unsupported), the others named alike.
INVALID_JSON_LINE = "invalid_json_line"
MISSING = "missing_required_parameter"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_URL = "invalid_url"
MODEL_MISMATCH = "model_mismatch"
MODEL_NOT_FOUND = "model_not_found"
STREAMING_UNSUPPORTED = "streaming_unsupported"
UNSUPPORTED_VALUE = "unsupported_value"
UNSUPPORTED_PARAMETER = "unsupported_parameter"
EMPTY_FILE = "empty_file"
TOO_MANY_ERRORS = "too_many_errors"


@dataclass(frozen=True)
class Problem:
    """What is wrong with a batch file: one line's (``line``), or the file's as a whole (None). An entry
    of a failed batch's ``errors``: OpenAI's ``code``, the request field at fault (``param``, None for
    the line as a whole), and a message that names the line, the field and the fix."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class Converted:
    """What a batch file holds: its requests and their one model, or its problems."""

    requests: int
    model: str | None
    # Where the model is first named, for a problem of the model itself.
    model_line: int = dataclasses.field(default=1, compare=False)
    # In line order, at most MAX_PROBLEMS of them and then one that counts the rest.
    problems: tuple[Problem, ...] = ()


class BatchFileError(BadRequest):
    """A batch file MLOC cannot run, for ``problem``; the message names the line, the field and the fix."""

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None, problem: Problem) -> None:
        super().__init__(message, details=details)
        self.problem = problem


class _Refused(Exception):
    """A line's problem, raised out of the checks of that line."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Reader:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.text = TEXT_FIELD[endpoint]
        self.model: str | None = None
        self.model_line = 0
        self.seen: dict[str, int] = {}

    @staticmethod
    def refuse(number: int, field: str | None, problem: str, fix: str, code: str) -> _Refused:
        """The problem of line ``number``, with its ``field`` (None: the line as a whole)."""
        return _Refused(line_problem(number, field, problem, fix, code))

    def row(self, number: int, raw: bytes) -> dict[str, Any]:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                problem = f"is not UTF-8 text (byte {bad.start})"
                raise self.refuse(number, None, problem, "save the file as UTF-8", INVALID_JSON_LINE) from None
            if raw.startswith(BOM):
                # Editors on Windows write one; the line's JSON after it may be fine, so say what to change.
                problem = "starts with a byte order mark (BOM)"
                fix = "save the file as UTF-8 without a BOM"
                raise self.refuse(number, None, problem, fix, INVALID_JSON_LINE) from None
            # orjson says where as "line 1 column 37 (char 36)": the line is the file's, said once already.
            # Counted in the line's own characters: an object cut short ends at its line break, which
            # orjson would report as column 1 of a line after it.
            column = len(raw[: exc.pos].rstrip(b"\r\n").decode("utf-8", "replace")) + 1
            problem = f"is not JSON ({exc.msg} at column {column})"
            raise self.refuse(number, None, problem, "write one JSON object per line", INVALID_JSON_LINE) from None
        if not isinstance(line, dict):
            problem = f"is a JSON {_json_kind(line)}, not an object"
            raise self.refuse(number, None, problem, "write one JSON object per line", INVALID_JSON_LINE)
        custom_id = self._custom_id(number, line)
        method = line.get("method")
        if method != "POST":
            raise self.refuse(number, "method", _shown(method), 'set it to "POST"', _missing_or(method, INVALID_VALUE))
        url = line.get("url")
        if url != self.endpoint:
            fix = (
                f"set it to the batch's endpoint {self.endpoint!r}, or create a batch per endpoint"
                if url in ENDPOINTS
                else f"MLOC's batches serve {' and '.join(ENDPOINTS)}: set it to {self.endpoint!r}"
            )
            raise self.refuse(number, "url", _shown(url), fix, _missing_or(url, INVALID_URL))
        body = line.get("body")
        if not isinstance(body, dict):
            problem = "is missing" if body is None else "is not an object"
            code = _missing_or(body, INVALID_TYPE)
            raise self.refuse(number, "body", problem, "give the request's body as an object", code)
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
                        INVALID_VALUE,
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
                        STREAMING_UNSUPPORTED if name == "stream" else UNSUPPORTED_VALUE,
                    )
            else:
                supported = ", ".join(("model", self.text, "max_completion_tokens", *SAMPLING))
                raise self.refuse(
                    number,
                    f"body.{name}",
                    "is not supported by MLOC's batches",
                    f"remove it (supported: {supported})",
                    UNSUPPORTED_PARAMETER,
                )
        return row

    def _custom_id(self, number: int, line: dict[str, Any]) -> str:
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem = "is missing" if custom_id is None else "is not a non-empty string"
            fix = "give each line a unique custom_id string"
            raise self.refuse(number, "custom_id", problem, fix, _missing_or(custom_id, INVALID_VALUE))
        if len(custom_id) > MAX_CUSTOM_ID:
            raise self.refuse(number, "custom_id", f"is over {MAX_CUSTOM_ID} characters", "shorten it", INVALID_VALUE)
        first = self.seen.setdefault(custom_id, number)
        if first != number:
            raise self.refuse(
                number,
                "custom_id",
                f"{custom_id[:100]!r} is also the custom_id of line {first}",
                "give each line its own custom_id",
                DUPLICATE_CUSTOM_ID,
            )
        return custom_id

    def _model(self, number: int, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            fix = "name the model every line runs on"
            raise self.refuse(number, "body.model", "is missing or empty", fix, _missing_or(model, INVALID_VALUE))
        if self.model is None:
            self.model, self.model_line = model, number
        elif model != self.model:
            raise self.refuse(
                number,
                "body.model",
                f"is {model[:100]!r} but line {self.model_line} has {self.model[:100]!r}",
                "a batch runs one model: split the file into one per model",
                MODEL_MISMATCH,
            )

    def _text(self, number: int, body: dict[str, Any]) -> Any:
        value = body.get(self.text)
        if self.endpoint == COMPLETIONS:
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
                fix = "give one prompt per line, as a string"
                raise self.refuse(number, "body.prompt", problem, fix, _missing_or(value, INVALID_TYPE))
            return value  # an empty prompt fails its own request, on the worker
        if not isinstance(value, list):
            problem = "is missing" if value is None else "is not a list"
            fix = "give the chat as a list of {role, content}"
            raise self.refuse(number, "body.messages", problem, fix, _missing_or(value, INVALID_TYPE))
        return [self._message(number, index, message) for index, message in enumerate(value)]

    def _message(self, number: int, index: int, message: Any) -> dict[str, str]:
        field = f"body.messages[{index}]"
        if not isinstance(message, dict):
            raise self.refuse(number, field, "is not an object", "give each message as {role, content}", INVALID_TYPE)
        given = message.get("role")
        role = ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            fix = f"use one of {', '.join(ROLES)}"
            raise self.refuse(number, f"{field}.role", f"is {given!r}", fix, _missing_or(given, INVALID_VALUE))
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
                        UNSUPPORTED_VALUE,
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            problem = "is missing" if content is None else "is not a string"
            fix = "give the message's text as a string"
            raise self.refuse(number, f"{field}.content", problem, fix, _missing_or(content, INVALID_TYPE))
        return {"role": role, "content": content}


def _missing_or(value: Any, code: str) -> str:
    """The code of a field's problem: a missing field's, or ``code`` for one given that will not do."""
    return MISSING if value is None else code


def line_problem(number: int, field: str | None, problem: str, fix: str, code: str) -> Problem:
    """The problem of line ``number``: about its ``field`` (``param``, a request field), or the line as a
    whole (None)."""
    return Problem(code, f"line {number}: {field or 'the line'} {problem}; {fix}", field, number)


def refusal(file_id: str, number: int, field: str | None, problem: str, fix: str, code: str) -> BatchFileError:
    """The problem of line ``number`` found away from the lines' own checks (the model's), raised: a
    batch's create makes it an entry of the failed batch's errors."""
    found = line_problem(number, field, problem, fix, code)
    detail = {"path": field or "input_file_id", "message": f"line {number}: {problem}", "fix": fix}
    return BatchFileError(f"input file {file_id} {found.message}", details=[detail], problem=found)


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """``is VALUE`` as JSON (cut short), or ``is missing``."""
    return "is missing" if value is None else f"is {orjson.dumps(value, default=str).decode()[:100]}"


def convert(source: IO[bytes], target: IO[bytes], *, endpoint: str) -> Converted:
    """Check every line of a batch file and write it to ``target`` as one MLOC dataset row per request.

    A file with problems has them in the answer's ``problems`` (every line is checked, so all of them
    are told at once); ``target`` is then incomplete and the caller throws it away."""
    if endpoint not in ENDPOINTS:
        raise unsupported_endpoint(endpoint)
    reader = _Reader(endpoint)
    problems: list[Problem] = []
    unlisted = 0
    first_unlisted = 0
    block: list[bytes] = []
    size = requests = 0
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        try:
            row = reader.row(number, raw)
        except _Refused as refused:
            if len(problems) < MAX_PROBLEMS:
                problems.append(refused.problem)
            else:
                unlisted += 1
                first_unlisted = first_unlisted or number
            continue
        requests += 1
        if problems:
            continue  # the rows are thrown away: only the checks go on
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        block.append(line)
        size += len(line)
        if size >= BLOCK:
            target.write(b"".join(block))
            block, size = [], 0
    target.write(b"".join(block))
    if unlisted:
        problems.append(
            Problem(
                TOO_MANY_ERRORS,
                f"{unlisted:,} more line(s) have problems, the first of them line {first_unlisted:,}, past the "
                f"{MAX_PROBLEMS} listed; fix those lines too, upload the file again and create a new batch, "
                "which lists what is left",
            )
        )
    if not requests and not problems:
        problems.append(Problem(EMPTY_FILE, "the file has no request lines; give one JSON request per line"))
    return Converted(requests, reader.model, reader.model_line or 1, tuple(problems))


def unsupported_endpoint(endpoint: str) -> BadRequest:
    return BadRequest(
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


def output_sizes(handle: IO[bytes], batch: BatchOutput) -> tuple[int, int]:
    """The sizes in bytes of a batch's output file and of its error file, as :func:`output_blocks` sends
    them, from one read of its result lines; closes ``handle``."""
    sizes = [0, 0]
    with handle:
        for index, raw in enumerate(handle):
            if not raw.endswith(b"\n"):
                break
            line = orjson.loads(raw)
            out = orjson.dumps(response_line(line, index, batch), option=orjson.OPT_APPEND_NEWLINE)
            sizes[line.get("error") is not None] += len(out)
    return sizes[0], sizes[1]


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
