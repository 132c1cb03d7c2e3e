"""What a finished run used, as the task records it and as the owner's usage day counts it.

Pure functions of what the run reported and what it asked for, so the worker's task runner only
gathers their inputs; the counters they produce are written with the run's final move.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mloc import counters
from mloc.spec.quantity import parse_cpu
from mloc.state import TaskState

# The usage figures an owner's day sums, when the run reported them (tokens and samples only
# where its executor counts them).
DAILY_FIGURES = (
    "wall_sec",
    "gpu_seconds",
    "cpu_seconds",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "train_samples",
    "train_tokens",
    "train_steps",
    "eval_samples",
)


def run_usage(
    reported: Mapping[str, float], result: dict[str, Any] | None, wall: float, gpu_count: int, cores: float
) -> dict[str, float]:
    """The task's usage: what its executor reported while running (else the numbers of its result's
    ``usage``), with the wall time and the GPU- and CPU-seconds it held."""
    usage = dict(reported)
    if not usage and result and isinstance(result.get("usage"), dict):
        usage = {
            k: float(v) for k, v in result["usage"].items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    if "total_tokens" not in usage and ("prompt_tokens" in usage or "completion_tokens" in usage):
        # Reported as the two parts (a dataset chunk's, counted as they go): the total is their sum.
        usage["total_tokens"] = usage.get("prompt_tokens", 0.0) + usage.get("completion_tokens", 0.0)
    usage["wall_sec"] = round(wall, 6)
    usage["gpu_seconds"] = round(wall * gpu_count, 6)
    # Like GPU-seconds, what the task kept from others: wall time times the cores it asked for.
    usage.setdefault("cpu_seconds", round(wall * cores, 6))
    return usage


def daily_counters(
    task_type: str,
    state: TaskState,
    usage: Mapping[str, float],
    gpus: Sequence[int],
    worker_gpus: Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """The counters one ended run adds to its owner's usage day: the task, by type and outcome, and
    its figures; GPU-seconds also per GPU model (named by the worker's ``worker_gpus``)."""
    daily = counters.ended(task_type, state)
    daily.update({name: usage[name] for name in DAILY_FIGURES if name in usage})
    if gpus and usage.get("gpu_seconds"):
        names = {g["index"]: g.get("name", "gpu") for g in worker_gpus}
        daily[f"gpu_seconds.{names.get(gpus[0], 'gpu')}"] = usage["gpu_seconds"]
    return daily


def cores_asked(document: Mapping[str, Any]) -> float:
    """The CPU cores a task asked for (one when it named none: it runs on at least one)."""
    hardware = ((document.get("spec") or {}).get("resources") or {}).get("hardware") or {}
    try:
        milli = parse_cpu(hardware.get("cpu") or 0)
    except ValueError:
        milli = 0
    return milli / 1000 if milli else 1.0


def peak_fields(memory: Mapping[str, Any], gpus: Sequence[int]) -> dict[str, str]:
    """The task hash fields of a run's measured memory: the peak (on the fullest GPU where torch used
    the task's GPUs, else the RSS of its executor process tree) and the figures behind it."""
    gpu = memory.get("gpu_peak_bytes") if gpus else None
    peak = int(gpu) if gpu else int(memory.get("rss_peak_bytes") or 0)
    detail = {**memory, "device": "gpu" if gpu else "cpu"}
    return {"memory_peak_bytes": str(peak), "memory_peak": json.dumps(detail)}
