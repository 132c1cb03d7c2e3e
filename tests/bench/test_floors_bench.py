"""bench/floors.py: a short run against real processes prints its table and a JSON line whose figures
hold together (each layer above its floor, a full submit dearer than a refusal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_prints_each_layer_beside_its_floor(tmp_path: Path) -> None:
    out = tmp_path / "floors.json"
    command = [sys.executable, str(ROOT / "bench" / "floors.py"), "--requests", "600", "--json-out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    floors = json.loads(out.read_text())["floors"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["floors"] == floors
    assert "x its floor" in done.stdout
    assert 0 < floors["socket_round_trip_us"] < floors["redis_ping_us"]
    assert floors["redis_evalsha_us"] > 0
    assert 0 < floors["http_bare_us"] < floors["mloc_refused_us"]
    submit = floors["mloc_submit_us"]
    assert set(submit) == {"orchestrator", "local-1", "local-2", "redis"}
    assert submit["orchestrator"] > floors["mloc_refused_us"]  # a submit validates, places and stores a task
    assert all(us > 0 for us in submit.values())  # every process had its part in each task
