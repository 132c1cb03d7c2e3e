"""Task files without a cluster: `mloc validate` and `mloc schema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mloc.cli import output
from mloc.cli.root import app
from mloc.errors import MlocError


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Check task files without submitting them."""
    from mloc.spec import load

    bad = 0
    for file in files:
        try:
            document = load(file.read_bytes())
            output.line(output.styled("ok", "green"), f"{file}: {document.kind} ({document.spec.task_type})")
        except MlocError as exc:
            bad += 1
            output.line(output.styled("invalid", "red"), output.visible(f"{file}: {exc.message}"), stderr=True)
            for detail in exc.details:
                fix = f" -> {detail['fix']}" if detail.get("fix") else ""
                output.line(output.visible(f"  {detail.get('path')}: {detail.get('message')}{fix}"), stderr=True)
    if bad:
        raise typer.Exit(1)


@app.command()
def schema(output_file: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
    """Print (or write) the JSON Schema of mloc/v1 tasks, for editors."""
    from mloc.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output_file:
        output_file.write_text(text + "\n")
        output.line(f"wrote {output_file}")
    else:
        sys.stdout.write(text + "\n")
