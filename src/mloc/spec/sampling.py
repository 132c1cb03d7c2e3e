"""Generation settings shared by every task type that produces text.

The bounds are the ones both engines take. vLLM checks a request's values when the engine is called and
refuses the whole call for one bad request, so a value it would refuse must be caught here: at submit for
a task's own settings, and per row (the row's own error) for a dataset's or an OpenAI batch's overrides.
Where OpenAI's API has the same field, its range is the same (temperature 0..2, top_p in (0, 1]).
"""

from __future__ import annotations

from typing import Any, Literal

import annotated_types
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict

from mloc.spec.base import Strict
from mloc.spec.dataset import DatasetInput

# What to do about a value out of its range, per field; the range itself is read off the field.
_FIXES = {
    "max_tokens": "give how many tokens to generate, at least 1 and below the model's context",
    "temperature": "use 0 for greedy output and at most 2 for the most varied (vLLM and OpenAI take no more)",
    "top_p": "use 1 to keep every token, or a smaller share such as 0.9",
    "top_k": "give how many of the likeliest tokens to sample from, or 0 (or leave it out) for no cut",
    "seed": "give a seed that fits in 64 bits",
    "n": "ask for fewer completions per prompt, or send the prompt more than once",
}
_OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# top_k values that mean "no cut" to vLLM, which also takes -1; MLOC keeps them as unset.
_NO_TOP_K = (0, -1)


def _no_cut_in_schema(schema: JsonDict) -> None:
    # The published schema takes what the validator takes, so an editor does not flag top_k: 0.
    choices = schema["anyOf"]
    assert isinstance(choices, list)
    choices.insert(1, {"enum": list(_NO_TOP_K)})


# vLLM reads a seed of -1 as none given; the transformers engine does the same, so it means one thing.
NO_SEED = -1


class Sampling(Strict):
    max_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(0.7, ge=0, le=2, description="0 is greedy; at most 2, as vLLM and OpenAI allow.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Unset, 0 or -1 means no top-k cut.",
        json_schema_extra=_no_cut_in_schema,
    )
    stop: list[str] = Field(default_factory=list)
    # The engines seed a torch generator, which takes a signed or unsigned 64-bit integer.
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**64 - 1,
        description="Fixes the sampling for repeatable outputs; unset or -1: a fresh seed each run, on every engine.",
    )
    n: int = Field(1, ge=1, le=64, description="Completions per prompt; more than 1 needs a temperature above 0.")

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "seed", "n", mode="wrap")
    @classmethod
    def _in_range(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        try:
            return handler(value)
        except ValidationError as exc:
            kind = exc.errors()[0]["type"]
            if kind not in _OUT_OF_RANGE:
                raise
            # Below 1 yet a valid integer (a number or a CSV cell's text): 0 and -1 are the engines' "no cut".
            if name == "top_k" and kind == "greater_than_equal" and int(float(value)) in _NO_TOP_K:
                return None
            raise ValueError(f"{name} must be in {_range(name)}, got {value!r}; {_FIXES[name]}") from None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not stop for stop in value):
            raise ValueError("stop has an empty string, which vLLM refuses; remove it")
        return value

    @model_validator(mode="after")
    def _samples_need_temperature(self) -> Sampling:
        # Greedy decoding has one answer; vLLM refuses to be asked for several.
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"n is {self.n} with temperature 0, and greedy decoding gives one completion; set temperature "
                "above 0 (e.g. 0.7) for several different completions, or n to 1"
            )
        return self


def _range(name: str) -> str:
    """A field's bounds as an interval, e.g. ``[0, 2]`` or ``(0, 1]``."""
    low, high = "[", "]"
    lower: Any = "-inf"
    upper: Any = "inf"
    for bound in Sampling.model_fields[name].metadata:
        if isinstance(bound, annotated_types.Ge):
            lower = bound.ge
        elif isinstance(bound, annotated_types.Gt):
            lower, low = bound.gt, "("
        elif isinstance(bound, annotated_types.Le):
            upper = bound.le
        elif isinstance(bound, annotated_types.Lt):
            upper, high = bound.lt, ")"
    return f"{low}{lower}, {upper}{high}"


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


MAX_PROMPTS = 100_000


class InferenceInput(Sampling):
    prompts: list[str] = Field(default_factory=list, description="Completion-style prompts.")
    messages: list[list[Message]] = Field(
        default_factory=list, description="Chat conversations; each one gets one reply."
    )
    input: DatasetInput | None = Field(
        None, description="Read prompts from a dataset (file, URL, HF cache or another task's results) instead."
    )
    batch_size: int | None = Field(None, ge=1, le=4096)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        for index, prompt in enumerate(value):
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty; remove it or give it text")
        return value

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[list[Message]]) -> list[list[Message]]:
        for index, conversation in enumerate(value):
            if not conversation:
                raise ValueError(f"conversation {index} has no messages")
        return value

    @model_validator(mode="after")
    def _has_input(self) -> InferenceInput:
        if self.input is not None:
            if self.prompts or self.messages:
                raise ValueError(
                    "give inline 'prompts'/'messages' or a dataset in 'input', not both; move the inline prompts "
                    "into the dataset or into a task of their own"
                )
            return self
        if not self.prompts and not self.messages:
            raise ValueError(
                "no input; give 'prompts' (a list of strings), 'messages' (chat conversations) or 'input' "
                "(a dataset: path, huggingface or task)"
            )
        if len(self.prompts) + len(self.messages) > MAX_PROMPTS:
            raise ValueError(f"more than {MAX_PROMPTS} prompts in one task; split it into several tasks")
        return self
