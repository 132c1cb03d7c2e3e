"""SFT throughput through MLOC's executor against the same run as a plain TRL script.

Both runs train the same LoRA adapter on the same model, data and hyperparameters, in this process, in
alternating order (baseline, MLOC, baseline, MLOC, ...) after one warm-up run, so imports and caches
favour neither. The figure compared is the trainer's own train_samples_per_second (time inside
``trainer.train()``), and, separately, the wall time of the whole run including model load and saving.

    python bench/train.py                       # defaults: a 2-layer 128-wide Llama, 60 steps, 5 rounds
    python bench/train.py --steps 80 --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mloc.executors.train import SFTExecutor  # noqa: E402
from tests.executors.support_train import QA, make_context, task_yaml  # noqa: E402
from tests.support.tiny_model import build_tiny_causal_lm  # noqa: E402


def examples(count: int) -> list[dict[str, str]]:
    return [QA[i % len(QA)] for i in range(count)]


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_steps": args.steps,
        "learning_rate": 5e-3,
        "batch_size": args.batch,
        "logging_steps": 10,
        "max_length": 128,
        "seed": 7,
    }


def run_mloc(model: Path, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    text = task_yaml(
        "sft",
        model,
        {"examples": examples(args.examples)},
        hyperparameters(args),
        adapter={"type": "lora", "r": 16, "lora_alpha": 32},
    )
    ctx, _ = make_context(text, work / f"mloc-{time.monotonic_ns()}")
    started = time.perf_counter()
    result = SFTExecutor().run(ctx)
    return float(result["train_samples_per_second"]), time.perf_counter() - started


def run_trl(model: Path, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    """What a user would write with TRL directly for the same run."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model)
    hp = hyperparameters(args)
    config = SFTConfig(
        output_dir=str(work / f"trl-{time.monotonic_ns()}"),
        max_steps=hp["max_steps"],
        learning_rate=hp["learning_rate"],
        per_device_train_batch_size=hp["batch_size"],
        logging_steps=hp["logging_steps"],
        max_length=hp["max_length"],
        seed=hp["seed"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = SFTTrainer(
        model=policy,
        args=config,
        train_dataset=Dataset.from_list(examples(args.examples)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"),
    )
    output = trainer.train()
    trainer.save_model(f"{config.output_dir}/adapter")
    return float(output.metrics["train_samples_per_second"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides; 1 keeps a shared CPU's noise down",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from datasets import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="mloc-bench-train-") as tmp:
        work = Path(tmp)
        model = build_tiny_causal_lm(work / "model", hidden_size=args.hidden, layers=args.layers)
        run_trl(model, work, args)  # warm-up: first-use costs (kernels, caches) land on neither side
        trl_sps: list[float] = []
        mloc_sps: list[float] = []
        trl_wall: list[float] = []
        mloc_wall: list[float] = []
        for round_ in range(args.rounds):
            first, second = (run_trl, run_mloc) if round_ % 2 == 0 else (run_mloc, run_trl)
            for runner in (first, second):
                sps, wall = runner(model, work, args)
                (trl_sps if runner is run_trl else mloc_sps).append(sps)
                (trl_wall if runner is run_trl else mloc_wall).append(wall)
        figures = {
            "setup": f"Llama {args.layers}x{args.hidden}, LoRA r16, batch {args.batch}, {args.steps} steps",
            "rounds": args.rounds,
            "threads": args.threads,
            "baseline_trl_samples_per_sec": round(statistics.median(trl_sps), 2),
            "mloc_samples_per_sec": round(statistics.median(mloc_sps), 2),
            "ratio": round(statistics.median(mloc_sps) / statistics.median(trl_sps), 3),
            "baseline_trl_wall_sec": round(statistics.median(trl_wall), 2),
            "mloc_wall_sec": round(statistics.median(mloc_wall), 2),
            "all_trl_samples_per_sec": [round(value, 2) for value in trl_sps],
            "all_mloc_samples_per_sec": [round(value, 2) for value in mloc_sps],
        }
    print(json.dumps(figures, indent=2))
    mloc_sps, trl_sps_median = figures["mloc_samples_per_sec"], figures["baseline_trl_samples_per_sec"]
    print(f"SFT samples/s: MLOC {mloc_sps} vs plain TRL {trl_sps_median} -> ratio {figures['ratio']} (target >= 0.97)")


if __name__ == "__main__":
    main()
