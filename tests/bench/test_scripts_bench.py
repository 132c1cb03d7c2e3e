"""bench/scripts.py: a short run on a real redis-server prints its table and a JSON line whose figures
hold together (every call timed, the commands a part of their call, a refused call cheaper than a
move made, the baseline cheapest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_prints_the_redis_time_of_each_call_and_part(tmp_path: Path) -> None:
    out = tmp_path / "scripts.json"
    command = [sys.executable, str(ROOT / "bench" / "scripts.py"), "--tasks", "64", "--rounds", "1"]
    done = subprocess.run([*command, "--json-out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["redis_us"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["redis_us"] == table
    assert "the parts of a start and end call" in done.stdout
    assert set(table) == {
        "create and place, 1 per call",
        "create and place, 64 per call",
        "start and end, 1 per call",
        "start and end, 64 per call",
        "start and end without the usage, 1 per call",
        "start and end without the log, 1 per call",
        "start and end without the result, 1 per call",
        "refused at its first check, 1 per call",
        "baseline: return 1",
    }
    for name, row in table.items():
        assert row["per_call_us"] > 0 and 0 <= row["commands_us"] <= row["per_call_us"], name
        assert abs(row["rest_us"] - (row["per_call_us"] - row["commands_us"])) <= 0.11, name
    batch = table["start and end, 64 per call"]
    assert batch["per_task_us"] < batch["per_call_us"] / 32  # 64 tasks in each call
    whole = table["start and end, 1 per call"]["per_call_us"]
    assert table["baseline: return 1"]["per_call_us"] < table["refused at its first check, 1 per call"]["per_call_us"]
    assert table["refused at its first check, 1 per call"]["per_call_us"] < whole
