"""Start estimates of waiting tasks against when they really started, on a replayed mixed queue.

Run: python bench/eta.py [--tasks 40] [--workers 2] [--slots 2] [--gpus 0] [--backfill-after SEC] [--users 1]

A local cluster (embedded Redis, real orchestrator and workers) first runs a few tasks of each kind so
there is history, then gets a burst of ``--tasks`` echo tasks of three kinds (0.3 s, 1 s and 2 s, each
its own topic) in random order. With ``--gpus N`` each worker declares N GPUs (MLOC_WORKER_GPUS) and the
kinds ask for 1, 2 and N of them, so the GPUs, not the slots, decide who waits; ``--backfill-after SEC``
(MLOC_BACKFILL_AFTER_SEC, 60 s by default) makes backfill holds keep workers for the big tasks that have
waited that long during the run; ``--users N`` submits the burst as N users, the first with half of it
as a backlog ahead of the others' tasks (fair share then decides who goes first). Right after the burst, each waiting task's ``queue.eta_sec`` is read
(GET /api/v1/tasks/{id}); when it starts, the real wait is compared with it. Prints the median and p90
of the absolute error, and of the error relative to the real wait; the baseline, in the same run, is
the naive estimate "tasks ahead x mean duration / slots" that ignores what is running and the kinds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from mloc.client import Client
from mloc.localcluster import LocalCluster

KINDS = {"tasks.short": 0.3, "tasks.mid": 1.0, "tasks.long": 2.0}


def echo(topic: str, gpus: int = 0, owner: str | None = None) -> dict[str, object]:
    task: dict[str, object] = {"taskType": "echo", "topic": topic, "hyperparameters": {"sleep_sec": KINDS[topic]}}
    if owner:
        task["metadata"] = {"owner": owner}
    if gpus:
        # One GPU for the short kind, two for the middle one, all of a worker's for the long one.
        wanted = {"tasks.short": 1, "tasks.mid": min(2, gpus), "tasks.long": gpus}[topic]
        task["resources"] = {"hardware": {"gpu": {"count": wanted}}}
    return task


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs each worker declares (0: none)")
    parser.add_argument("--backfill-after", type=float, default=None, help="MLOC_BACKFILL_AFTER_SEC (s)")
    parser.add_argument("--users", type=int, default=1, help="owners of the burst (the first: half, first)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="mloc-bench-eta-"))
    env = {"MLOC_WORKER_SLOTS": str(args.slots), "MLOC_SCHEDULE_INTERVAL_SEC": "0.2", "LOG_LEVEL": "WARNING"}
    if args.gpus:
        env["MLOC_WORKER_GPUS"] = f"NVIDIA L4:{args.gpus}:24576"
    if args.backfill_after is not None:
        env["MLOC_BACKFILL_AFTER_SEC"] = repr(args.backfill_after)
    with LocalCluster(home=home, workers=args.workers, env=env, log_dir=home / "logs").start(timeout=120) as cluster:
        client = Client(cluster.api_url)
        for topic in KINDS:
            for answer in [client.submit(echo(topic, args.gpus)) for _ in range(2)]:
                client.wait(answer["task_id"], timeout=60)
        topics = [rng.choice(list(KINDS)) for _ in range(args.tasks)]
        backlog = args.tasks // 2 if args.users > 1 else args.tasks
        owners: list[str | None] = [None] * args.tasks
        if args.users > 1:
            others = [f"user-{rng.randint(2, args.users)}" for _ in range(args.tasks - backlog)]
            owners = [*(["user-1"] * backlog), *others]
        burst = [echo(topic, args.gpus, owner) for topic, owner in zip(topics, owners, strict=True)]
        answers = client.submit_bulk(burst)["tasks"]
        submitted = time.time()
        estimates: dict[str, tuple[float, int]] = {}
        for answer in answers:
            record = client.task(answer["task_id"])
            queue = record.get("queue")
            if record["state"] == "pending" and queue and queue.get("eta_sec") is not None:
                estimates[answer["task_id"]] = (queue["eta_sec"] + (time.time() - submitted), queue["position"])
        mean = statistics.mean(KINDS.values())
        capacity = args.workers * args.slots
        errors, naive, relative, signed = [], [], [], []
        for task_id, (eta, position) in estimates.items():
            record = client.wait(task_id, timeout=600)
            waited = record["started_at"] - submitted
            errors.append(abs(waited - eta))
            signed.append(waited - eta)
            naive.append(abs(waited - (position - 1 + capacity) * mean / capacity))
            relative.append(abs(waited - eta) / max(waited, 0.5))
    if not errors:
        raise SystemExit("no task waited: raise --tasks or lower --slots")
    figures = {
        "waiting_tasks": len(errors),
        "eta_bias_median_sec": round(statistics.median(signed), 2),
        "eta_error_median_sec": round(statistics.median(errors), 2),
        "eta_error_p90_sec": round(pct(errors, 0.9), 2),
        "eta_relative_error_median": round(statistics.median(relative), 3),
        "eta_relative_error_p90": round(pct(relative, 0.9), 3),
        "baseline_naive_error_median_sec": round(statistics.median(naive), 2),
        "baseline_naive_error_p90_sec": round(pct(naive, 0.9), 2),
    }
    gpus = f", {args.gpus} GPUs each" if args.gpus else ""
    held = "" if args.backfill_after is None else f", holds after {args.backfill_after:g} s"
    users = f", {args.users} users" if args.users > 1 else ""
    shape = f"{args.workers} workers x {args.slots} slots{gpus}{held}{users}"
    print(f"{len(errors)} waiting tasks of {args.tasks} ({shape})")
    print(f"ETA error:   median {figures['eta_error_median_sec']} s, p90 {figures['eta_error_p90_sec']} s "
          f"(relative: median {figures['eta_relative_error_median']:.0%}, p90 {figures['eta_relative_error_p90']:.0%})")  # fmt: skip
    print(f"naive estimate (same run): median {figures['baseline_naive_error_median_sec']} s, "
          f"p90 {figures['baseline_naive_error_p90_sec']} s")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
