"""Training task types on TRL and PEFT: ``sft``, ``dpo``, ``grpo`` and ``ppo``."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict


class DatasetFormat(StrEnum):
    AUTO = "auto"
    PROMPT_COMPLETION = "prompt_completion"
    MESSAGES = "messages"
    TEXT = "text"
    PREFERENCE = "preference"
    PROMPT = "prompt"


class DatasetSpec(Strict):
    """Exactly one of inline ``examples``, a local ``path`` (JSONL, Parquet, CSV) or a hub ``identifier``."""

    examples: list[dict[str, Any]] | None = None
    path: str | None = None
    identifier: str | None = Field(None, description="A Hugging Face dataset id in the local cache.")
    split: str = "train"
    format: DatasetFormat = DatasetFormat.AUTO
    eval_ratio: float | None = Field(None, gt=0, lt=1, description="Hold out this share for evaluation.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [name for name in ("examples", "path", "identifier") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'examples' (inline list), 'path' (a local JSONL/Parquet/CSV file) "
                f"or 'identifier' (a cached hub dataset); got {given or 'none'}"
            )
        if self.examples is not None and not self.examples:
            raise ValueError("'examples' is empty; give at least one example")
        return self


class TrainHyperparameters(Strict):
    num_train_epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    per_device_train_batch_size: int = Field(4, ge=1, le=4096, alias="batch_size")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_length: int = Field(1024, ge=8, le=1_048_576)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    merge_adapter: bool = Field(False, description="Also save the base model merged with the adapter.")


class SFTSpec(SpecBase):
    kind: ClassVar[str] = "SFTTask"
    task_type: Literal["sft"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: TrainHyperparameters = Field(default_factory=TrainHyperparameters)


class DPOHyperparameters(TrainHyperparameters):
    beta: float = Field(0.1, gt=0)
    max_prompt_length: int | None = Field(None, ge=8)


class DPOSpec(SpecBase):
    kind: ClassVar[str] = "DPOTask"
    task_type: Literal["dpo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)


class GRPOHyperparameters(TrainHyperparameters):
    reward_funcs: list[str] = Field(default_factory=list, description="Built-in reward function names.")
    reward_model: str | None = None
    num_generations: int = Field(4, ge=2, le=256)
    max_completion_length: int = Field(64, ge=1)
    beta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _has_reward(self) -> GRPOHyperparameters:
        if not self.reward_funcs and not self.reward_model:
            raise ValueError("GRPO needs a reward: set 'reward_funcs' or 'reward_model'")
        return self


class GRPOSpec(SpecBase):
    kind: ClassVar[str] = "GRPOTask"
    task_type: Literal["grpo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: GRPOHyperparameters


class PPOHyperparameters(TrainHyperparameters):
    reward_model: str = Field(..., description="A sequence-classification model id or path.")
    value_model: str | None = Field(None, description="Defaults to the reward model.")
    ppo_epochs: int = Field(4, ge=1, le=100)
    target_kl: float | None = Field(0.1, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, gt=0, le=1)
    num_mini_batches: int = Field(1, ge=1)
    response_length: int = Field(53, ge=1)
    total_episodes: int | None = Field(None, ge=1)


class PPOSpec(SpecBase):
    kind: ClassVar[str] = "PPOTask"
    task_type: Literal["ppo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: PPOHyperparameters
