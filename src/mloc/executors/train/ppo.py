"""``ppo``: RLHF with Proximal Policy Optimization, on TRL's PPOTrainer.

PPO here is the real algorithm: a policy (the task's model, with or without an adapter), a value model,
a reward model scoring each rollout, and a KL penalty against a frozen reference policy (the base model;
with an adapter, the base with the adapter switched off), optimised for ``ppo_epochs`` per rollout batch.

TRL dropped PPOTrainer after 1.12 (it lives in ``trl.experimental.ppo`` up to 1.12.0), and trl 1.12 cannot
share an environment with vLLM 0.32. So PPO runs in its own environment with trl==1.12.0, made by
``scripts/setup_ppo_env.sh``, and the worker starts this executor there
(``MLOC_EXECUTOR_PYTHON=ppo=<repo>/.venv-ppo/bin/python``). :meth:`PPOExecutor.missing_requirements`
reports whether the current interpreter can run PPO.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloc import checkpoints
from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.train.runner import TrainExecutor, TrainingRun
from mloc.spec.train import DatasetFormat, PPOSpec

if TYPE_CHECKING:
    from mloc.executors.train.callbacks import MlocCallback

# Same name as in callbacks.py, which cannot be imported here without importing transformers.
PPO_STATE_FILE = "mloc_ppo_state.json"
PPO_REQUIREMENT = "trl<=1.12.0 with trl.experimental.ppo (run scripts/setup_ppo_env.sh; MLOC_EXECUTOR_PYTHON=ppo=...)"
VALUE_MODEL_DIR = "value_model"
VALUE_CONFIG = f"{VALUE_MODEL_DIR}/config.json"


def ppo_trainer_available() -> bool:
    """Whether the installed trl ships PPOTrainer, checked on disk so that trl is not imported."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(root) / "experimental" / "ppo" / "ppo_trainer.py").is_file() for root in spec.submodule_search_locations
    )


class PPOExecutor(TrainExecutor):
    name = "ppo"
    task_types = ("ppo",)
    spec_type = PPOSpec
    formats = (DatasetFormat.PROMPT,)

    @classmethod
    def missing_requirements(cls) -> list[str]:
        missing = super().missing_requirements()
        if "trl" not in missing and not ppo_trainer_available():
            missing.append(PPO_REQUIREMENT)
        return missing

    @staticmethod
    def _spec(run: TrainingRun) -> PPOSpec:
        assert isinstance(run.spec, PPOSpec)
        return run.spec

    def config_class(self) -> type[Any]:
        # The experimental-API warning says nothing a task's owner can act on.
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.ppo import PPOConfig
        except ImportError as exc:
            raise ExecutionError(f"this worker's trl has no PPOTrainer ({exc}); PPO needs {PPO_REQUIREMENT}") from exc
        return PPOConfig

    def _batch(self, run: TrainingRun) -> int:
        hp = self._spec(run).hyperparameters
        return hp.per_device_train_batch_size * hp.gradient_accumulation_steps

    def preflight(self, run: TrainingRun) -> None:
        from mloc.executors.train import models

        hp = self._spec(run).hyperparameters
        if len(run.data.train) < self._batch(run):
            raise ExecutionError(
                f"{run.data.source} has {len(run.data.train)} prompts, fewer than one rollout batch "
                f"(batch_size x gradient_accumulation_steps = {self._batch(run)}); add prompts or lower "
                "batch_size"
            )
        reward_dir = models.resolve_named_model(hp.reward_model, run.ctx.models_dir, "reward_model")
        models.load_config(reward_dir, f"reward model {hp.reward_model!r}")
        value_dir = reward_dir
        if hp.value_model:
            value_dir = models.resolve_named_model(hp.value_model, run.ctx.models_dir, "value_model")
            models.load_config(value_dir, f"value model {hp.value_model!r}")
        # TRL's PPO feeds the policy's token ids straight to the reward and value models.
        for field, path in (("reward_model", reward_dir), ("value_model", value_dir)):
            if models.load_tokenizer(path).get_vocab() != run.tokenizer.get_vocab():
                raise ExecutionError(
                    f"hyperparameters.{field} at {path} uses a different tokenizer than the policy "
                    f"{run.spec.model.source.identifier!r}; PPO scores the policy's token ids directly, so "
                    "pick a reward/value model trained on the policy's tokenizer"
                )
        run.extras.update(reward_model_dir=reward_dir, value_model_dir=value_dir)

        total_episodes = hp.total_episodes
        if total_episodes is None and hp.max_steps is not None:
            total_episodes = hp.max_steps * self._batch(run)
        if total_episodes is None:
            total_episodes = int(hp.num_train_epochs * len(run.data.train))
        total_updates = max(1, math.ceil(total_episodes / self._batch(run)))
        run.extras.update(total_updates=total_updates, done_updates=0)
        # Resume state: the generic checkpoint finder knows nothing of the value model, so look again.
        run.resume_from = None
        if run.ctx.attempt > 1:
            # The newest checkpoint with its policy, value model and state all written.
            needs = (checkpoints.TRAINER_STATE, VALUE_CONFIG)
            found = checkpoints.newest(run.ctx.checkpoint_dir, needs=needs)
            run.passed_over = checkpoints.passed_over(run.ctx.checkpoint_dir, found[0] if found else None, needs=needs)
            if found is not None:
                done, run.resume_from = found
                run.extras["done_updates"] = min(done, total_updates)
                state_file = run.resume_from / PPO_STATE_FILE
                if state_file.is_file():
                    run.extras["kl_coef"] = float(json.loads(state_file.read_text(encoding="utf-8"))["kl_coef"])

    def config_kwargs(self, run: TrainingRun) -> dict[str, Any]:
        hp = self._spec(run).hyperparameters
        total, done = run.extras["total_updates"], run.extras["done_updates"]
        remaining = total - done
        learning_rate = hp.learning_rate
        if done and hp.lr_scheduler_type == "linear":
            # A fresh linear schedule over the remaining updates, started where the old one had got to,
            # follows the original schedule exactly.
            learning_rate = hp.learning_rate * remaining / total
        return {
            "learning_rate": learning_rate,
            "max_steps": -1,
            # A retry whose checkpoint is already the last update trains nothing (see train), but TRL
            # needs a positive count to build its schedule.
            "total_episodes": max(remaining, 1) * self._batch(run),
            "num_ppo_epochs": hp.ppo_epochs,
            "kl_coef": run.extras.get("kl_coef", hp.kl_coef),
            "kl_estimator": hp.kl_estimator,
            "cliprange": hp.cliprange,
            "cliprange_value": hp.cliprange_value,
            "vf_coef": hp.vf_coef,
            "gamma": hp.gamma,
            "lam": hp.lam,
            "whiten_rewards": hp.whiten_rewards,
            "num_mini_batches": hp.num_mini_batches,
            "response_length": hp.response_length,
            "temperature": hp.temperature,
            "missing_eos_penalty": hp.missing_eos_penalty,
            "stop_token": "eos",
            "local_rollout_forward_batch_size": hp.per_device_train_batch_size,
            # Sample generations go to stdout tables; MLOC reports metrics instead.
            "num_sample_generations": 0,
            "eval_strategy": "no",
            "eval_steps": None,
            "dataset_num_proc": None,
        }

    def make_callback(self, run: TrainingRun) -> MlocCallback:
        from mloc.executors.train.callbacks import PPOCallback

        hp = self._spec(run).hyperparameters
        return PPOCallback(
            run.ctx,
            resume_step=run.extras["done_updates"],
            total_updates=run.extras["total_updates"],
            target_kl=hp.target_kl,
            kl_horizon=hp.kl_horizon,
        )

    def load_policy(self, run: TrainingRun) -> Any:
        model = super().load_policy(run)
        # Batched generation needs the prompts padded on the left.
        run.tokenizer.padding_side = "left"
        if run.resume_from is None:
            return model
        if run.peft_config is not None:
            from peft import PeftModel

            run.extras["resumed_peft"] = True
            return PeftModel.from_pretrained(model, run.resume_from, is_trainable=True)
        from mloc.executors.train import models

        # Full fine-tuning: the checkpoint holds the whole policy; the reference stays the base model.
        run.extras["reference"] = model
        return models.load_causal_lm(run.resume_from, run.device)

    def _prompts(self, run: TrainingRun, records: list[dict[str, Any]]) -> Any:
        from datasets import Dataset

        hp = self._spec(run).hyperparameters
        limit = max(8, hp.max_length - hp.response_length)
        rows = []
        for record in records:
            prompt = record["prompt"]
            if isinstance(prompt, list):
                ids = run.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = run.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            # Keep the end of a long prompt: that is what the response continues.
            rows.append({"input_ids": list(ids)[-limit:]})
        run.extras.setdefault("prompt_tokens", []).extend(len(row["input_ids"]) for row in rows)
        return Dataset.from_list(rows)

    def build_trainer(self, run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> Any:
        from trl.experimental.ppo import PPOTrainer

        from mloc.executors.train import models

        reward = models.load_score_model(run.extras["reward_model_dir"], run.device, "reward model")
        value_dir = run.extras["value_model_dir"]
        if run.resume_from is not None:
            value_dir = run.resume_from / VALUE_MODEL_DIR
        value = models.load_score_model(value_dir, run.device, "value model")
        reference = run.extras.get("reference")
        if reference is None and run.peft_config is None:
            reference = models.load_causal_lm(run.model_dir, run.device)
        train = self._prompts(run, run.data.train)
        evaluation = self._prompts(run, run.data.eval) if run.data.eval else train
        trainer = PPOTrainer(
            args=args,
            processing_class=run.tokenizer,
            model=model,
            ref_model=reference,
            reward_model=reward,
            train_dataset=train,
            value_model=value,
            eval_dataset=evaluation,
            callbacks=[callback],
            peft_config=None if run.extras.get("resumed_peft") else run.peft_config,
        )
        # trl 1.12's PPOTrainer skips Trainer.__init__, and transformers >= 5.17 reads this attribute when
        # saving; its value for a model that was not loaded with a distributed plan is False.
        if not hasattr(trainer, "is_distributed_loading_by_transformers"):
            trainer.is_distributed_loading_by_transformers = False
        if run.resume_from is not None:
            self._restore_optimizer(run, trainer)
        return trainer

    def _restore_optimizer(self, run: TrainingRun, trainer: Any) -> None:
        import torch

        state_file = run.resume_from / "optimizer.pt" if run.resume_from else None
        if state_file is None or not state_file.is_file():
            return
        try:
            trainer.optimizer.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        except (RuntimeError, ValueError, KeyError) as exc:
            # The optimizer's moments are an optimisation, not the model: go on with fresh ones.
            run.ctx.log(f"the optimizer state in {state_file} does not fit ({exc}); starting it afresh", "WARNING")

    def train(self, run: TrainingRun, trainer: Any, callback: MlocCallback) -> None:
        from mloc.executors.train.callbacks import CancelledTraining

        done = run.extras["done_updates"]
        if done >= run.extras["total_updates"]:
            callback.start_step = callback.last_step = done
            return
        try:
            trainer.train()
        except CancelledTraining as exc:
            raise TaskCancelled(f"PPO was cancelled at update {callback.last_step}; its checkpoint is kept") from exc

    def samples_per_step(self, run: TrainingRun, trainer: Any) -> int:
        return int(trainer.args.batch_size)

    def tokens_trained(self, run: TrainingRun, trainer: Any, callback: MlocCallback) -> int:
        # TRL does not count PPO's tokens: each rollout is a prompt (of the dataset's mean length) plus at
        # most response_length generated tokens.
        lengths = run.extras.get("prompt_tokens") or [0]
        episodes = (callback.last_step - callback.start_step) * int(trainer.args.batch_size)
        return int(episodes * (sum(lengths) / len(lengths) + trainer.args.response_length))

    def result_extras(self, run: TrainingRun, trainer: Any) -> dict[str, Any]:
        hp = self._spec(run).hyperparameters
        return {
            "reward_model": hp.reward_model,
            "value_model": hp.value_model or hp.reward_model,
            "updates": run.extras["total_updates"],
            "kl_coef_final": float(trainer.args.kl_coef),
            "trl_version": _trl_version(),
        }


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")
