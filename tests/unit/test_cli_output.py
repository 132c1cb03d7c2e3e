"""How `mloc` prints for people: times in the local zone with its offset, whole counts as integers, ids
that no terminal width cuts, and no ANSI escape under NO_COLOR or in a pipe."""

from __future__ import annotations

import io
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from mloc.cli import output
from mloc.cli.tasks import task_table

# POSIX zone rules, so no tz database is needed: Central European time, and one 5 h 45 min east of UTC.
CET = "CET-1CEST,M3.5.0,M10.5.0/3"
KATHMANDU = "XST-5:45"


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Lets a test set TZ; the process's own zone is back afterwards."""
    yield monkeypatch
    monkeypatch.undo()
    time.tzset()


def in_zone(monkeypatch: pytest.MonkeyPatch, tz: str) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()


@pytest.mark.parametrize(
    ("tz", "moment", "shown"),
    [
        (CET, datetime(2026, 1, 15, 12, 0, tzinfo=UTC), "2026-01-15 13:00:00+01:00"),
        (CET, datetime(2026, 7, 1, 12, 0, tzinfo=UTC), "2026-07-01 14:00:00+02:00"),
        (KATHMANDU, datetime(2026, 12, 31, 23, 0, 5, tzinfo=UTC), "2027-01-01 04:45:05+05:45"),
        ("UTC0", datetime(2026, 3, 1, 0, 0, tzinfo=UTC), "2026-03-01 00:00:00+00:00"),
    ],
)
def test_times_are_local_with_their_offset(zone: pytest.MonkeyPatch, tz: str, moment: datetime, shown: str) -> None:
    in_zone(zone, tz)
    assert output.when(moment.timestamp()) == shown
    assert output.at(moment.timestamp()).startswith(shown + " (")
    # What is printed names one instant, wherever it is read back.
    assert datetime.fromisoformat(shown) == moment
    assert output.when(None) == output.when(0) == "-"


def test_counts_print_as_integers_and_measures_rounded() -> None:
    assert [output.amount(value) for value in (3.0, 3, 0.0, 1_234_567.0, -2.0)] == ["3", "3", "0", "1234567", "-2"]
    assert output.amount(1_234_567.0, grouped=True) == "1,234,567"
    measures = (3.177787, 1.000959, 0.85, 0.5, 0.123, 0.0512, 0.05, 0.0012, 0.000003, 0.00001234, -0.25)
    shown = ["3.18", "1.00", "0.85", "0.50", "0.12", "0.051", "0.05", "0.0012", "0.000003", "0.000012", "-0.25"]
    assert [output.amount(value) for value in measures] == shown
    assert output.amount(12345.678, grouped=True) == "12,345.68"
    assert output.amount(True) == "True" and output.amount("n/a") == "n/a" and output.amount(float("inf")) == "inf"


def _rendered(width: int, *, wide: bool) -> tuple[list[str], list[str]]:
    """The ids as `mloc tasks` shows them, and the lines of its table on a terminal ``width`` wide."""
    task_ids = [f"{n:x}{n:x}5d26ec0-a50f-40f1-9a35-916ddff440f2" for n in range(1, 4)]
    items: list[dict[str, Any]] = [
        {
            "task_id": task_id,
            "name": "a-pipeline-step-with-a-long-name",
            "task_type": "inference",
            "owner": "someone-with-a-long-name",
            "state": "pending",
            "worker_id": None,
            "created_at": time.time() - 300,
            "pending_reason": "no worker has 8 GPUs of model H100-SXM5-80GB free",
            "queue_position": n,
        }
        for n, task_id in enumerate(task_ids, start=1)
    ]
    grid = task_table(items, title="tasks (3)", wide=wide)
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(grid)
    return [task_id if wide else task_id[:8] for task_id in task_ids], console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 40])
@pytest.mark.parametrize("wide", [False, True])
def test_task_ids_are_never_cut_or_wrapped_in_a_narrow_terminal(width: int, wide: bool) -> None:
    ids, lines = _rendered(width, wide=wide)
    rows = [line.split()[0] for line in lines if line.strip() and line.split()[0] in ids]
    assert rows == ids, "\n".join(lines)
    assert all(len(line.rstrip()) <= width for line in lines), "\n".join(lines)
    if not wide:
        # The other columns give way, folded onto more lines, but are still there beside each id.
        assert all(len(line.split()) >= 8 for line in lines if line.split() and line.split()[0] in ids), lines


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "env", "escapes"),
    [
        (True, {}, True),  # the control: a terminal gets bold and colour
        (True, {"NO_COLOR": "1"}, False),
        (False, {}, False),
        (False, {"FORCE_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # an empty NO_COLOR is not set (no-color.org)
    ],
)
def test_no_color_and_pipes_get_no_escapes_at_all(
    monkeypatch: pytest.MonkeyPatch, terminal: bool, env: dict[str, str], escapes: bool
) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    output.line(output.styled("key", "bold"), output.styled("dim", "dim"), output.styled("ok", "green"))
    output.show(task_table([], title="tasks (0)"))
    assert ("\x1b" in stream.getvalue()) is escapes, repr(stream.getvalue())
    assert output.is_terminal() is escapes  # a live status line (`--wait`) only where escapes go
    assert "key dim ok" in re.sub("\x1b\\[[0-9;]*m", "", stream.getvalue())
