"""Dataset inference at 1,000,000 rows: rows per second and memory growth, JSONL and Parquet.

Run: python bench/dataset_rows.py [--rows 1000000] [--batch 256] [--folder DIR]

Writes a JSONL file and a Parquet file of ``--rows`` prompts (a third of the rows carry their own
max_tokens), then runs the inference executor's dataset path over each (``run_dataset``: read a batch,
map columns and per-row sampling, generate, append the lines to results.jsonl) with an echo engine that
returns each prompt as its output, so what is measured is MLOC's reading and writing, not a model.
Each run is a fresh process; it reports rows/s and RSS growth (peak RSS minus RSS at start, so the
modules a run imports, pyarrow and MLOC's spec among them, count against it).

Baseline, same run, same files: a plain loop that only parses every row (``json.loads`` per line;
pyarrow ``iter_batches`` + ``to_pylist`` for Parquet) and keeps nothing.
Target: RSS growth at most 200 MiB at 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

TARGET_MIB = 200


def write_files(folder: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = folder / "rows.jsonl"
    with jsonl.open("w") as handle:
        for i in range(rows):
            row: dict[str, Any] = {"id": f"r{i}", "prompt": f"Question {i}: what is {i} plus {i}? Answer briefly."}
            if i % 3 == 0:
                row["max_tokens"] = 16
            handle.write(json.dumps(row) + "\n")
    parquet = folder / "rows.parquet"
    writer: Any = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        part = [
            {"id": f"r{i}", "prompt": f"Question {i}: what is {i} plus {i}? Answer briefly.",
             "max_tokens": 16 if i % 3 == 0 else None}
            for i in range(start, min(rows, start + chunk))
        ]  # fmt: skip
        table = pa.Table.from_pylist(part)
        if writer is None:
            writer = pq.ParquetWriter(parquet, table.schema)
        writer.write_table(table, row_group_size=chunk)
    writer.close()
    return {"jsonl": jsonl, "parquet": parquet}


# --- child phases: one per process, so each peak RSS is its own ------------------------------------


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def baseline(path: Path) -> int:
    count = 0
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            count += len(batch.to_pylist())
        return count
    with path.open("rb") as handle:
        for line in handle:
            json.loads(line)
            count += 1
    return count


def executor_path(path: Path, out: Path, batch: int) -> int:
    import yaml

    import mloc.spec
    from mloc.executors.base import RunContext
    from mloc.executors.inference_dataset import run_dataset
    from mloc.llm.base import Generation, LLMEngine, Samplings, per_prompt
    from mloc.spec.sampling import Message, Sampling

    class EchoEngine(LLMEngine):
        """Returns each prompt as its output: the executor's own work, with no model behind it."""

        name = "echo"
        model_id = "echo"
        max_context = 4096

        def generate(
            self, prompts: Sequence[str], sampling: Samplings, *, adapter: Any = None, cancel: Any = None
        ) -> list[list[Generation]]:
            return [[Generation(i, p, "stop", len(p) // 4, min(s.max_tokens, len(p) // 4))] for i, (p, s) in
                    enumerate(zip(prompts, per_prompt(prompts, sampling), strict=True))]  # fmt: skip

        def render_chat(self, messages: Sequence[Message]) -> str:
            return "\n".join(m.content for m in messages)

        def count_tokens(self, text: str) -> int:
            return len(text) // 4

    body = {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": "bench"},
        "spec": {
            "taskType": "inference",
            "inference": {
                "max_tokens": 64,
                "input": {"path": str(path), "columns": {"id": "id", "max_tokens": "max_tokens"}},
            },
        },
    }
    document = mloc.spec.load(yaml.safe_dump(body))
    ctx = RunContext("bench", 1, "bench", document, out / "task", out / "models", "w", emit=lambda event: None)
    engine = EchoEngine()
    inputs = document.spec.inference  # type: ignore[attr-defined]

    def generate(prompts: list[str], sampling: Sequence[Sampling]) -> list[list[Generation]]:
        return engine.generate(prompts, sampling)

    result = run_dataset(ctx, inputs, engine, batch, generate)
    return int(result["rows"])


def child(phase: str, path: Path, out: Path, batch: int) -> None:
    start = rss()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:  # ru_maxrss covers the interpreter's start too; sampling sees only this phase
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    rows = baseline(path) if phase == "baseline" else executor_path(path, out, batch)
    seconds = time.perf_counter() - began
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    print(json.dumps({"rows": rows, "seconds": seconds, "growth": peak[0] - start, "peak_rusage": peak_rss()}))


def run_child(phase: str, path: Path, out: Path, batch: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", phase, "--file", str(path), "--folder", str(out), "--batch", str(batch)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{phase} on {path.name} failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--child", choices=("baseline", "executor"))
    parser.add_argument("--file", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file, args.folder, args.batch)
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        files = write_files(folder, args.rows)
        sizes = ", ".join(f"{name} {path.stat().st_size / 2**20:.0f} MiB" for name, path in files.items())
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - started:.1f}s ({sizes}); batch {args.batch}")
        print(f"{'file':<8} {'run':<10} {'rows/s':>10} {'RSS growth':>12}")
        worst = 0
        for name, path in files.items():
            for phase in ("baseline", "executor"):
                report = run_child(phase, path, folder / f"{name}-{phase}", args.batch)
                assert report["rows"] == args.rows, report
                growth = report["growth"] / 2**20
                if phase == "executor":
                    worst = max(worst, int(growth))
                    lines = sum(1 for _ in (folder / f"{name}-{phase}" / "task" / "results.jsonl").open("rb"))
                    assert lines == args.rows, f"{lines} result lines for {args.rows} rows"
                rate = report["rows"] / report["seconds"]
                print(f"{name:<8} {phase:<10} {rate:>10,.0f} {growth:>9.1f} MiB")
        verdict = "meets" if worst <= TARGET_MIB else "MISSES"
        print(f"executor RSS growth at most {worst} MiB: {verdict} the {TARGET_MIB} MiB target")


if __name__ == "__main__":
    main()
