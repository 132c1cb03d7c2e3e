"""``sft``: supervised fine-tuning with TRL's SFTTrainer, with a LoRA/QLoRA adapter or in full."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mloc.errors import ExecutionError
from mloc.executors.train.runner import TrainExecutor, TrainingRun
from mloc.spec.train import DatasetFormat, SFTSpec

if TYPE_CHECKING:
    from mloc.executors.train.callbacks import MlocCallback


class SFTExecutor(TrainExecutor):
    name = "sft"
    task_types = ("sft",)
    spec_type = SFTSpec
    formats = (DatasetFormat.PROMPT_COMPLETION, DatasetFormat.MESSAGES, DatasetFormat.TEXT)

    def config_class(self) -> type[Any]:
        from trl import SFTConfig

        return SFTConfig

    def config_kwargs(self, run: TrainingRun) -> dict[str, Any]:
        spec = run.spec
        assert isinstance(spec, SFTSpec)
        hp = spec.hyperparameters
        return {
            "max_length": hp.max_length,
            "packing": hp.packing,
            "completion_only_loss": hp.completion_only_loss,
            "assistant_only_loss": hp.assistant_only_loss,
            "dataset_num_proc": None,
        }

    def build_trainer(self, run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> Any:
        from trl import SFTTrainer

        try:
            return SFTTrainer(**self.trainer_inputs(run, model, args, callback))
        except ValueError as exc:
            if "assistant_only_loss" not in str(exc) and "generation" not in str(exc):
                raise
            # TRL can only find the assistant's turns through {% generation %} markers in the chat template.
            raise ExecutionError(
                "hyperparameters.assistant_only_loss needs a chat template that marks the assistant's turns with "
                "{% generation %} ... {% endgeneration %}, and this model's does not; set assistant_only_loss: "
                f"false (the loss then covers every turn), or train a model whose template has them ({exc})"
            ) from None
