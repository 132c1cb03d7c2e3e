"""``dpo``: Direct Preference Optimization with TRL's DPOTrainer on prompt/chosen/rejected data.

With an adapter, the reference model is the base model with the adapter switched off, so only one copy
of the weights is held; in full fine-tuning TRL keeps a frozen copy as the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mloc.executors.train.runner import TrainExecutor, TrainingRun
from mloc.spec.train import DatasetFormat, DPOSpec

if TYPE_CHECKING:
    from mloc.executors.train.callbacks import MlocCallback


class DPOExecutor(TrainExecutor):
    name = "dpo"
    task_types = ("dpo",)
    spec_type = DPOSpec
    formats = (DatasetFormat.PREFERENCE,)

    def config_class(self) -> type[Any]:
        from trl import DPOConfig

        return DPOConfig

    def config_kwargs(self, run: TrainingRun) -> dict[str, Any]:
        spec = run.spec
        assert isinstance(spec, DPOSpec)
        hp = spec.hyperparameters
        return {
            "beta": hp.beta,
            "loss_type": [hp.loss_type],
            "label_smoothing": hp.label_smoothing,
            "max_length": hp.max_length,
        }

    def build_trainer(self, run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> Any:
        from trl import DPOTrainer

        return DPOTrainer(**self.trainer_inputs(run, model, args, callback))
