"""A value of the wrong shape or outside a fixed set is refused naming the value and what to write instead."""

from __future__ import annotations

import pytest

from mloc.errors import SpecError
from mloc.spec import validate

MODEL = {"source": "org/model"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"taskType": "rag_inference", "model": MODEL, "questions": ["q"], "documents": ["/data/a.txt"]},
            "spec.documents.0: expected a mapping, got the text '/data/a.txt' (write a mapping of text, path, glob, "
            "metadata)",
        ),
        (
            {"taskType": "inference", "model": MODEL, "inference": {"prompts": "hi"}},
            "spec.inference.prompts: expected a list, got the text 'hi' (write a list, e.g. [\"hi\"])",
        ),
        (
            {
                "taskType": "agent_inference",
                "model": MODEL,
                "input": "hi",
                "hyperparameters": {"tools": ["calculator"]},
            },
            "spec.hyperparameters.tools.0: 'calculator' is not one of 'python_repl', 'web_search' or 'retriever'",
        ),
        (
            {"taskType": "inference", "model": {**MODEL, "engine": "vlm"}, "inference": {"prompts": ["hi"]}},
            "spec.model.engine: 'vlm' is not one of 'auto', 'vllm' or 'transformers' (did you mean 'vllm'?)",
        ),
    ],
)
def test_a_value_of_the_wrong_shape_or_outside_its_set_names_what_to_write(
    spec: dict[str, object], expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        validate({"spec": spec})
    assert caught.value.message == f"invalid task: {expected}"
