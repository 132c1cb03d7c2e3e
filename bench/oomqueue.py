"""What memory fit at admission does to the out-of-memory rate of a mixed queue on a mixed GPU fleet.

A queue of task documents (inference on vLLM and transformers, LoRA, QLoRA and full SFT, DPO and GRPO with
LoRA) over the published configs of real models is placed on a simulated fleet of GPUs of several sizes,
through MLOC's own fit rule (``placement.fits_registration``) and estimator, twice: by the users' numbers
(``gpu: {type: any, count: N}``, as most tasks are written), and with admission's estimate (the request's
per-GPU memory set from it, a task no GPU could hold refused). A placement whose estimated need exceeds
its GPU would run out of memory. Each task is placed on an idle fleet, on one of the workers that fit,
drawn at random with a fixed seed: what a free-slot scheduler does without knowing the task's size.

    python bench/oomqueue.py --tasks 2000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mloc.llm.memfit import estimate_task  # noqa: E402
from mloc.llm.modelfacts import ModelFacts, facts_from_config  # noqa: E402
from mloc.orchestrator.placement import fits_registration, request_of  # noqa: E402
from mloc.records import WorkerStatus, WorkerView  # noqa: E402
from mloc.spec import validate  # noqa: E402

GIB = 1 << 30
# A plausible mixed fleet: (GPU model, GiB per GPU, GPUs per worker, workers).
FLEET = [
    ("NVIDIA L4", 24, 1, 8),
    ("NVIDIA A10G", 24, 4, 2),
    ("NVIDIA A100-SXM4-40GB", 40, 8, 1),
    ("NVIDIA A100-SXM4-80GB", 80, 8, 1),
    ("NVIDIA H100 80GB HBM3", 80, 8, 1),
]


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, context: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


# config.json fields as published on the Hub (only those the estimator reads).
CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "Qwen/Qwen2.5-7B": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "meta-llama/Llama-3.2-1B": {**_llama(2048, 8192, 16, 32, 8, 128256, 131072), "tie_word_embeddings": True},
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, 8192),
    "mistralai/Mistral-7B-v0.1": {
        **_llama(4096, 14336, 32, 32, 8, 32000, 32768),
        "model_type": "mistral",
        "sliding_window": 4096,
    },
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, 8192),
}


def documents(model: str) -> list[dict[str, Any]]:
    """The kinds of task a user runs on ``model``, each as they would write its resources."""
    big = model.endswith("70B")
    source: dict[str, Any] = {"source": {"identifier": model}}
    gpus: dict[str, Any] = {"gpu": {"type": "any", "count": 4 if big else 1}}
    vllm: dict[str, Any] = {"tensor_parallel_size": 4} if big else {}
    prompts: dict[str, Any] = {"prompts": ["Summarise the report in three sentences."] * 64, "max_tokens": 512}
    tasks: list[dict[str, Any]] = [
        {"taskType": "inference", "model": {**source, "engine": "vllm", "vllm": vllm}, "inference": prompts},
        {
            "taskType": "inference",
            "model": {**source, "engine": "vllm", "vllm": {**vllm, "max_model_len": 32768}},
            "inference": prompts,
        },
        {"taskType": "inference", "model": {**source, "engine": "transformers"}, "inference": prompts},
    ]
    train: dict[str, Any] = {
        "dataset": {"path": "/data/train.jsonl"},
        "hyperparameters": {"batch_size": 4, "max_length": 2048},
    }
    for adapter in ("lora", "qlora", None):
        model_part = {**source, **({"adapter": {"type": adapter, "r": 16}} if adapter else {})}
        tasks.append({"taskType": "sft", "model": model_part, **train})
    tasks.append(
        {
            "taskType": "sft",
            "model": {**source, "adapter": {"type": "lora"}},
            "dataset": train["dataset"],
            "hyperparameters": {"batch_size": 2, "max_length": 1024, "gradient_checkpointing": True},
        }
    )
    tasks.append({"taskType": "dpo", "model": {**source, "adapter": {"type": "lora"}}, **train})
    tasks.append(
        {
            "taskType": "grpo",
            "model": {**source, "adapter": {"type": "lora"}},
            "dataset": {"path": "/data/prompts.jsonl"},
            "hyperparameters": {"reward_funcs": ["length:200"], "batch_size": 8, "num_generations": 8},
        }
    )
    return [
        {"apiVersion": "mloc/v1", "kind": "Task", "spec": {**task, "resources": {"hardware": gpus}}} for task in tasks
    ]


def fleet() -> list[WorkerView]:
    views = []
    for name, gib, count, workers in FLEET:
        for number in range(workers):
            gpus: list[dict[str, Any]] = [{"index": i, "name": name, "memory_bytes": gib * GIB} for i in range(count)]
            views.append(
                WorkerView(
                    worker_id=f"{name.split()[-1].lower()}-{number}",
                    status=WorkerStatus.ACTIVE,
                    last_heartbeat=0.0,
                    topics=["tasks.*"],
                    tags=set(),
                    task_types={"inference", "sft", "dpo", "grpo"},
                    capabilities={"inference": {"engines": ["vllm", "transformers"]}},
                    gpus=gpus,
                    cpu_total=64_000,
                    mem_total=512 * GIB,
                    slots_total=count,
                    cpu_free=64_000,
                    mem_free=512 * GIB,
                    slots_free=count,
                    free_gpus={g["index"] for g in gpus},
                )
            )
    return views


@dataclass
class Tally:
    placed: int = 0
    oom: int = 0
    oom_if_25_over: int = 0  # would run out if the true need were 25 % above the estimate
    refused: int = 0

    def rate(self) -> float:
        return self.oom / self.placed if self.placed else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "oom_rate": round(self.rate(), 4)}


def simulate(tasks: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    facts: dict[str, ModelFacts] = {name: facts_from_config(config, source=name) for name, config in CONFIGS.items()}
    kinds = [(model, validate(doc)) for model in CONFIGS for doc in documents(model)]
    views = fleet()
    without, with_estimate = Tally(), Tally()
    per_kind: dict[str, list[int]] = {}
    for _ in range(tasks):
        model, document = rng.choice(kinds)
        estimate = estimate_task(document, facts[model])
        need = estimate.total
        request = request_of(document)
        label = f"{model.split('/')[-1]} {estimate.task}"
        for tally, asked in ((without, request), (with_estimate, replace(request, gpu_mem=need))):
            fitting = [view for view in views if fits_registration(asked, view)]
            if not fitting:
                tally.refused += 1
                continue
            view = rng.choice(fitting)
            gpu = min(g["memory_bytes"] for g in view.gpus)
            tally.placed += 1
            tally.oom += need > gpu
            tally.oom_if_25_over += need * 1.25 > gpu
            if tally is without:
                per_kind.setdefault(label, [0, 0])[0] += 1
                per_kind[label][1] += need > gpu
    ratio = with_estimate.rate() / without.rate() if without.rate() else 0.0
    return {
        "tasks": tasks,
        "seed": seed,
        "fleet": [f"{workers}x {count}x {name} ({gib} GiB)" for name, gib, count, workers in FLEET],
        "without_estimate": without.to_dict(),
        "with_estimate": with_estimate.to_dict(),
        "oom_rate_ratio": round(ratio, 4),
        "oom_by_kind_without": {k: f"{v[1]}/{v[0]}" for k, v in sorted(per_kind.items()) if v[1]},
    }


def report(found: dict[str, Any]) -> None:
    print(f"mixed queue of {found['tasks']} tasks on: {', '.join(found['fleet'])}")
    for name in ("without_estimate", "with_estimate"):
        row = found[name]
        print(
            f"  {name.replace('_', ' '):17} placed {row['placed']:5}  would OOM {row['oom']:5} "
            f"({row['oom_rate']:.1%})  refused {row['refused']:4}  OOM if 25% over the estimate {row['oom_if_25_over']}"
        )
    print(f"  OOM rate with the estimate / without: {found['oom_rate_ratio']:.2f}")
    for kind, count in found["oom_by_kind_without"].items():
        print(f"    without: {kind:45} {count} would OOM")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    found = simulate(args.tasks, args.seed)
    report(found)
    print(json.dumps({"oomqueue": found}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
