"""A huggingface source's identifier is a hub id or a folder on the worker: anything else is refused at
submit, naming the fix, rather than failing on the worker."""

from __future__ import annotations

import pytest

from mloc.errors import SpecError
from mloc.spec import validate


def inference(identifier: str) -> dict[str, object]:
    return {
        "spec": {
            "taskType": "inference",
            "model": {"source": {"identifier": identifier}},
            "inference": {"prompts": ["x"]},
        }
    }


@pytest.mark.parametrize("identifier", ["not a valid id!!", "Qwen/Qwen 2.5", "org/-name", "my models"])
def test_an_identifier_that_is_neither_a_hub_id_nor_a_path_is_refused_with_the_fix(identifier: str) -> None:
    with pytest.raises(SpecError) as caught:
        validate(inference(identifier))
    assert caught.value.message == (
        f"invalid task: spec.model.source: source.identifier {identifier!r} is not a Hugging Face id (owner/name: "
        "letters, digits, '-', '_' and '.'); fix the id, or give a folder on the worker as a path (/abs/path or "
        "./folder)"
    )


@pytest.mark.parametrize(
    "identifier",
    ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org/name.v1_2", "/models/my model", "./my models", "~/m", "a/b/c"],
)
def test_hub_ids_and_paths_are_taken(identifier: str) -> None:
    assert validate(inference(identifier)).spec.model.source.identifier == identifier  # type: ignore[attr-defined]
