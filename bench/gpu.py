"""GPU check: MLOC's GPU paths end to end, each check one task submitted over HTTP to a local orchestrator
and worker (embedded Redis): vLLM inference on CUDA at tensor parallel 1 (and 2 on two or more GPUs), then
LoRA and QLoRA SFT on a small built-in dataset. Each check gets a cluster of its own, so no warm engine holds
GPU memory during the next task. Prints tokens/s (generation, from the task's usage), samples/s (the
trainer's), peak GPU memory (nvidia-smi sampled while the task runs, as MLOC does not record it; all GPUs
summed, idle use included) and wall time (submit to finished, model load included): a table, then one JSON
line. Without a usable GPU it prints one line saying why and exits 0.

    python bench/gpu.py                                      # the bundled Gemma 3 270M
    python bench/gpu.py --model google/gemma-3-1b-pt --steps 100 --json-out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

SMI_MEMORY = ("nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits")
SKIP = "gpu check skipped:"
TASK_TIMEOUT_SEC = 3600.0
DEFAULT_MODEL = "gemma3-270m"


def parse_gpu_list(text: str) -> list[str]:
    """GPU names from ``nvidia-smi -L`` ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)")."""
    lines = [line for line in text.splitlines() if line.startswith("GPU ") and ":" in line]
    return [line.split(":", 1)[1].split("(UUID")[0].strip() for line in lines]


def parse_memory_used(text: str) -> dict[int, int]:
    """MiB in use per GPU index, from ``nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits``."""
    used: dict[int, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        index, _, value = line.partition(",")
        try:
            used[int(index)] = int(value.strip().removesuffix("MiB").strip())
        except ValueError:
            raise ValueError(f"nvidia-smi printed {line!r}; expected 'index, MiB used' per GPU") from None
    return used


def gpu_absence_reason() -> str | None:
    """Why this machine cannot run the check, or None when nvidia-smi lists GPUs and torch sees CUDA."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi -L did not run: {exc}"
    if not parse_gpu_list(listed.stdout):
        said = (listed.stdout + listed.stderr).strip().splitlines()
        return f"nvidia-smi lists no GPUs ({said[0] if said else f'exit code {listed.returncode}'})"
    try:
        import torch
    except ImportError:
        return "torch is not installed here; install MLOC with its GPU extras (vllm, train)"
    if not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else "a CPU build, or a driver too old for it"
        return f"torch {torch.__version__} cannot use CUDA ({why})"
    return None


class PeakSampler:
    """Samples GPU memory in a thread while a task runs, keeping the highest total and per-GPU use."""

    def __init__(self, command: Sequence[str] = SMI_MEMORY, interval: float = 0.25) -> None:
        self.command = list(command)
        self.interval = interval
        self.peak_mib = 0
        self.peak_by_gpu: dict[int, int] = {}
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-memory", daemon=True)

    def sample(self) -> dict[int, int]:
        done = subprocess.run(self.command, capture_output=True, text=True, timeout=30, check=True)
        return parse_memory_used(done.stdout)

    def _loop(self) -> None:
        # Sample before the first wait, so even a task shorter than the interval gets one reading.
        while True:
            try:
                used = self.sample()
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                self.error = str(exc)
            else:
                self.samples += 1
                self.peak_mib = max(self.peak_mib, sum(used.values()))
                for index, mib in used.items():
                    self.peak_by_gpu[index] = max(self.peak_by_gpu.get(index, 0), mib)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Figures:
    """One check's outcome: ``rate`` is tokens/s for inference, samples/s for training."""

    check: str
    ok: bool
    rate: float | None
    unit: str
    peak_gpu_mib: int | None
    wall_sec: float
    detail: str


def format_table(rows: Sequence[Figures]) -> str:
    header = ("check", "rate", "peak GPU memory", "wall", "detail")
    cells = [
        (
            row.check,
            f"{row.rate:,.1f} {row.unit}" if row.rate is not None else "-",
            f"{row.peak_gpu_mib:,} MiB" if row.peak_gpu_mib is not None else "-",
            f"{row.wall_sec:,.1f} s",
            row.detail if row.ok else f"FAILED: {row.detail}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *cells)) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in (header, *cells)
    )


def json_line(rows: Sequence[Figures], meta: dict[str, Any]) -> str:
    return json.dumps({"bench": "gpu", **meta, "checks": [asdict(row) for row in rows]})


def model_source(model: str) -> dict[str, str]:
    """The task's model.source for --model: a packaged name, a local folder or .gguf, a URL, else a hub id."""
    from mloc.llm.modelsource import find_packaged
    from mloc.spec.base import is_url

    if find_packaged(model) is not None:
        return {"type": "package", "identifier": model}
    if is_url(model):
        return {"type": "url", "identifier": model}
    if Path(model).expanduser().exists():
        return {"type": "local", "identifier": str(Path(model).expanduser().resolve())}
    return {"type": "huggingface", "identifier": model}


def write_dataset(folder: Path, rows: int = 256) -> Path:
    """Prompt/completion arithmetic, varied enough that the loss means something; a JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sft.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for number in range(rows):
            a, b = 3 + number % 17, 5 + number * 7 % 23
            sample = {"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "completion": f" {a + b}."}
            handle.write(json.dumps(sample) + "\n")
    return path


def prompts(count: int) -> list[str]:
    topics = ["the moon", "rivers", "bread", "electricity", "bees", "glass", "volcanoes", "music"]
    return [f"Question: What should everyone know about {topics[i % len(topics)]}?\nAnswer:" for i in range(count)]


def documents(
    model: str, gpus: int, data: Path, *, prompt_count: int, max_tokens: int, steps: int
) -> list[tuple[str, dict[str, Any]]]:
    """(check name, task document) for each check this machine can run, in the order they run."""
    source = model_source(model)
    checks: list[tuple[str, dict[str, Any]]] = []
    for tp in (1, 2) if gpus >= 2 else (1,):
        spec = {
            "taskType": "inference",
            "timeout_sec": TASK_TIMEOUT_SEC,
            "resources": {"hardware": {"gpu": {"count": tp}}},
            "model": {
                "source": source,
                "engine": "vllm",
                # The prompts are a few dozen tokens; a short context lets a long-context model start on a small card.
                "vllm": {"tensor_parallel_size": tp, "max_model_len": max_tokens + 256},
            },
            "inference": {"prompts": prompts(prompt_count), "max_tokens": max_tokens, "temperature": 0},
        }
        checks.append((f"inference-vllm-tp{tp}", {"apiVersion": "mloc/v1", "kind": "InferenceTask", "spec": spec}))
    for adapter in ("lora", "qlora"):
        spec = {
            "taskType": "sft",
            "timeout_sec": TASK_TIMEOUT_SEC,
            "resources": {"hardware": {"gpu": {"count": 1}}},
            "model": {"source": source, "adapter": {"type": adapter, "r": 16, "lora_alpha": 32}},
            "dataset": {"path": str(data), "format": "prompt_completion"},
            # No checkpoint inside the run, so the trainer's samples/s is training alone.
            "hyperparameters": {"max_steps": steps, "batch_size": 8, "max_length": 256, "save_steps": steps + 1},
        }
        checks.append((f"sft-{adapter}", {"apiVersion": "mloc/v1", "kind": "SFTTask", "spec": spec}))
    return checks


def figures_of(name: str, record: dict[str, Any], result: dict[str, Any], wall: float, peak: int | None) -> Figures:
    """A check's figures from its final task record and result (responses.json)."""
    if record["state"] != "succeeded":
        return Figures(name, False, None, "", peak, wall, str(record.get("reason") or record["state"]))
    if result.get("task_type", "inference") == "inference":
        usage = result["usage"]
        detail = (
            f"{result['engine']} {result['dtype']}, {usage['completion_tokens']} tokens, load {usage['load_sec']} s"
        )
        return Figures(name, result["engine"] == "vllm", usage["tokens_per_sec"], "tok/s", peak, wall, detail)
    device = str(result["device"])
    quantization = result.get("quantization") or {}
    detail = f"{device}, {result['global_step']} steps"
    if quantization:
        detail += (
            f", {quantization['bits']}-bit {quantization['quant_type']} ({quantization['linear4bit_layers']} layers)"
        )
    # A run that fell back to the CPU, or QLoRA without 4-bit layers, did not check the GPU path.
    ok = device.startswith("cuda") and (bool(quantization) or not name.endswith("qlora"))
    return Figures(name, ok, result["train_samples_per_second"], "samples/s", peak, wall, detail)


def run_check(name: str, body: dict[str, Any], models_dir: Path, work: Path) -> Figures:
    from mloc.client import Client
    from mloc.errors import MlocError
    from mloc.localcluster import LocalCluster

    home = work / name
    env = {"MLOC_MODELS_DIR": str(models_dir), "LOG_LEVEL": "WARNING"}
    cluster = LocalCluster(home=home, workers=1, env=env, log_dir=home / "logs")
    sampler = PeakSampler()
    started = time.perf_counter()
    try:
        cluster.start(timeout=180)
        # An operator's admin token, where set, is the one the cluster's orchestrator expects.
        with Client(cluster.api_url, os.environ.get("ORCHESTRATOR_TOKEN")) as client, sampler:
            started = time.perf_counter()
            task_id = client.submit(body)["task_id"]
            record = client.wait(task_id, timeout=TASK_TIMEOUT_SEC + 300)
            wall = time.perf_counter() - started
            result = client.result(task_id) if record["state"] == "succeeded" else {}
    except MlocError as exc:
        record, result, wall = {"state": "failed", "reason": str(exc)}, {}, time.perf_counter() - started
    finally:
        cluster.stop()
    figures = figures_of(name, record, result, wall, sampler.peak_mib if sampler.samples else None)
    if not figures.ok:
        figures.detail += f" (logs: {home / 'logs'})"
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a packaged model, hub id, local folder or URL")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=256, help="prompts per inference task")
    parser.add_argument("--steps", type=int, default=50, help="training steps per SFT task")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    for flag in ("max_tokens", "prompts", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    reason = gpu_absence_reason()
    if reason is not None:
        print(f"{SKIP} {reason}")
        return 0
    import torch

    from mloc.settings import get_settings

    gpus = torch.cuda.device_count()
    names = parse_gpu_list(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout)
    models_dir = get_settings().resolved_models_dir
    idle = sum(PeakSampler().sample().values())
    print(f"MLOC GPU check: {args.model} on {gpus} x {names[0] if names else 'GPU'}, idle {idle:,} MiB in use")
    sys.stdout.flush()
    rows: list[Figures] = []
    work = Path(tempfile.mkdtemp(prefix="mloc-gpu-check-"))
    data = write_dataset(work / "data")
    for name, body in documents(
        args.model, gpus, data, prompt_count=args.prompts, max_tokens=args.max_tokens, steps=args.steps
    ):
        rows.append(run_check(name, body, models_dir, work))
        print(f"  {name}: {'ok' if rows[-1].ok else 'failed'} in {rows[-1].wall_sec:.1f} s", flush=True)
    if all(row.ok for row in rows):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  the run's folder, logs included, is kept: {work}")
    print(format_table(rows))
    meta = {"model": args.model, "gpus": gpus, "gpu_names": names, "idle_gpu_mib": idle}
    line = json_line(rows, meta | {"prompts": args.prompts, "max_tokens": args.max_tokens, "steps": args.steps})
    print(line)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
