"""``grpo``: Group Relative Policy Optimization with TRL's GRPOTrainer.

Rewards come from built-in functions (:mod:`mloc.executors.train.rewards`), a reward model, or both.
Completions are generated with transformers inside the trainer (no vLLM), so GRPO runs on any worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.train.runner import TrainExecutor, TrainingRun
from mloc.spec.train import DatasetFormat, GRPOSpec, parse_reward_func

if TYPE_CHECKING:
    from mloc.executors.train.callbacks import MlocCallback


class GRPOExecutor(TrainExecutor):
    name = "grpo"
    task_types = ("grpo",)
    spec_type = GRPOSpec
    formats = (DatasetFormat.PROMPT,)

    @staticmethod
    def _spec(run: TrainingRun) -> GRPOSpec:
        assert isinstance(run.spec, GRPOSpec)
        return run.spec

    def config_class(self) -> type[Any]:
        from trl import GRPOConfig

        return GRPOConfig

    def config_kwargs(self, run: TrainingRun) -> dict[str, Any]:
        hp = self._spec(run).hyperparameters
        return {
            "num_generations": hp.num_generations,
            "max_completion_length": hp.max_completion_length,
            "temperature": hp.temperature,
            "beta": hp.beta,
            "reward_weights": hp.reward_weights,
            "use_vllm": False,
            "log_completions": False,
        }

    def preflight(self, run: TrainingRun) -> None:
        from mloc.executors.train import models

        hp = self._spec(run).hyperparameters
        columns = set(run.data.train[0])
        for text in hp.reward_funcs:
            name, arg = parse_reward_func(text)
            if name == "answer" and (arg or "answer") not in columns:
                raise ExecutionError(
                    f"reward function {text!r} compares completions with the dataset column "
                    f"{arg or 'answer'!r}, which {run.data.source} lacks (it has {sorted(columns)})"
                )
        if hp.reward_model:
            path = models.resolve_named_model(hp.reward_model, run.ctx.models_dir, "reward_model")
            models.load_config(path, f"reward model {hp.reward_model!r}")
            run.extras["reward_model_dir"] = path

    def build_trainer(self, run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> Any:
        from datasets import Dataset
        from trl import GRPOTrainer

        from mloc.executors.train import models, rewards

        hp = self._spec(run).hyperparameters
        funcs: list[Any] = [rewards.build(text) for text in hp.reward_funcs]
        processing: list[Any] = [None] * len(funcs)
        if hp.reward_model:
            path = run.extras["reward_model_dir"]
            funcs.append(models.load_score_model(path, run.device, f"reward model {hp.reward_model!r}"))
            processing.append(models.load_tokenizer(path))
        return GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=Dataset.from_list(run.data.train),
            eval_dataset=Dataset.from_list(run.data.eval) if run.data.eval else None,
            processing_class=run.tokenizer,
            reward_processing_classes=processing if hp.reward_model else None,
            peft_config=run.peft_config,
            callbacks=[callback],
        )
