"""Generation settings shared by every task type that produces text."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mloc.spec.base import Strict
from mloc.spec.dataset import DatasetInput


class Sampling(Strict):
    max_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=100_000, description="Unset means no top-k cut.")
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = Field(1, ge=1, le=64, description="Completions per prompt.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


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
                "no input: give 'prompts' (a list of strings), 'messages' (chat conversations) or 'input' "
                "(a dataset: path, huggingface or task)"
            )
        if len(self.prompts) + len(self.messages) > MAX_PROMPTS:
            raise ValueError(f"more than {MAX_PROMPTS} prompts in one task; split it into several tasks")
        return self
