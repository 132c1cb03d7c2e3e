"""Training checkpoints in a task's results folder.

A training executor saves ``checkpoint-<step>`` folders under ``<results>/<task id>/checkpoints``; a
later run of the same task (a requeue after its worker was lost, or a resume its user asked for)
continues from the newest complete one. The training executors read this, and so does the
orchestrator, which tells the user on a resume where the next run will start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The trainer writes its state file last, so a checkpoint cut short by a crash has none.
TRAINER_STATE = "trainer_state.json"


def newest(folder: Path, *, needs: Sequence[str] = (TRAINER_STATE,)) -> tuple[int, Path] | None:
    """The step and folder of the newest checkpoint in ``folder`` that holds every file in ``needs``
    (paths relative to the checkpoint), or None when there is none."""
    if not folder.is_dir():
        return None
    found = []
    for item in folder.iterdir():
        match = CHECKPOINT.match(item.name)
        if match and item.is_dir() and all((item / name).is_file() for name in needs):
            found.append((int(match.group(1)), item))
    return max(found) if found else None


def passed_over(folder: Path, chosen: int | None, *, needs: Sequence[str] = (TRAINER_STATE,)) -> list[str]:
    """Why each checkpoint newer than step ``chosen`` (every one, when none was chosen) is not resumed
    from, one line each, oldest first: so a run that starts further back than the newest folder says why."""
    if not folder.is_dir():
        return []
    lines = []
    for item in sorted(folder.iterdir(), key=lambda path: _step(path.name)):
        step = _step(item.name)
        if step < 0 or (chosen is not None and step <= chosen) or not item.is_dir():
            continue
        missing = [name for name in needs if not (item / name).is_file()]
        if missing:
            lines.append(
                f"{item.name} is passed over: it has no {', '.join(missing)}, so it was cut short while it was saved"
            )
    return lines


def _step(name: str) -> int:
    match = CHECKPOINT.match(name)
    return int(match.group(1)) if match else -1
