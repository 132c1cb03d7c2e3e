"""write_json_atomic, which every worker calls once per task for RESULTS_DIR/<task_id>/responses.json:
readers see the old file or the new one, never half of one, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mloc.executors.base import write_json_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_the_task_folder_and_its_parents_are_made_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "results" / "task-1" / "responses.json"
    assert write_json_atomic(path, {"ok": True, "text": "héllo"}) == path
    assert json.loads(path.read_text()) == {"ok": True, "text": "héllo"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _leftovers(path.parent) == []


def test_a_second_write_replaces_the_first_whole(tmp_path: Path) -> None:
    path = tmp_path / "task-1" / "responses.json"
    write_json_atomic(path, {"rows": list(range(1000))})
    write_json_atomic(path, {"rows": [1]})
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert _leftovers(path.parent) == []


def test_a_large_result_is_written_to_its_last_byte(tmp_path: Path) -> None:
    rows = [{"index": i, "text": "x" * 100} for i in range(100_000)]  # about 13 MB of JSON
    path = write_json_atomic(tmp_path / "task-1" / "responses.json", {"rows": rows})
    assert json.loads(path.read_bytes())["rows"][-1] == {"index": 99_999, "text": "x" * 100}


def test_a_write_that_fails_leaves_no_temporary_file_and_the_old_result_stands(tmp_path: Path) -> None:
    folder = tmp_path / "task-1"
    path = write_json_atomic(folder / "responses.json", {"old": True})
    blocker = folder / "blocked.json"
    blocker.mkdir()  # a directory where the file should go: the final rename fails
    (blocker / "keep").write_text("x")
    with pytest.raises(OSError):
        write_json_atomic(blocker, {"new": True})
    assert _leftovers(folder) == []
    assert json.loads(path.read_text()) == {"old": True}
