"""A transformers callback that connects a running trainer to MLOC: progress, metrics and cancel.

This module imports transformers at the top: only the executors' ``run`` imports it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mloc.executors.base import RunContext
from mloc.state import StopReason

# Keys of the trainers' summary logs: they go to the result, not the per-step metrics.
SUMMARY_KEYS = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "total_flos",
)


# The values a step's log line names first; the rest follow in name order.
LINE_FIRST = ("loss", "eval_loss", "reward", "kl", "learning_rate", "grad_norm", "epoch")


def _number(value: float) -> str:
    return f"{value:.4g}" if not float(value).is_integer() or abs(value) >= 1e6 else f"{int(value)}"


class CancelledTraining(Exception):
    """Raised from a callback where the trainer has no stop flag of its own (TRL's PPO loop)."""


def metric_name(key: str) -> str:
    """``objective/kl`` -> ``objective_kl``: metric names stay plain identifiers."""
    return key.replace("/", "_").replace(" ", "_")


class MlocCallback(TrainerCallback):
    """Reports progress and metrics to the task and stops training soon after it is cancelled.

    On cancel it asks the trainer to save a checkpoint at the current step and stop, so a later
    attempt resumes from there.
    """

    def __init__(
        self,
        ctx: RunContext,
        *,
        rename: Callable[[str], str] = metric_name,
        raise_on_cancel: bool = False,
    ) -> None:
        self.ctx = ctx
        self.rename = rename
        self.raise_on_cancel = raise_on_cancel
        self.start_step = 0
        self.last_step = 0
        self.total_steps: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.summary: dict[str, float] = {}
        self.tokens_at_start = 0
        self.cancelled = False
        self.began = False  # the trainer has loaded what it continues from and begun
        self.started = time.perf_counter()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.began = True
        self.start_step = self.last_step = state.global_step
        self.total_steps = state.max_steps or None
        self.tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.started = time.perf_counter()
        self.ctx.progress(state.global_step, self.total_steps, "training", since=self.start_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.last_step = state.global_step
        self.ctx.progress(state.global_step, self.total_steps)
        if self.ctx.cancelled and not self.cancelled:
            self.cancelled = True
            self.ctx.log(
                f"{_stop_heard(self.ctx.stop_reason)} at step {state.global_step}: {_stop_plan(self.ctx.stop_reason)}"
            )
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.cancelled and self.raise_on_cancel:
            raise CancelledTraining(f"cancelled at step {state.global_step}")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        values: dict[str, float] = {}
        summarised = False
        for key, value in (logs or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if key in SUMMARY_KEYS:
                self.summary[key] = float(value)
                summarised = True
            else:
                values[self.rename(key)] = float(value)
        if set(values) - {"epoch"}:
            self.last_metrics.update(values)
            self.ctx.metrics(state.global_step, **values)
            self.ctx.log(self.step_line(state.global_step, values))
        if summarised:
            self.ctx.log(self.summary_line())

    def step_line(self, step: int, values: dict[str, float]) -> str:
        """One line a person reads per logging step: 'step 10/30: loss 2.314, learning_rate 0.0002, ...'
        (an evaluation: 'eval at step 10/30: eval_loss 2.1, ...')."""
        of = f"/{self.total_steps}" if self.total_steps else ""
        evaluation = any(name.startswith("eval_") for name in values)
        first = [name for name in LINE_FIRST if name in values]
        names = first + sorted(name for name in values if name not in first)
        shown = ", ".join(f"{name} {_number(values[name])}" for name in names)
        return f"{'eval at ' if evaluation else ''}step {step}{of}: {shown}"

    def summary_line(self) -> str:
        """The trainer's closing summary: mean loss, time and throughput."""
        names = sorted(self.summary, key=lambda name: name != "train_loss")
        shown = ", ".join(f"{name} {_number(self.summary[name])}" for name in names)
        ended = f"training stopped at step {self.last_step}" if self.cancelled else "training finished"
        return f"{ended}: {shown}"


def _stop_heard(why: StopReason | None) -> str:
    if why == StopReason.SHUTDOWN:
        return "the worker is shutting down"
    if why == StopReason.TIMEOUT:
        return "the time limit (timeout_sec) was reached"
    return "cancel received"


def _stop_plan(why: StopReason | None) -> str:
    if why == StopReason.SHUTDOWN:
        return "saving a checkpoint and stopping; the task goes back to the queue and continues from it"
    return "saving a checkpoint and stopping"


PPO_STATE_FILE = "mloc_ppo_state.json"

# TRL's PPO log keys -> MLOC metric names (the rest are made plain by metric_name).
PPO_METRICS = {
    "objective/kl": "kl",
    "objective/scores": "reward",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/non_score_reward": "non_score_reward",
    "objective/entropy": "entropy",
    "policy/approxkl_avg": "approx_kl",
    "policy/clipfrac_avg": "clipfrac",
    "policy/entropy_avg": "policy_entropy",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "val/clipfrac_avg": "value_clipfrac",
    "val/ratio": "ratio",
    "val/ratio_var": "ratio_var",
    "val/num_eos_tokens": "num_eos_tokens",
    "lr": "learning_rate",
    "eps": "episodes_per_second",
}


class PPOCallback(MlocCallback):
    """MlocCallback for TRL's PPO loop, which has no resume, no stop flag and a fixed KL coefficient.

    - Resume: the loop restarts its step count at 0, so on a resumed run the count is moved on to the
      checkpoint's step (the trainer was built for the remaining updates only).
    - Cancel: the loop ignores should_training_stop but does save when asked; the save hook then raises.
    - Checkpoints: the loop saves only the policy; the value model is saved beside it, for resume.
    - Adaptive KL control (Ziegler et al. 2019): with a target KL, kl_coef is moved after each update
      by a clipped proportional step, kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon;
      the loop reads args.kl_coef afresh for every rollout batch.
    """

    def __init__(
        self,
        ctx: RunContext,
        *,
        resume_step: int = 0,
        total_updates: int | None = None,
        target_kl: float | None = None,
        kl_horizon: int = 10_000,
    ) -> None:
        super().__init__(ctx, rename=lambda key: PPO_METRICS.get(key, metric_name(key)), raise_on_cancel=True)
        self.resume_step = resume_step
        self.total_updates = total_updates
        self.target_kl = target_kl
        self.kl_horizon = kl_horizon

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.resume_step:
            batch = int(getattr(args, "batch_size", 0) or 0)
            state.global_step = self.resume_step
            setattr(state, "episode", self.resume_step * batch)  # noqa: B010 - OnlineTrainerState field
        if self.total_updates:
            state.max_steps = self.total_updates
        super().on_train_begin(args, state, control, **kwargs)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = dict(logs or {})
        kl = logs.get("objective/kl")
        if self.target_kl is not None and isinstance(kl, int | float) and math.isfinite(kl):
            error = min(0.2, max(-0.2, kl / self.target_kl - 1.0))
            batch = int(getattr(args, "batch_size", 1) or 1)
            args.kl_coef = float(args.kl_coef) * (1.0 + error * batch / self.kl_horizon)  # type: ignore[attr-defined]
        if hasattr(args, "kl_coef"):
            logs["kl_coef"] = float(args.kl_coef)
        super().on_log(args, state, control, logs=logs, **kwargs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        wrapper = getattr(model, "module", model)
        value_model = getattr(wrapper, "value_model", None)
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if value_model is not None and checkpoint.is_dir():
            value_model.save_pretrained(checkpoint / "value_model", safe_serialization=True)
            # The adaptive KL coefficient is state too: a resumed run continues from it.
            state_file = checkpoint / PPO_STATE_FILE
            state_file.write_text(json.dumps({"kl_coef": float(getattr(args, "kl_coef", 0.0))}), encoding="utf-8")
        super().on_save(args, state, control, **kwargs)
