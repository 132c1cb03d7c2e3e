"""``inference``: batch generation with vLLM (or the transformers fallback)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mloc.spec.base import ModelSpec, SpecBase
from mloc.spec.sampling import InferenceInput


class InferenceSpec(SpecBase):
    kind: ClassVar[str] = "InferenceTask"
    task_type: Literal["inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = Field(None, description="Defaults to the worker's VLLM_MODEL.")
    inference: InferenceInput

    @model_validator(mode="after")
    def _one_reader_per_dataset(self) -> InferenceSpec:
        if self.inference.input is not None and self.resources.replicas > 1:
            raise ValueError(
                "resources.replicas > 1 splits inline prompts between workers; a dataset (inference.input) is "
                "read by one task: set replicas to 1, or split the dataset into files and submit a task for each"
            )
        return self
