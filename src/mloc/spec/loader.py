"""Turn a task file or request body (YAML or JSON) into a validated :class:`Document`.

Errors name the field's path (``spec.inference.max_tokens``), what was wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import uuid
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mloc.errors import BadRequest, PayloadTooLarge, SpecError
from mloc.spec.base import API_VERSION, Document
from mloc.spec.registry import document_model, kinds, spec_types

MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 32
TOO_DEEP = (
    f"the task nests deeper than {MAX_DEPTH} levels; a task needs a handful, so flatten the nested lists "
    "and mappings (a long list of prompts is one level, however long)"
)
ENVELOPE = ("apiVersion", "kind", "metadata", "spec")


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases, which YAML bombs are made of."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(
                f"YAML aliases are not allowed in task files (line {event.start_mark.line + 1}); "
                "write the value out in full"
            )
        return super().compose_node(parent, index)


def _refuse_binary(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    # Bytes have no JSON form: such a task could be validated but never stored.
    raise yaml.constructor.ConstructorError(
        None, None, "binary values (!!binary) are not supported; write the value as text", node.start_mark
    )


def _unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # YAML says a mapping's keys are unique, and PyYAML keeps the last of two silently: a task file with
    # `hyperparameters:` twice would lose the first one's settings without a word.
    loader.flatten_mapping(node)
    first: dict[tuple[str, str], yaml.Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        seen = first.setdefault((key_node.tag, key_node.value), key_node)
        if seen is not key_node:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the key {key_node.value[:80]!r} is given twice in one mapping (first at line "
                f"{seen.start_mark.line + 1}); the later one would replace the first: keep one",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


for _loader in (_NoAliasLoader,):
    _loader.add_constructor("tag:yaml.org,2002:binary", _refuse_binary)
    _loader.add_constructor("tag:yaml.org,2002:map", _unique_keys)
_FAST_LOADER: type[yaml.SafeLoader] = type("_FastLoader", (getattr(yaml, "CSafeLoader", _NoAliasLoader),), {})
_FAST_LOADER.add_constructor("tag:yaml.org,2002:binary", _refuse_binary)
_FAST_LOADER.add_constructor("tag:yaml.org,2002:map", _unique_keys)
# libyaml's composer recurses in C with no depth limit: a document nested some 40,000 levels deep (80 kB
# of "[") overflows the stack and kills the process (PyYAML's own composer hits the recursion limit at a
# few hundred). Each level needs one of these characters or a new line, so a document with few of them
# is shallow; others are measured on the parser's events first.
_NESTING_MARKS = ("[", "{", "-", "?", "\n")
_SHALLOW = 100


def _is_depth_refusal(exc: yaml.YAMLError) -> bool:
    """Whether the YAML library itself refused the nesting (PyYAML 6.0.4 and libyaml 0.2.5 on have limits
    of their own, which can answer before MLOC's check does)."""
    text = str(getattr(exc, "problem", None) or exc).lower()
    return "nesting depth" in text or "max depth" in text or "too deep" in text


def _check_yaml_depth(text: str) -> None:
    if sum(text.count(mark) for mark in _NESTING_MARKS) <= _SHALLOW:
        return
    depth = 0
    # The parser keeps its state on the heap, so walking its events is safe at any depth.
    for event in yaml.parse(text, Loader=_FAST_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH + 1:
                raise SpecError(TOO_DEEP)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


# A \uD800-\uDFFF escape decodes to a lone surrogate unless it is half of a pair; such a string has no
# UTF-8 form and could be validated but never stored. Only bodies with such an escape are walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_unicode(data: Any) -> None:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                lone = item[exc.start : exc.end]
                raise SpecError(
                    f"a string holds a lone UTF-16 surrogate ({lone!r}); escape characters outside the basic "
                    "plane as a surrogate pair, or send them as UTF-8"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# Keys of a task file; two of them on one line (or a body that is all one comment) mean the line breaks
# were stripped in transit, as `curl -d @file` does.
_TASK_KEYS = re.compile(
    r"(?<![\w-])(apiVersion|kind|metadata|spec|taskType|resources|hardware|model|source|identifier|inference|"
    r"hyperparameters|prompts|dataset)\s*:"
)
FLATTENED = (
    "the task body arrived as a single line: its line breaks were stripped before it was sent, so the YAML "
    "cannot be read. `curl -d @file` does that; send the file unchanged with `curl --data-binary @my_task.yaml` "
    "(and -H 'Content-Type: text/yaml'), or use `mloc submit my_task.yaml`"
)


def _looks_flattened(text: str) -> bool:
    if "\n" in text or "\r" in text:
        return False
    body = text.strip()
    if body.startswith(("{", "[")):
        return False
    if body.startswith("#") and ":" in body:
        return True
    return len(set(_TASK_KEYS.findall(body))) >= 2


def parse_body(data: bytes | str, content_type: str | None = None, *, limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse YAML or JSON text into plain data, refusing oversized or hostile documents."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > limit:
        raise PayloadTooLarge(f"task body is {len(raw)} bytes; the limit is {limit} (MLOC_MAX_BODY_BYTES)")
    if not raw.strip():
        raise SpecError("the task body is empty; send a mloc/v1 task as YAML or JSON")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"the task body is not UTF-8 text (byte {exc.start})") from exc
    if _looks_flattened(text):
        raise BadRequest(FLATTENED)
    wants_json = bool(content_type and "json" in content_type)
    looks_json = text.lstrip().startswith(("{", "["))
    if wants_json or looks_json:
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
            if _SURROGATE_ESCAPE.search(text):
                _check_unicode(data)
            return data
        except RecursionError:
            raise SpecError(TOO_DEEP) from None
        except json.JSONDecodeError as exc:
            # JSON and YAML are both taken whatever the content type says (seed 2 posts YAML as JSON),
            # and YAML's flow style ({taskType: echo}) starts as JSON does, its keys unquoted. Where
            # the keys are quoted, the body was meant as JSON: its error is the one to show.
            if not looks_json:
                return _one_document(text)
            problem = SpecError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
            if "enclosed in double quotes" not in exc.msg:
                raise problem from exc
            try:
                return _one_document(text)
            except SpecError:
                raise problem from exc
        except ValueError as exc:  # a number too long to convert, NaN or Infinity
            raise SpecError(f"invalid JSON value: {exc}") from None
    return _one_document(text)


MANY_DOCUMENTS = (
    "the body holds {count} YAML documents (--- between them) where one task is taken; send them to POST "
    "/api/v1/tasks/bulk, as `mloc submit FILE` does (`mloc validate FILE` checks them all)"
)


def _one_document(text: str) -> Any:
    """The one YAML document of ``text``; empty ones (a trailing ``---``) are skipped."""
    try:
        documents = [_load_yaml(text, many=False)]
    except _SeveralDocuments:
        documents = [item for item in _load_yaml(text, many=True) if item is not None]
    if len(documents) > 1:
        raise SpecError(MANY_DOCUMENTS.format(count=len(documents)))
    if not documents or documents[0] is None:
        raise SpecError("the task body holds only comments or empty documents; send a mloc/v1 task as YAML or JSON")
    return documents[0]


class _SeveralDocuments(Exception):
    """A stream of several YAML documents was read as one."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; write a finite number, or quote it to keep it as text")


def parse_stream(data: bytes, *, limit: int) -> list[Any]:
    """Parse a multi-document YAML stream (``---`` between tasks) into plain data, one item per document."""
    if len(data) > limit:
        raise PayloadTooLarge(f"the body is {len(data)} bytes; the limit is {limit} (MLOC_MAX_BODY_BYTES x 16)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"the body is not UTF-8 text (byte {exc.start})") from exc
    return list(_load_yaml(text, many=True))


def _load_yaml(text: str, *, many: bool) -> Any:
    # Anchors and aliases need '&' and '*'; without them libyaml's fast loader is safe to use.
    loader = _NoAliasLoader if ("&" in text or "*" in text) else _FAST_LOADER
    try:
        _check_yaml_depth(text)
        return list(yaml.load_all(text, Loader=loader)) if many else yaml.load(text, Loader=loader)
    except yaml.composer.ComposerError as exc:
        if not many and exc.problem == "but found another document":
            raise _SeveralDocuments from None
        raise _yaml_error(exc, text) from exc
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, text) from exc
    except yaml.YAMLError as exc:
        if _is_depth_refusal(exc):
            raise SpecError(TOO_DEEP) from None
        raise SpecError(f"invalid YAML: {exc}") from exc
    except ValueError as exc:  # a date, number or !!float/!!int value that does not convert
        raise SpecError(f"invalid YAML value: {exc}; quote it to keep it as text") from None
    except RecursionError:
        raise SpecError(TOO_DEEP) from None


def _yaml_error(exc: yaml.MarkedYAMLError, text: str) -> SpecError:
    if _is_depth_refusal(exc):
        return SpecError(TOO_DEEP)
    mark = exc.problem_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = str(exc.problem or exc)
    lines = text.split("\n")
    if mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]:
        # libyaml says "found character that cannot start any token" of a tab: say what it is.
        problem += "; it is a tab, and YAML indents with spaces only: replace the tabs with spaces"
    return SpecError(f"invalid YAML{where}: {problem}")


def shape_problem(value: Any) -> str | None:
    """What makes ``value`` unfit to store: more than :data:`MAX_DEPTH` levels below its top, or a
    number that is NaN or infinite (JSON has none: stored, it would turn into null); None when
    nothing does. Walked with a stack, not recursion: every submit and every worker's start pays for
    this walk."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if not children:
            continue
        if level >= MAX_DEPTH:  # its children lie one level below
            return TOO_DEEP
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                return _non_finite(value)
    return None


def _non_finite(value: Any, path: str = "") -> str:
    """The message for the first NaN or infinite number in ``value``, naming where it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return (
            f"{path or '(task)'}: {value} is not a finite number; write a finite number, or quote it to keep it as text"
        )
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = _non_finite(child, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return ""


def normalize(data: Any) -> dict[str, Any]:
    """Accept both the full envelope and seed 2's fragments (``taskType`` at the top level)."""
    if not isinstance(data, dict):
        raise SpecError(f"a task must be a mapping with apiVersion, kind, metadata and spec; got {type(data).__name__}")
    problem = shape_problem(data)
    if problem:
        raise SpecError(problem)
    if "spec" not in data and "taskType" in data:
        envelope = {key: data[key] for key in ENVELOPE if key in data}
        envelope["spec"] = {key: value for key, value in data.items() if key not in ENVELOPE}
        data = envelope
    data = dict(data)
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise SpecError(
            "missing 'spec': a task needs spec.taskType and its settings",
            details=[{"path": "spec", "message": "required", "fix": "add a 'spec' mapping with a taskType"}],
        )
    version = data.setdefault("apiVersion", API_VERSION)
    if version != API_VERSION:
        raise SpecError(
            f"apiVersion {version!r} is not supported; use {API_VERSION!r}",
            details=[{"path": "apiVersion", "message": f"unsupported: {version!r}", "fix": f"set {API_VERSION}"}],
        )
    task_type = spec.get("taskType")
    known = spec_types()
    if task_type is None:
        kind_map = kinds()
        if data.get("kind") in kind_map:
            spec = {**spec, "taskType": kind_map[data["kind"]]}
            data["spec"] = spec
            task_type = spec["taskType"]
        else:
            raise SpecError(
                f"missing spec.taskType; use one of: {', '.join(known)}",
                details=[{"path": "spec.taskType", "message": "required", "fix": f"one of {list(known)}"}],
            )
    if not isinstance(task_type, str) or task_type not in known:
        hint = difflib.get_close_matches(str(task_type), list(known), n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"use one of: {', '.join(known)}"
        raise SpecError(
            f"unknown taskType {task_type!r}; {fix}",
            details=[{"path": "spec.taskType", "message": f"unknown: {task_type!r}", "fix": fix}],
        )
    expected_kind = known[task_type].kind
    kind = data.setdefault("kind", expected_kind)
    if kind not in (expected_kind, "Task"):
        raise SpecError(
            f"kind {kind!r} does not match taskType {task_type!r}; use kind {expected_kind!r}",
            details=[{"path": "kind", "message": f"{kind!r} vs taskType {task_type!r}", "fix": expected_kind}],
        )
    data["kind"] = expected_kind
    return data


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names (by alias) of the model found at ``loc``, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(str(part)) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _kind(value: Any) -> str:
    """What a wrong value is, in YAML's words."""
    if isinstance(value, str):
        return f"the text {value[:60]!r}"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "nothing" if value is None else type(value).__name__


def _not_allowed(error: Any) -> tuple[str, str]:
    """A value outside a fixed set: which value and the allowed ones, and the closest as the fix."""
    expected = str((error.get("ctx") or {}).get("expected", ""))
    given = error.get("input")
    close = difflib.get_close_matches(str(given), re.findall(r"'([^']*)'", expected), n=1)
    return f"{given!r} is not one of {expected}", f"did you mean {close[0]!r}?" if close else ""


def describe(exc: ValidationError, model: type[BaseModel]) -> SpecError:
    details = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = ".".join(str(part) for part in loc) or "(task)"
        message = error["msg"].removeprefix("Value error, ")
        fix = ""
        if error["type"] == "extra_forbidden":
            siblings = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
            message = "unknown field"
            fix = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(siblings)}"
        elif error["type"] == "missing":
            message = "required field is missing"
            fix = f"add '{loc[-1]}'"
        elif error["type"] in ("literal_error", "enum"):
            message, fix = _not_allowed(error)
        elif error["type"] in ("model_type", "model_attributes_type", "dict_type"):
            fields = _fields_at(model, loc)
            message = f"expected a mapping, got {_kind(error.get('input'))}"
            fix = f"write a mapping of {', '.join(fields)}" if fields else "write a mapping (key: value)"
        elif error["type"] == "list_type":
            given = error.get("input")
            message = f"expected a list, got {_kind(given)}"
            example = f", e.g. [{json.dumps(given)}]" if isinstance(given, str | int | float) else ""
            fix = f"write a list{example}"
        elif error["type"] in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"):
            whole = error["type"].startswith("int")
            message = f"expected a {'whole ' if whole else ''}number, got {_kind(error.get('input'))}"
            fix = "write a whole number, e.g. 8" if whole else "write a number, e.g. 0.0002 or 2e-4"
        elif error["type"] == "value_error" and "; " in message:
            # MLOC's own checks say "what is wrong; what to do": the last part is the fix.
            fix = message.rsplit("; ", 1)[1]
        details.append({"path": path, "message": message, "fix": fix})
    summary = "; ".join(
        f"{d['path']}: {d['message']}" + (f" ({d['fix']})" if d["fix"] and d["fix"] not in d["message"] else "")
        for d in details[:5]
    )
    if len(details) > 5:
        summary += f"; and {len(details) - 5} more"
    return SpecError(f"invalid task: {summary}", details=details)


def validate(data: Any) -> Document:
    """Validate plain data (already parsed) as a task; raises :class:`SpecError`."""
    normalized = normalize(data)
    model = document_model(normalized["spec"]["taskType"])
    try:
        return model.model_validate(normalized)
    except ValidationError as exc:
        raise describe(exc, model) from None


def load(data: bytes | str, content_type: str | None = None, *, limit: int = MAX_DOCUMENT_BYTES) -> Document:
    """Parse and validate a task body."""
    return validate(parse_body(data, content_type, limit=limit))


def default_name(document: Document) -> str:
    return document.metadata.name or f"{document.spec.task_type}-{uuid.uuid4().hex[:6]}"
