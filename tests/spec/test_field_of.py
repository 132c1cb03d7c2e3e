"""``field_of`` answers what ``getattr(model, name, None)`` answers for the sections the orchestrator asks
every task for, on every shipped template (one per task type) and an eval task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mloc.spec import Document, validate
from mloc.spec.base import field_of
from mloc.spec.loader import parse_stream

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SECTIONS = ("model", "hyperparameters", "eval", "inference", "resources", "no_such_field")
OPTIONS = ("tools", "tasks", "embedding_model", "reward_model", "value_model", "no_such_field")
EVAL = {
    "taskType": "eval",
    "model": {"source": {"type": "huggingface", "identifier": "org/model"}},
    "eval": {
        "tasks": ["hellaswag"],
        "custom": [{"name": "arith", "path": "/data/arith.jsonl", "type": "multiple_choice"}],
    },
}


def documents() -> list[Document]:
    found = []
    for path in sorted(TEMPLATES.rglob("*.yaml")):
        for data in parse_stream(path.read_bytes(), limit=1 << 20):
            found.append(validate(data))
    return [*found, validate(EVAL)]


@pytest.mark.parametrize("document", documents(), ids=lambda d: f"{d.spec.task_type}:{d.metadata.name}")
def test_field_of_answers_as_getattr_does(document: Document) -> None:
    spec: Any = document.spec
    for name in SECTIONS:
        assert field_of(spec, name) is getattr(spec, name, None), name
        section = getattr(spec, name, None)
        for option in OPTIONS:
            assert field_of(section, option) == getattr(section, option, None), (name, option)
    assert field_of(None, "model") is None and field_of({"model": 1}, "model") is None
