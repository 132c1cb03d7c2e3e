"""Evaluation overhead: the same custom tasks through MLOC (an eval task submitted over HTTP to a local
orchestrator and worker) and through ``lm_eval.simple_evaluate`` in this process, on the same model.

Both sides score the same task configs (MLOC's own, from ``mloc.executors.eval.task_config``) with
lm-eval's HF model loaded in the same dtype. After a first MLOC task has loaded the model on the worker
(and this process has loaded it for the direct run), rounds alternate: the direct run is timed from
building its TaskManager to the end of ``simple_evaluate``; the MLOC run from submit to the stored result
(the worker's event stream says when). Printed: both wall times per round, the ratio of medians
(direct / MLOC, target >= 0.95, i.e. MLOC's wall <= direct / 0.95), MLOC's wall outside lm-eval (the
executor reports the time inside ``simple_evaluate``) and the ratio that overhead alone gives, and whether
the scores (values and standard errors) are identical. The machine's load average is printed beside.

    python bench/eval.py                       # bundled Gemma 3 270M, 120 multiple-choice + 24 exact-match rows
    python bench/eval.py --rows 40 --rounds 2 --model mloc-tiny-llama
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
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import yaml  # noqa: E402

import mloc.spec  # noqa: E402
from mloc.executors.eval_tasks import task_config  # noqa: E402
from mloc.spec.eval import EvalSpec  # noqa: E402
from tests.llm.builders import persistent_models_dir  # noqa: E402

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Norway", "Oslo"),
]


def write_data(folder: Path, rows: int) -> dict[str, Path]:
    """Arithmetic as multiple choice (``rows`` questions, 4 choices) and capitals as exact match (a fifth)."""
    folder.mkdir(parents=True, exist_ok=True)
    mc, em = folder / "arith.jsonl", folder / "capitals.jsonl"
    with mc.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            a, b = i % 17 + 2, i % 11 + 3
            choices = [str(a + b), str(a + b + 1), str(a * b), str(abs(a - b))]
            handle.write(json.dumps({"question": f"What is {a} plus {b}?", "choices": choices, "answer": 0}) + "\n")
    with em.open("w", encoding="utf-8") as handle:
        for i in range(max(1, rows // 5)):
            country, capital = CAPITALS[i % len(CAPITALS)]
            handle.write(json.dumps({"question": f"What is the capital of {country}?", "target": capital}) + "\n")
    return {"mc": mc, "em": em}


def document(model: str, data: dict[str, Path], batch_size: int, max_tokens: int) -> mloc.spec.Document:
    return mloc.spec.validate(
        {
            "apiVersion": "mloc/v1",
            "kind": "EvalTask",
            "metadata": {"name": "bench-eval"},
            "spec": {
                "taskType": "eval",
                "model": {"source": {"type": "package", "identifier": model}, "engine": "transformers"},
                "eval": {
                    "custom": [
                        {"name": "arith", "path": str(data["mc"]), "type": "multiple_choice"},
                        {"name": "capitals", "path": str(data["em"]), "type": "exact_match"},
                    ],
                    "batch_size": batch_size,
                    "max_tokens": max_tokens,
                },
            },
        }
    )


def direct_scores(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's rows in MLOC's shape, read here independently of the executor's parser."""
    scores: dict[str, dict[str, float | None]] = {}
    for task, row in results["results"].items():
        values: dict[str, float | None] = {}
        for key, value in row.items():
            if not key.endswith(",none"):
                continue
            values[key.removesuffix(",none")] = float(value) if isinstance(value, int | float) else None
        scores[task] = values
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="a packaged model (gemma3-270m, mloc-tiny-llama)")
    parser.add_argument("--rows", type=int, default=120, help="multiple-choice rows (exact match gets a fifth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    import lm_eval
    import redis
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mloc import keys
    from mloc.client import Client
    from mloc.llm.modelsource import resolve_model
    from mloc.localcluster import LocalCluster

    models_dir = persistent_models_dir()
    scratch = Path(tempfile.mkdtemp(prefix="mloc-bench-eval-"))
    data = write_data(scratch / "data", args.rows)
    doc = document(args.model, data, args.batch_size, args.max_tokens)
    spec = doc.spec
    assert isinstance(spec, EvalSpec) and spec.model is not None
    configs = scratch / "direct_tasks"
    configs.mkdir()
    for custom in spec.eval.custom:
        (configs / f"{custom.name}.yaml").write_text(yaml.safe_dump(task_config(custom, spec.eval.max_tokens)))
    names = [custom.name for custom in spec.eval.custom]
    body = json.dumps(doc.to_wire()).encode()

    home = scratch / "cluster"
    env = {"MLOC_MODELS_DIR": str(models_dir), "LOG_LEVEL": "WARNING"}
    mloc_walls: list[float] = []
    direct_walls: list[float] = []
    with LocalCluster(home=home, workers=1, env=env, log_dir=home / "logs") as cluster:
        client = Client(cluster.api_url)
        events = redis.Redis.from_url(cluster.redis_url or "", decode_responses=True, socket_timeout=30)

        def through_mloc() -> dict[str, Any]:
            # A blocking read of the event stream notices the end at once, without polling the API.
            last = events.xinfo_stream(keys.EVENTS)["last-generated-id"] if events.exists(keys.EVENTS) else "0"
            started = time.perf_counter()
            task_id = client.submit(body)["task_id"]
            state = ""
            while state not in ("succeeded", "failed", "cancelled"):
                for _, entries in events.xread({keys.EVENTS: last}, block=2000) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        if fields["task"] == task_id:
                            state = fields["to"]
            mloc_walls.append(time.perf_counter() - started)
            assert state == "succeeded", client.task(task_id)
            return dict(client.result(task_id))

        warm = through_mloc()  # the worker imports lm-eval and loads the model once
        mloc_walls.clear()
        path = resolve_model(spec.model.source, models_dir)
        # Where and in what dtype the worker's transformers engine loaded it.
        device = "cuda" if _cuda() else "cpu"
        lm = HFLM(pretrained=str(path), dtype=warm["dtype"], device=device, batch_size=args.batch_size)

        def direct() -> dict[str, Any]:
            started = time.perf_counter()
            manager = TaskManager(include_path=str(configs), include_defaults=False)
            results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=False)
            direct_walls.append(time.perf_counter() - started)
            assert results is not None
            return dict(results)

        outcomes: dict[str, list[Any]] = {"mloc": [], "direct": []}
        for number in range(args.rounds):
            order = (("direct", direct), ("mloc", through_mloc))
            for name, route in order if number % 2 == 0 else order[::-1]:
                outcomes[name].append(route())
        client.close()

    load = os.getloadavg()
    mloc_scores = [result["scores"] for result in outcomes["mloc"]]
    direct_all = [direct_scores(result) for result in outcomes["direct"]]
    identical = all(scores == mloc_scores[0] for scores in mloc_scores + direct_all)
    samples = warm["samples"]
    base, through = statistics.median(direct_walls), statistics.median(mloc_walls)
    print(
        f"\neval overhead: {args.model} ({warm['dtype']}), {samples['arith']['scored']} multiple-choice + "
        f"{samples['capitals']['scored']} exact-match rows, batch {args.batch_size}, {args.rounds} rounds"
    )
    print(
        f"    load average (1/5/15 min)        : {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    print(
        f"    direct lm_eval.simple_evaluate  : {base:8.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in direct_walls)})"
    )
    print(
        f"    MLOC eval task, submit->result  : {through:8.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in mloc_walls)})"
    )
    print(f"    speed ratio direct / MLOC       : {base / through:8.3f}   (target >= 0.95)")
    # Load from other processes moves both walls by seconds; what MLOC adds is its wall outside lm-eval.
    added = [wall - result["usage"]["eval_sec"] for wall, result in zip(mloc_walls, outcomes["mloc"], strict=True)]
    inside = statistics.median(result["usage"]["eval_sec"] for result in outcomes["mloc"])
    print(
        f"    MLOC outside simple_evaluate    : {statistics.median(added):8.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in added)})"
    )
    print(
        f"    direct / (direct + that)        : {base / (base + statistics.median(added)):8.3f}   (simple_evaluate in MLOC: {inside:.2f} s)"
    )
    print(f"    scores identical                : {'yes' if identical else 'no'}")
    print(f"    MLOC scores                     : {json.dumps(mloc_scores[0])}")
    if not identical:
        print(f"    direct scores                   : {json.dumps(direct_all[0])}")
    print(f"    (run folder: {scratch})")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
