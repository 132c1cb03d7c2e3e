"""Task files without a cluster: `mloc validate` and `mloc schema`."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mloc.cli import output
from mloc.cli.output import JsonFlag, OutputFormat, wants_json
from mloc.cli.root import app
from mloc.errors import MlocError

if TYPE_CHECKING:
    from mloc.spec import Document


@dataclass
class _Checked:
    file: Path
    number: int | None  # its place in a file of several tasks (from 1); None for a file of one
    document: Document | None
    error: MlocError | None
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (field, message) a submit would refuse

    @property
    def label(self) -> str:
        """'file', or 'file (document N)': as `mloc submit` names it."""
        return str(self.file) if self.number is None else f"{self.file} (document {self.number})"

    @property
    def valid(self) -> bool:
        return self.document is not None and not self.problems

    def errors(self) -> list[dict[str, Any]]:
        """Each problem as the API details one: the field where the check names one, the message and its fix."""
        found: list[dict[str, Any]] = [{"path": path, "message": said, "fix": None} for path, said in self.problems]
        if self.error is not None:
            details = [detail for detail in self.error.details if isinstance(detail, dict)]
            found.extend(
                {"path": detail.get("path"), "message": str(detail.get("message")), "fix": detail.get("fix")}
                for detail in details
            )
            if not details:
                found.append({"path": None, "message": self.error.message, "fix": None})
        return found

    def to_json(self) -> dict[str, Any]:
        document = self.document
        return {
            "label": self.label,
            "file": str(self.file),
            "document": self.number,
            "valid": self.valid,
            "kind": document.kind if document else None,
            "taskType": document.spec.task_type if document else None,
            "name": document.metadata.name if document else None,
            "errors": [] if self.valid else self.errors(),
        }


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Task files (YAML or JSON; --- between tasks).")
    ],
    json_out: JsonFlag = False,
    fmt: OutputFormat = None,
) -> None:
    """Check task files without submitting them; each task of a multi-document file (---) is checked,
    and a file's tasks that wait for each other (dependsOn, or a `from:` naming another's output) as the
    submit would plan them: names that name no task, a task that names itself, two tasks of one name, an
    output the named task does not make, and cycles. The files given are checked as one submission, as
    `mloc submit` sends them in one request; a task id is not looked up.

    --json prints one document: for each task, whether it is valid, its kind, taskType and name, and
    its errors (field, message, fix). The exit status is 1 when any task is invalid, with --json too."""
    checked: list[_Checked] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            output.die(f"cannot read {file}: {exc.strerror or exc}")
        for number, check in _checks(raw):
            try:
                checked.append(_Checked(file, number, check(), None))
            except MlocError as exc:
                checked.append(_Checked(file, number, None, exc))
    # One submission, as `mloc submit` sends every file given in one request and the orchestrator plans
    # them together, in order.
    loaded = [(item, item.document) for item in checked if item.document is not None]
    for index, path, problem in graph_problems([document for _, document in loaded]):
        loaded[index][0].problems.append((path, problem))
    bad = sum(1 for item in checked if not item.valid)
    if wants_json(json_out, fmt):
        output.print_json({"ok": not bad, "documents": [item.to_json() for item in checked]})
    else:
        for item in checked:
            _say(item)
    if bad:
        raise typer.Exit(1)


def _say(item: _Checked) -> None:
    """'ok LABEL: Kind (taskType)' on stdout, or each of its problems on stderr."""
    if item.valid and item.document is not None:
        output.line(
            output.styled("ok", "green"), f"{item.label}: {item.document.kind} ({item.document.spec.task_type})"
        )
        return
    for path, problem in item.problems:
        said = f"{path}: {problem}" if path else problem
        output.line(output.styled("invalid", "red"), output.visible(f"{item.label}: {said}"), stderr=True)
    if item.error is not None:
        output.line(output.styled("invalid", "red"), output.visible(f"{item.label}: {item.error.message}"), stderr=True)
        for detail in item.error.details:
            said = output.with_fix(str(detail.get("message")), detail.get("fix"))
            output.line(output.visible(f"  {detail.get('path')}: {said}"), stderr=True)


def _checks(raw: bytes) -> list[tuple[int | None, Callable[[], Document]]]:
    """How to check each task of a file, numbered as `mloc submit` numbers them (None for a file of one
    task). A file of one task is checked as the API reads a single task, so its messages are the ones a
    submit would give."""
    from mloc.spec import load, validate
    from mloc.spec.loader import parse_stream

    try:
        documents = [item for item in parse_stream(raw, limit=len(raw) + 1) if item is not None]
    except MlocError:
        documents = []
    if len(documents) < 2:
        return [(None, lambda: load(raw))]
    return [(n, functools.partial(validate, item)) for n, item in enumerate(documents, 1)]


def graph_problems(documents: list[Document]) -> list[tuple[int, str | None, str]]:
    """What a submit of these tasks would refuse in their graph, without a server: each as (the task's
    index, the field or None where no one field is at fault (a cycle), the message), by the rules and in
    the words of :mod:`mloc.spec.taskgraph` and :mod:`mloc.spec.references`: names in dependsOn and in
    references to another task's output (``from:``) that name no task, a task naming itself, two tasks
    of one name, an output the named task does not make, and cycles.

    Only a submission in which some task waits is planned, so only then are two tasks of one name
    refused. A task id is left to the orchestrator, which looks it up."""
    from mloc.spec import references, taskgraph

    wires = [document.to_wire() for document in documents]
    if not any(d.spec.depends_on or d.spec.when or references.find(w) for d, w in zip(documents, wires, strict=True)):
        return []
    problems: list[tuple[int, str | None, str]] = []
    names: dict[str, int] = {}
    for index, document in enumerate(documents):
        name = document.metadata.name
        if name and name in names:
            problems.append((index, "metadata.name", taskgraph.duplicate_name(name)))
        elif name:
            names[name] = index
    edges: list[list[int]] = [[] for _ in documents]

    def named(index: int, entry: str, where: str) -> bool:
        """Whether ``entry`` names a task to check against; a problem noted when it names none."""
        if names.get(entry) == index:
            problems.append((index, where, taskgraph.names_itself(entry)))
        elif entry in names:
            edges[index].append(names[entry])
            return True
        elif not taskgraph.TASK_ID_OR_PREFIX.fullmatch(entry):
            problems.append((index, where, taskgraph.names_nothing(entry, list(names))))
        return False

    for index, document in enumerate(documents):
        for position, entry in enumerate(document.spec.depends_on):
            named(index, entry, f"spec.dependsOn[{position}]")
        for reference in references.find(wires[index]):
            if not named(index, reference.entry, reference.where):
                continue
            # The producer as the orchestrator sees it: its own references already rewritten when it
            # comes first.
            theirs = wires[names[reference.entry]]
            producer = references.Producer(theirs["spec"]["taskType"], theirs["spec"])
            refused = references.problem(reference, reference.entry, producer, document)
            if refused:
                problems.append((index, reference.where, refused))
            else:
                references.rewrite(wires[index], reference, reference.entry, producer)
    cycle = taskgraph.find_cycle(edges)
    if cycle:
        said = taskgraph.cycle_message([documents[i].metadata.name or f"task-{i}" for i in cycle])
        problems.extend((index, None, said) for index in sorted(set(cycle)))  # no task of it could ever start
    return problems


@app.command()
def schema(
    output_file: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the schema to this file instead of printing it.")
    ] = None,
) -> None:
    """Print (or write) the JSON Schema of mloc/v1 tasks, for editors."""
    from mloc.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output_file:
        try:
            output_file.write_text(text + "\n")
        except OSError as exc:
            output.die(f"cannot write {output_file}: {exc.strerror or exc}")
        output.line(f"wrote {output_file}")
    else:
        sys.stdout.write(text + "\n")
