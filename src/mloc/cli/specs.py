"""Task files without a cluster: `mloc validate` and `mloc schema`."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mloc.cli import output
from mloc.cli.root import app
from mloc.errors import MlocError

if TYPE_CHECKING:
    from mloc.spec import Document


@dataclass
class _Checked:
    label: str
    document: Document | None
    error: MlocError | None
    problems: list[str] = field(default_factory=list)  # what a submit's planning would refuse


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Task files (YAML or JSON; --- between tasks).")
    ],
) -> None:
    """Check task files without submitting them; each task of a multi-document file (---) is checked,
    and a file's tasks that wait for each other (dependsOn, or a `from:` naming another's output) as the
    submit would plan them: names that name no task, a task that names itself, two tasks of one name, an
    output the named task does not make, and cycles. The files given are checked as one submission, as
    `mloc submit` sends them in one request; a task id is not looked up."""
    per_file: list[list[_Checked]] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            output.die(f"cannot read {file}: {exc.strerror or exc}")
        checked = []
        for label, check in _checks(file, raw):
            try:
                checked.append(_Checked(label, check(), None))
            except MlocError as exc:
                checked.append(_Checked(label, None, exc))
        per_file.append(checked)
    # One submission, as `mloc submit` sends every file given in one request and the orchestrator plans
    # them together, in order.
    valid = [(item, item.document) for tasks in per_file for item in tasks if item.document is not None]
    for index, problem in graph_problems([document for _, document in valid]):
        valid[index][0].problems.append(problem)
    bad = 0
    for item in (item for tasks in per_file for item in tasks):
        if item.document is not None and not item.problems:
            output.line(
                output.styled("ok", "green"), f"{item.label}: {item.document.kind} ({item.document.spec.task_type})"
            )
            continue
        bad += 1
        for problem in item.problems:
            output.line(output.styled("invalid", "red"), output.visible(f"{item.label}: {problem}"), stderr=True)
        if item.error is not None:
            output.line(
                output.styled("invalid", "red"), output.visible(f"{item.label}: {item.error.message}"), stderr=True
            )
            for detail in item.error.details:
                said = output.with_fix(str(detail.get("message")), detail.get("fix"))
                output.line(output.visible(f"  {detail.get('path')}: {said}"), stderr=True)
    if bad:
        raise typer.Exit(1)


def _checks(file: Path, raw: bytes) -> list[tuple[str, Callable[[], Document]]]:
    """How to check each task of a file, labelled as `mloc submit` labels them. A file of one task is
    checked as the API reads a single task, so its messages are the ones a submit would give."""
    from mloc.spec import load, validate
    from mloc.spec.loader import parse_stream

    try:
        documents = [item for item in parse_stream(raw, limit=len(raw) + 1) if item is not None]
    except MlocError:
        documents = []
    if len(documents) < 2:
        return [(str(file), lambda: load(raw))]
    return [(f"{file} (document {n})", functools.partial(validate, item)) for n, item in enumerate(documents, 1)]


def graph_problems(documents: list[Document]) -> list[tuple[int, str]]:
    """What a submit of these tasks would refuse in their graph, without a server: each as (the task's
    index, 'field: message'), by the rules and in the words of :mod:`mloc.spec.taskgraph` and
    :mod:`mloc.spec.references`: names in dependsOn and in references to another task's output
    (``from:``) that name no task, a task naming itself, two tasks of one name, an output the named task
    does not make, and cycles.

    Only a submission in which some task waits is planned, so only then are two tasks of one name
    refused. A task id is left to the orchestrator, which looks it up."""
    from mloc.spec import references, taskgraph

    wires = [document.to_wire() for document in documents]
    if not any(d.spec.depends_on or d.spec.when or references.find(w) for d, w in zip(documents, wires, strict=True)):
        return []
    problems: list[tuple[int, str]] = []
    names: dict[str, int] = {}
    for index, document in enumerate(documents):
        name = document.metadata.name
        if name and name in names:
            problems.append((index, f"metadata.name: {taskgraph.duplicate_name(name)}"))
        elif name:
            names[name] = index
    edges: list[list[int]] = [[] for _ in documents]

    def named(index: int, entry: str, where: str) -> bool:
        """Whether ``entry`` names a task to check against; a problem noted when it names none."""
        if names.get(entry) == index:
            problems.append((index, f"{where}: {taskgraph.names_itself(entry)}"))
        elif entry in names:
            edges[index].append(names[entry])
            return True
        elif not taskgraph.TASK_ID_OR_PREFIX.fullmatch(entry):
            problems.append((index, f"{where}: {taskgraph.names_nothing(entry, list(names))}"))
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
                problems.append((index, f"{reference.where}: {refused}"))
            else:
                references.rewrite(wires[index], reference, reference.entry, producer)
    cycle = taskgraph.find_cycle(edges)
    if cycle:
        said = taskgraph.cycle_message([documents[i].metadata.name or f"task-{i}" for i in cycle])
        problems.extend((index, said) for index in sorted(set(cycle)))  # no task of it could ever start
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
