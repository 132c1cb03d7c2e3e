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
