"""Every command's help reads as paragraphs at a terminal's usual width: a docstring's own line breaks
(written for an editor's width) are not kept, so no line of a paragraph stops short before its end."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from mloc.cli import app

WIDTH = 80


def _commands(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, [*path, name])


COMMANDS = list(_commands(typer.main.get_command(app), []))


def _description(output: str) -> list[list[str]]:
    """The paragraphs of the help's description: the lines between the usage line and the first panel."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [paragraph for paragraph in paragraphs if paragraph]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "mloc")
def test_help_paragraphs_fill_the_terminal_width(path: list[str]) -> None:
    shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=WIDTH, env={"COLUMNS": str(WIDTH)})
    assert shown.exit_code == 0, shown.output
    paragraphs = _description(shown.output)
    assert paragraphs, shown.output
    for paragraph in paragraphs:
        for line, following in pairwise(paragraph):
            # A line ends early only where the next word would not have fitted on it.
            next_word = following.split()[0]
            assert len(line) + 1 + len(next_word) > WIDTH - 2, f"{' '.join(path)}: a ragged line:\n{shown.output}"
