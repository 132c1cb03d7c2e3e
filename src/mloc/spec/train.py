"""Training task types on TRL and PEFT: ``sft``, ``dpo``, ``grpo`` and ``ppo``.

Field names follow TRL/transformers where one exists (``learning_rate``, ``num_train_epochs``,
``gradient_accumulation_steps``), with the short spellings people write (``epochs``, ``batch_size``,
``max_seq_length``) accepted as aliases.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from mloc.spec.base import ModelSpec, SpecBase, Strict

# The column names TRL's dataset formats read, which dataset.columns maps a file's own columns to.
COLUMN_ROLES = ("prompt", "completion", "messages", "text", "chosen", "rejected")


class DatasetFormat(StrEnum):
    AUTO = "auto"
    PROMPT_COMPLETION = "prompt_completion"  # {"prompt": ..., "completion": ...}
    MESSAGES = "messages"  # {"messages": [{"role": ..., "content": ...}, ...]}
    TEXT = "text"  # {"text": ...}
    PREFERENCE = "preference"  # {"prompt": ..., "chosen": ..., "rejected": ...}
    PROMPT = "prompt"  # {"prompt": ...}


class DatasetSpec(Strict):
    """Exactly one of inline ``examples``, a local ``path`` (JSONL, Parquet, CSV) or a hub ``identifier``."""

    examples: list[dict[str, Any]] | None = None
    path: str | None = Field(
        None, description="A local .jsonl/.json, .parquet or .csv file, or a folder made by save_to_disk."
    )
    identifier: str | None = Field(None, description="A Hugging Face dataset id in the local cache.")
    split: str = "train"
    format: DatasetFormat = DatasetFormat.AUTO
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="The data's columns under the names the formats read: {prompt: question, completion: answer}; "
        f"names: {', '.join(sorted(('prompt', 'completion', 'messages', 'text', 'chosen', 'rejected')))}.",
    )
    eval_ratio: float | None = Field(None, gt=0, lt=1, description="Hold out this share for evaluation.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many examples.")

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
        unknown = sorted(set(self.columns) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(
                f"dataset.columns names {', '.join(map(repr, unknown))}, which no format reads; the keys are the "
                f"names the formats read ({', '.join(COLUMN_ROLES)}), each mapped to a column of the data"
            )
        sources = list(self.columns.values())
        if any(not source.strip() for source in sources) or len(set(sources)) != len(sources):
            raise ValueError("dataset.columns maps each name to a column of its own, not empty; fix the mapping")
        return self


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class Tracker(StrEnum):
    """The experiment trackers a training task can report to, by TRL's ``report_to`` names."""

    TENSORBOARD = "tensorboard"  # event files under the task's out folder (tensorboard/)
    MLFLOW = "mlflow"  # MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME... on the worker
    WANDB = "wandb"  # WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE... on the worker
    NONE = "none"


class TrainHyperparameters(Strict):
    num_train_epochs: float = Field(1.0, gt=0, le=1000, validation_alias=AliasChoices("num_train_epochs", "epochs"))
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    per_device_train_batch_size: int = Field(
        4, ge=1, le=4096, validation_alias=AliasChoices("per_device_train_batch_size", "batch_size")
    )
    per_device_eval_batch_size: int | None = Field(
        None, ge=1, le=4096, validation_alias=AliasChoices("per_device_eval_batch_size", "eval_batch_size")
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_length: int = Field(1024, ge=8, le=1_048_576, validation_alias=AliasChoices("max_length", "max_seq_length"))
    lr_scheduler_type: LrScheduler = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str | None = Field(
        None,
        description="A transformers optimizer name (adamw_torch_fused, paged_adamw_8bit, ...); "
        "default: transformers' own (fused AdamW).",
    )

    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (GPU only).")
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps; a re-run task resumes from the last.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (needs dataset.eval_ratio); default: once at the end."
    )
    merge_adapter: bool = Field(False, description="Also save the base model merged with the adapter.")
    report_to: list[Tracker] = Field(
        default_factory=lambda: [Tracker.NONE],
        description="Experiment trackers the trainer logs to, as TRL's report_to: tensorboard (event files in "
        "the task's artifacts), mlflow, wandb (configured by their own environment variables on the worker), "
        "or none.",
    )
    trl_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further fields of the TRL config class (SFTConfig, DPOConfig...), passed as given.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        # TRL takes a single name too; so does MLOC.
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: list[Tracker]) -> list[Tracker]:
        if Tracker.NONE in value and len(value) > 1:
            others = ", ".join(tracker.value for tracker in value if tracker != Tracker.NONE)
            raise ValueError(f"'none' cannot be combined with other trackers; give [{others}] or [none]")
        if len(set(value)) != len(value):
            raise ValueError("a tracker is named twice; name each once")
        return value or [Tracker.NONE]


class SFTHyperparameters(TrainHyperparameters):
    packing: bool = Field(False, description="Pack several short examples into each max_length sequence.")
    completion_only_loss: bool | None = Field(
        None, description="Loss on the completion only (default for prompt/completion data)."
    )
    assistant_only_loss: bool = Field(False, description="Loss on assistant turns only (chat data).")


class SFTSpec(SpecBase):
    kind: ClassVar[str] = "SFTTask"
    task_type: Literal["sft"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: SFTHyperparameters = Field(default_factory=lambda: SFTHyperparameters.model_validate({}))


DPOLoss = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"]


class DPOHyperparameters(TrainHyperparameters):
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty against the reference model.")
    loss_type: DPOLoss = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class DPOSpec(SpecBase):
    kind: ClassVar[str] = "DPOTask"
    task_type: Literal["dpo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: DPOHyperparameters = Field(default_factory=lambda: DPOHyperparameters.model_validate({}))


# Built-in GRPO reward functions: name -> (argument required?, what it scores). The implementations
# live in mloc.executors.train.rewards; the names live here so a task is checked when it is submitted.
REWARD_FUNCS: dict[str, tuple[bool | None, str]] = {
    "length": (None, "closeness to N characters (length:N, default 100): 1 at N, falling to -1"),
    "contains": (True, "1 if the completion contains the text after the colon (case-insensitive), else 0"),
    "regex": (True, "1 if the regular expression after the colon matches the completion, else 0"),
    "answer": (None, "1 if the completion contains the example's 'answer' column (or answer:COLUMN), else 0"),
    "json": (False, "1 if the completion parses as JSON, else 0"),
    "distinct": (False, "share of distinct words in the completion, 0..1 (penalises repetition)"),
}


def parse_reward_func(text: str) -> tuple[str, str | None]:
    """Split ``name[:argument]`` and check it against :data:`REWARD_FUNCS`; raises ValueError."""
    name, sep, arg = text.partition(":")
    name = name.strip()
    argument = arg if sep else None
    if name not in REWARD_FUNCS:
        known = ", ".join(f"{key}:ARG" if need else key for key, (need, _) in REWARD_FUNCS.items())
        raise ValueError(f"unknown reward function {text!r}; built-in ones are: {known}")
    needs, _ = REWARD_FUNCS[name]
    if needs is True and not argument:
        raise ValueError(f"reward function {name!r} needs an argument: '{name}:...'")
    if needs is False and argument is not None:
        raise ValueError(f"reward function {name!r} takes no argument; write '{name}'")
    if name == "length" and argument is not None and not (argument.isdigit() and int(argument) > 0):
        raise ValueError(f"'length:N' needs a positive whole number of characters; got {argument!r}")
    if name == "regex" and argument is not None:
        try:
            re.compile(argument)
        except re.error as exc:
            raise ValueError(f"reward function {text!r}: invalid regular expression ({exc})") from exc
    return name, argument


class GRPOHyperparameters(TrainHyperparameters):
    reward_funcs: list[str] = Field(
        default_factory=list,
        description="Built-in reward functions: " + "; ".join(f"{k}: {v[1]}" for k, v in REWARD_FUNCS.items()),
    )
    reward_model: str | None = Field(
        None, description="A sequence-classification model: local folder, cached hub id or packaged model name."
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (functions, then model).")
    num_generations: int = Field(4, ge=2, le=256, description="Completions sampled per prompt.")
    max_completion_length: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference model (0: no reference).")

    @field_validator("reward_funcs")
    @classmethod
    def _known_rewards(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_reward_func(item)
        return value

    @model_validator(mode="after")
    def _has_reward(self) -> GRPOHyperparameters:
        if not self.reward_funcs and not self.reward_model:
            raise ValueError("GRPO needs a reward: set 'reward_funcs' or 'reward_model'")
        rewards = len(self.reward_funcs) + (1 if self.reward_model else 0)
        if self.reward_weights is not None and len(self.reward_weights) != rewards:
            raise ValueError(f"'reward_weights' has {len(self.reward_weights)} weights for {rewards} rewards")
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps ({batch}) must be a multiple of num_generations "
                f"({self.num_generations}): each prompt's completions are compared within one batch"
            )
        return self


class GRPOSpec(SpecBase):
    kind: ClassVar[str] = "GRPOTask"
    task_type: Literal["grpo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: GRPOHyperparameters


class PPOHyperparameters(TrainHyperparameters):
    reward_model: str = Field(
        ..., description="A sequence-classification model: local folder, cached hub id or packaged model name."
    )
    value_model: str | None = Field(None, description="Initial value model; defaults to the reward model.")
    ppo_epochs: int = Field(4, ge=1, le=100, description="Optimisation epochs over each rollout batch.")
    target_kl: float | None = Field(
        None,
        gt=0,
        description="Adaptive KL control: kl_coef is adjusted after each update so the policy's KL from the "
        "reference tracks this value (nats per sequence). Unset: kl_coef stays fixed.",
    )
    kl_horizon: int = Field(10_000, ge=1, description="Episodes over which the adaptive KL controller acts.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (the initial one with target_kl).")
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, gt=0, le=1)
    whiten_rewards: bool = False
    num_mini_batches: int = Field(1, ge=1)
    response_length: int = Field(53, ge=1, description="Tokens generated per rollout.")
    temperature: float = Field(0.7, gt=0)
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of a response without EOS."
    )
    total_episodes: int | None = Field(None, ge=1, description="Prompts to roll out in all; default: epochs x dataset.")

    @model_validator(mode="after")
    def _mini_batches(self) -> PPOHyperparameters:
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_mini_batches:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps ({batch}) must be a multiple of num_mini_batches "
                f"({self.num_mini_batches})"
            )
        return self


class PPOSpec(SpecBase):
    kind: ClassVar[str] = "PPOTask"
    task_type: Literal["ppo"] = Field(..., alias="taskType")
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: PPOHyperparameters
