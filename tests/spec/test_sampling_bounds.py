"""Sampling values: the ranges both engines take, refused at submit with the field, the range and the fix,
and (with vLLM installed) the same ranges vLLM's own SamplingParams accepts and refuses."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from mloc.errors import SpecError
from mloc.spec import json_schema, load
from mloc.spec.sampling import Sampling


def refusal(inference: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load(f"taskType: inference\ninference: {{{inference}, prompts: [hi]}}\n")
    return caught.value


def test_a_temperature_above_2_is_refused_at_submit_naming_the_field_the_range_and_the_fix() -> None:
    error = refusal("temperature: 3")
    assert [detail["path"] for detail in error.details] == ["spec.inference.temperature"]
    assert error.message == (
        "invalid task: spec.inference.temperature: temperature must be in [0, 2], got 3; use 0 for greedy output "
        "and at most 2 for the most varied (vLLM and OpenAI take no more)"
    )


@pytest.mark.parametrize(
    ("setting", "path", "words"),
    [
        ("temperature: -0.1", "spec.inference.temperature", "temperature must be in [0, 2], got -0.1"),
        ("top_p: 0", "spec.inference.top_p", "top_p must be in (0, 1], got 0; use 1 to keep every token"),
        ("top_p: 1.5", "spec.inference.top_p", "top_p must be in (0, 1], got 1.5"),
        ("top_k: -2", "spec.inference.top_k", "top_k must be in [1, 100000], got -2; give how many"),
        ("max_tokens: 0", "spec.inference.max_tokens", "max_tokens must be in [1, 1000000], got 0"),
        ("n: 65, temperature: 1", "spec.inference.n", "n must be in [1, 64], got 65; ask for fewer"),
        ("seed: 18446744073709551616", "spec.inference.seed", "got 18446744073709551616; give a seed that fits"),
        ("stop: ['', 'x']", "spec.inference.stop", "stop has an empty string, which vLLM refuses; remove it"),
        ("n: 2, temperature: 0", "spec.inference", "n is 2 with temperature 0, and greedy decoding gives one"),
    ],
)
def test_a_value_an_engine_refuses_is_refused_at_submit(setting: str, path: str, words: str) -> None:
    error = refusal(setting)
    assert [detail["path"] for detail in error.details] == [path]
    assert words in error.message


def test_a_value_that_is_not_a_number_keeps_its_own_message() -> None:
    assert "expected a number, got the text 'warm'" in refusal("temperature: warm").message


@pytest.mark.parametrize(("given", "kept"), [(0, None), (-1, None), ("0", None), ("-1", None), (5, 5), (None, None)])
def test_a_top_k_of_0_or_minus_1_means_no_cut_as_in_vllm(given: Any, kept: int | None) -> None:
    assert Sampling.model_validate({"top_k": given}).top_k == kept


# Values at the edges of what Sampling accepts, each as MLOC's vLLM engine passes it on (top_k unset is 0).
ACCEPTED: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 2.0, "n": 64},
    {"top_p": 1e-6},
    {"top_p": 1.0},
    {"top_k": 1},
    {"top_k": 100_000},
    {"max_tokens": 1},
    {"seed": -(2**63)},
    {"seed": 2**64 - 1},
    {"stop": ["\n", "###"]},
]
# Values vLLM refuses when the engine is called; Sampling must refuse each of them first.
REFUSED: list[dict[str, Any]] = [
    {"temperature": 2.0001},
    {"temperature": -0.5},
    {"temperature": float("nan")},
    {"top_p": 0.0},
    {"top_p": 1.01},
    {"top_k": -2},
    {"max_tokens": 0},
    {"stop": [""]},
    {"temperature": 0.0, "n": 2},
]


def test_the_edges_sampling_accepts_are_valid_sampling() -> None:
    for values in ACCEPTED:
        Sampling.model_validate(values)
    for values in REFUSED:
        with pytest.raises(ValidationError):
            Sampling.model_validate(values)


@pytest.mark.extra("vllm")
def test_vllm_accepts_what_sampling_accepts_and_refuses_what_it_refuses() -> None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    def params(values: dict[str, Any]) -> Any:
        merged = {**Sampling().model_dump(), **values}
        merged["top_k"] = merged["top_k"] or 0
        merged["stop"] = merged["stop"] or None
        return SamplingParams(**merged)

    for values in ACCEPTED:
        params(Sampling.model_validate(values).model_dump(exclude_unset=True))
    for values in REFUSED:
        with pytest.raises(VLLMValidationError):
            params(values)


@pytest.mark.parametrize("top_k", [0, -1, 40, None, -2, 100_001])
def test_the_published_schema_takes_the_top_k_values_the_validator_takes(top_k: int | None) -> None:
    checker = jsonschema.Draft202012Validator(json_schema())
    document = {
        "apiVersion": "mloc/v1",
        "kind": "InferenceTask",
        "spec": {"taskType": "inference", "inference": {"prompts": ["hi"], "top_k": top_k}},
    }
    try:
        load(yaml.safe_dump(document))
        taken = True
    except SpecError:
        taken = False
    assert checker.is_valid(document) is taken
    assert taken is (top_k not in (-2, 100_001))
