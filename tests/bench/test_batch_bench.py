"""bench/batch.py: its batch file is one MLOC's Batch API accepts, and a run without vLLM (a real local
cluster, a real worker killed half-way) prints its table and a JSON line with sane figures."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import batch
from mloc.openai_lines import COMPLETIONS, convert

ROOT = Path(__file__).resolve().parents[2]


def test_the_batch_file_is_varied_completions_that_mloc_accepts_and_the_runner_gets_as_chats() -> None:
    lines = batch.batch_requests(500)
    assert len({line["custom_id"] for line in lines}) == 500
    assert {line["url"] for line in lines} == {COMPLETIONS}
    bodies = [line["body"] for line in lines]
    assert {body["max_tokens"] for body in bodies} <= set(range(8, 65))
    assert min(body["max_tokens"] for body in bodies) < 16 and max(body["max_tokens"] for body in bodies) > 56
    assert all(body["temperature"] == 0 and body["prompt"].endswith("\nAnswer:") for body in bodies)
    assert len({len(body["prompt"]) for body in bodies}) > 20  # prompts of varied lengths
    assert batch.batch_requests(500) == lines  # the same file every run

    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    converted = convert(io.BytesIO(data), io.BytesIO(), endpoint=COMPLETIONS)
    assert (converted.requests, converted.model) == (500, batch.MODEL_NAME)

    chat = batch.as_chat(lines[3])
    assert chat["url"] == "/v1/chat/completions" and chat["custom_id"] == lines[3]["custom_id"]
    assert chat["body"]["messages"] == [{"role": "user", "content": lines[3]["body"]["prompt"]}]
    assert chat["body"]["max_tokens"] == lines[3]["body"]["max_tokens"] and "prompt" not in chat["body"]


@pytest.mark.extra("inference")
def test_a_run_without_vllm_reports_resume_first_line_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    command = [sys.executable, str(ROOT / "bench" / "batch.py"), "--skip-vllm", "--rows", "2000"]
    # The 1M-row default of the memory figure takes a minute on its own; its measurement is the same at any size.
    command += ["--memory-rows", "20000", "--json-out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    assert printed[0].split() == ["figure", "MLOC", "baseline", "ratio"]
    report = json.loads(printed[-1])
    assert json.loads(out.read_text()) == report

    assert report["throughput"] is None
    resume = report["resume"]
    assert (resume["rows"], resume["rows_total"], resume["chunk_rows"]) == (2000, 2000, 100)
    assert resume["chunks"] == 20 and len(resume["chunk_attempts"]) == 20
    # A lost worker costs whole chunks, and only those it held: never the finished half.
    assert 0 <= resume["recomputed_ratio"] < 0.5
    assert resume["recomputed_rows"] % resume["chunk_rows"] == 0
    assert resume["recomputed_rows"] == resume["chunk_rows"] * sum(a > 1 for a in resume["chunk_attempts"])
    killed = resume["killed"]
    assert killed["at_rows"] >= 1000 and killed["executors"] >= 1 and killed["executors_died"] is True
    assert resume["total_sec"] > 0 and resume["baseline_sec"] > 0
    assert resume["time_ratio"] == pytest.approx(resume["total_sec"] / resume["baseline_sec"], abs=0.01)
    assert 0 < resume["first_line_sec"] < resume["baseline_sec"]
    assert 0 < resume["first_line_killed_run_sec"] < resume["total_sec"]

    memory = report["memory"]
    assert memory["rows"] == 20000 and memory["target_mib"] == 200
    assert {(run["file"], run["run"]) for run in memory["runs"]} == {
        (name, phase) for name in ("jsonl", "parquet") for phase in ("baseline", "executor")
    }
    assert all(run["rows_per_sec"] > 0 and run["growth_mib"] >= 0 for run in memory["runs"])
    assert memory["meets"] == (memory["worst_growth_mib"] <= 200)
    assert "RSS growth at most" in memory["line"]
