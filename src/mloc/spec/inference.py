"""``inference``: batch generation with vLLM (or the transformers fallback)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mloc.spec.base import ModelSpec, SpecBase
from mloc.spec.sampling import InferenceInput


class InferenceSpec(SpecBase):
    kind: ClassVar[str] = "InferenceTask"
    task_type: Literal["inference"] = Field(..., alias="taskType")
    model: ModelSpec | None = Field(None, description="Defaults to the worker's VLLM_MODEL.")
    # With inference.input, resources.replicas is how many of the dataset's chunks run at once.
    inference: InferenceInput
