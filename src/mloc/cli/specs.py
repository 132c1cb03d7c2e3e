"""Task files without a cluster: `mloc validate` and `mloc schema`."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mloc.cli import output
from mloc.cli.root import app
from mloc.errors import MlocError

if TYPE_CHECKING:
    from mloc.spec import Document


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Check task files without submitting them; each task of a multi-document file (---) is checked."""
    bad = 0
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            output.die(f"cannot read {file}: {exc.strerror or exc}")
        for label, check in _checks(file, raw):
            try:
                document = check()
                output.line(output.styled("ok", "green"), f"{label}: {document.kind} ({document.spec.task_type})")
            except MlocError as exc:
                bad += 1
                output.line(output.styled("invalid", "red"), output.visible(f"{label}: {exc.message}"), stderr=True)
                for detail in exc.details:
                    fix = f" -> {detail['fix']}" if detail.get("fix") else ""
                    output.line(output.visible(f"  {detail.get('path')}: {detail.get('message')}{fix}"), stderr=True)
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


@app.command()
def schema(output_file: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
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
