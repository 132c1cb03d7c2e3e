"""Helpers for the training executor tests: tiny models, task documents and a recording RunContext."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import mloc.spec
from mloc.executors.base import Event, RunContext
from tests.support.tiny_model import build_tiny_causal_lm

# Short prompt/completion pairs the tiny model can learn in a few dozen steps.
QA = [
    {"prompt": "Question: What is the capital of France?\nAnswer:", "completion": " Paris."},
    {"prompt": "Question: What colour is the sky?\nAnswer:", "completion": " Blue."},
    {"prompt": "Question: How many legs does a spider have?\nAnswer:", "completion": " Eight."},
    {"prompt": "Question: What does MLOC schedule?\nAnswer:", "completion": " Tasks."},
]
PREFERENCES = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " I do not know."} for row in QA]


def build_models(root: Path) -> dict[str, Path]:
    """The tiny models every training test shares: a base model and a chat variant."""
    return {
        "base": build_tiny_causal_lm(root / "tiny-base"),
        "chat": build_tiny_causal_lm(root / "tiny-chat", chat_template=True),
    }


@dataclass
class Recorder:
    """Collects what an executor emits through its RunContext."""

    events: list[Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        with self.lock:
            return [event for event in self.events if event["ev"] == kind]

    def metric(self, name: str) -> list[tuple[int, float]]:
        return [(event["step"], event["values"][name]) for event in self.of("metrics") if name in event["values"]]

    def usage(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for event in self.of("usage"):
            for key, value in event["counters"].items():
                total[key] = total.get(key, 0) + value
        return total


def task_yaml(
    task_type: str, model: Path, dataset: dict[str, Any], hyperparameters: dict[str, Any], **model_extra: Any
) -> str:
    """A task file as a user would write it (YAML text), for the same loader the API uses."""
    spec = {
        "apiVersion": "mloc/v1",
        "kind": "Task",
        "metadata": {"name": f"test-{task_type}", "owner": "tester"},
        "spec": {
            "taskType": task_type,
            "model": {"source": {"type": "local", "identifier": str(model)}, **model_extra},
            "dataset": dataset,
            "hyperparameters": hyperparameters,
        },
    }
    # A JSON round trip gives repeated examples their own objects, so YAML writes no aliases (which the
    # loader refuses).
    return yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False)


def make_context(
    yaml_text: str, out_dir: Path, *, attempt: int = 1, task_id: str = "task-1"
) -> tuple[RunContext, Recorder]:
    recorder = Recorder()
    ctx = RunContext(
        task_id=task_id,
        attempt=attempt,
        owner="tester",
        document=mloc.spec.load(yaml_text),
        out_dir=out_dir,
        models_dir=out_dir.parent / "models",
        worker_id="test-worker",
        emit=recorder,
    )
    return ctx, recorder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
