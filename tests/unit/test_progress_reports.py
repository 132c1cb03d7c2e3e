"""How progress reaches the user: an executor's reports, thinned to a few a second but never losing a
new stage, and the time left as the CLI prints it, counted down between reports."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from mloc.cli.waiting import progress_text
from mloc.executors.base import RunContext
from mloc.spec import validate


def test_reports_are_thinned_but_a_new_stage_an_end_and_a_runs_start_always_go(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    ctx = RunContext("t1", 1, "alice", validate({"taskType": "echo"}), tmp_path, tmp_path, "w1", emit=events.append)
    ctx.progress(1, 3, "embedding")
    ctx.progress(2, 3, "embedding")  # within a quarter second of the last: dropped
    ctx.progress(3, 3, "embedding")  # the end of a stage
    ctx.progress(0, 1, "answering")  # a new stage, counted from its start
    ctx.progress(0, 10, "training", since=0)  # where a run's work begins
    assert [(e["step"], e["total"], e["message"]) for e in events] == [
        (1, 3, "embedding"),
        (3, 3, "embedding"),
        (0, 1, "answering"),
        (0, 10, "training"),
    ]
    assert events[-1]["since"] == 0 and "since" not in events[0]


def test_the_time_left_counts_down_from_when_it_was_reported() -> None:
    told = {"step": 1, "total": 3, "percent": 33.3, "eta_sec": 74.0, "updated_at": time.time() - 30}
    assert re.fullmatch(r"1/3 \(33\.3%\), ETA 4[34]\.\d s", progress_text(told)), progress_text(told)
    # Past its estimate, it says a second rather than nothing or a negative time.
    late = {**told, "updated_at": time.time() - 300}
    assert progress_text(late) == "1/3 (33.3%), ETA 1.0 s"
