"""What every training executor does around its TRL trainer.

The order matters: everything that can be checked cheaply (the spec, the dataset, the model's config,
the adapter's target modules, reward models, the TRL config) is checked before any weights are loaded,
so bad input fails a task in seconds rather than after a long load. Then the model is loaded, the
trainer built by the subclass, and training resumes from the task's last checkpoint when the task is on
a later attempt. This module imports no heavy library at the top; ``run`` imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mloc import checkpoints
from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.base import Executor, RunContext
from mloc.executors.train.datasets import LoadedData, Record, load_data
from mloc.llm.modelsource import resolve_model
from mloc.spec.base import AdapterType
from mloc.spec.train import DatasetFormat, DPOSpec, GRPOSpec, PPOSpec, SFTSpec, Tracker, TrainHyperparameters

if TYPE_CHECKING:
    from mloc.executors.train.callbacks import MlocCallback
    from mloc.executors.train.models import Device

TrainSpec = SFTSpec | DPOSpec | GRPOSpec | PPOSpec
TENSORBOARD_DIR = "tensorboard"
# What each tracker needs installed in the executor's environment: (any of these modules, the install).
TRACKER_MODULES: dict[Tracker, tuple[tuple[str, ...], str]] = {
    Tracker.TENSORBOARD: (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    Tracker.MLFLOW: (("mlflow",), "pip install mlflow"),
    Tracker.WANDB: (("wandb",), "pip install wandb"),
}


def check_trackers(hp: TrainHyperparameters) -> None:
    """Refuse a tracker whose library this environment lacks, before any weights are loaded."""
    for tracker in hp.report_to:
        if tracker == Tracker.NONE:
            continue
        modules, install = TRACKER_MODULES[tracker]
        if not any(importlib.util.find_spec(module) for module in modules):
            raise ExecutionError(
                f"hyperparameters.report_to names {tracker.value}, which is not installed where this worker runs "
                f"training; install it there ({install}) or remove {tracker.value} from report_to"
            )


@contextlib.contextmanager
def tensorboard_dir(folder: Path | None) -> Iterator[None]:
    """Point the trainer's TensorBoard writer at ``folder`` while the trainer is built.

    transformers 5 has no logging_dir field: its TensorBoard callback reads TENSORBOARD_LOGGING_DIR when
    the trainer creates it. The executor process runs later tasks too, so the variable is put back."""
    if folder is None:
        yield
        return
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before


def replace_dir(tmp: Path, target: Path) -> Path:
    """Move a freshly written folder into place, replacing what an earlier attempt left there."""
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


@dataclass
class TrainingRun:
    """One task's resolved inputs, shared by the common steps and the executor's own."""

    ctx: RunContext
    spec: TrainSpec
    data: LoadedData
    model_dir: Path
    device: Device
    tokenizer: Any
    model_config: Any
    peft_config: Any | None
    resume_from: Path | None
    passed_over: list[str] = field(default_factory=list)  # why newer checkpoints are not resumed from
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def hp(self) -> TrainHyperparameters:
        return self.spec.hyperparameters

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where TensorBoard event files go, inside the task's out folder; None when not asked for."""
        return self.ctx.out_dir / TENSORBOARD_DIR if Tracker.TENSORBOARD in self.hp.report_to else None

    @property
    def quantized(self) -> bool:
        adapter = self.spec.model.adapter
        return adapter is not None and adapter.type == AdapterType.QLORA


class TrainExecutor(Executor):
    """Base of the TRL executors: subclasses name their spec, data formats and build the trainer."""

    requires = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
    spec_type: ClassVar[type[TrainSpec]]
    formats: ClassVar[tuple[DatasetFormat, ...]]

    # --- hooks -------------------------------------------------------------------------------------

    @abstractmethod
    def config_class(self) -> type[Any]:
        """The TRL config dataclass (SFTConfig, DPOConfig, ...)."""

    def config_kwargs(self, run: TrainingRun) -> dict[str, Any]:
        """Task-type fields of the TRL config, on top of :meth:`common_config`."""
        return {}

    def preflight(self, run: TrainingRun) -> None:
        """Task-type checks that need the tokenizer or config but no weights (reward models...)."""

    @abstractmethod
    def build_trainer(self, run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> Any:
        """The TRL trainer for this run."""

    @staticmethod
    def trainer_inputs(run: TrainingRun, model: Any, args: Any, callback: MlocCallback) -> dict[str, Any]:
        """What every TRL trainer takes: model, config, datasets, tokenizer, LoRA and the callback."""
        from datasets import Dataset

        return {
            "model": model,
            "args": args,
            "train_dataset": Dataset.from_list(run.data.train),
            "eval_dataset": Dataset.from_list(run.data.eval) if run.data.eval else None,
            "processing_class": run.tokenizer,
            "peft_config": run.peft_config,
            "callbacks": [callback],
        }

    def make_callback(self, run: TrainingRun) -> MlocCallback:
        from mloc.executors.train.callbacks import MlocCallback

        return MlocCallback(run.ctx)

    def train(self, run: TrainingRun, trainer: Any, callback: MlocCallback) -> None:
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)

    def tokens_trained(self, run: TrainingRun, trainer: Any, callback: MlocCallback) -> int:
        # TRL's SFT and DPO trainers count the non-padding tokens they train on in this attempt; others
        # count through transformers' num_input_tokens_seen, which a resumed run restores, so subtract.
        counted = getattr(trainer, "_total_train_tokens", None)
        if isinstance(counted, int | float) and counted > 0:
            return int(counted)
        seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
        return max(0, seen - callback.tokens_at_start)

    def samples_per_step(self, run: TrainingRun, trainer: Any) -> int:
        args = trainer.args
        return int(args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size))

    def result_extras(self, run: TrainingRun, trainer: Any) -> dict[str, Any]:
        return {}

    # --- the common flow ---------------------------------------------------------------------------

    def run(self, ctx: RunContext) -> dict[str, Any]:
        try:
            return self._run(ctx)
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
                raise ExecutionError(
                    f"training ran out of GPU memory ({exc}); lower batch_size or max_length, raise "
                    "gradient_accumulation_steps, set gradient_checkpointing: true, or use a qlora adapter"
                ) from exc
            raise
        finally:
            # The executor process outlives the task: hand the model's memory back before the next one.
            _free_memory()

    def _run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        if not isinstance(spec, self.spec_type):
            raise ExecutionError(
                f"{type(self).__name__} runs {self.spec_type.__name__} tasks, got {type(spec).__name__}"
            )
        started = time.perf_counter()
        adapter = spec.model.adapter
        if adapter is not None and adapter.path:
            raise ExecutionError(
                "model.adapter.path loads an existing adapter at inference; a training task creates a new "
                "one. To build on a trained adapter, train with merge_adapter: true and use the merged model "
                "as model.source"
            )
        ctx.progress(0, None, "reading the dataset")
        data = load_data(spec.dataset, self.formats, seed=spec.hyperparameters.seed)
        held = f", {len(data.eval)} held out for evaluation" if data.eval else ""
        ctx.log(f"dataset {data.source}: {len(data.train)} {data.format.value} examples{held}")
        model_dir = resolve_model(
            spec.model.source,
            ctx.models_dir,
            on_progress=ctx.progress,
            check_cancelled=ctx.check_cancelled,
            on_log=ctx.log,
        )
        ctx.check_cancelled()

        run = self._prepare(ctx, spec, data, model_dir)
        ctx.check_cancelled()
        args = self._trl_config(run)
        ctx.check_cancelled()

        ctx.progress(0, None, "loading the model")
        callback: MlocCallback | None = None
        try:
            model = self.load_policy(run)
            callback = self.make_callback(run)
            with tensorboard_dir(run.tensorboard_dir):
                trainer = self.build_trainer(run, model, args, callback)
            _drop_console_printer(trainer)
            ctx.check_cancelled()
            for line in run.passed_over:
                ctx.log(f"run {ctx.attempt}: {line}")
            if run.resume_from is not None:
                ctx.log(f"run {ctx.attempt}: resuming from {run.resume_from.name}")
            ctx.log(f"training on {run.device.label}")
            self.train(run, trainer, callback)
        except Exception as exc:
            began = callback is not None and callback.began
            if isinstance(exc, TaskCancelled) and callback is not None and began:
                self._count_trained(run, trainer, callback)  # a cancelled run's steps are its owner's usage too
            if run.resume_from is None or began or isinstance(exc, TaskCancelled | ExecutionError):
                raise
            if type(exc).__name__ == "OutOfMemoryError":
                raise
            raise _unreadable_checkpoint(run.resume_from, exc) from exc
        if callback.cancelled or ctx.cancelled:
            self._count_trained(run, trainer, callback)
            raise TaskCancelled(f"training was cancelled at step {callback.last_step}; its checkpoint is kept")
        return self._finish(run, trainer, callback, started)

    def _prepare(self, ctx: RunContext, spec: TrainSpec, data: LoadedData, model_dir: Path) -> TrainingRun:
        from mloc.executors.train import adapters, models

        _quiet_progress_bars()

        device = models.detect_device()
        adapter = spec.model.adapter
        adapters.check_adapter_type(adapter)
        check_trackers(spec.hyperparameters)
        if adapter is not None and adapter.type == AdapterType.QLORA:
            adapters.check_qlora_available()
        tokenizer = models.load_tokenizer(model_dir)
        config = models.load_config(model_dir, f"model {spec.model.source.identifier!r}")
        chat = data.format == DatasetFormat.MESSAGES or _has_conversations(data.train)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ExecutionError(
                f"{data.source} holds chat messages but the tokenizer of {spec.model.source.identifier!r} "
                "has no chat template; use prompt/completion or text data, or a model with a chat template"
            )
        peft_config = None
        if adapter is not None:
            peft_config = adapters.lora_config(adapter, config, models.linear_module_names(config))
        found = checkpoints.newest(ctx.checkpoint_dir) if ctx.attempt > 1 else None
        resume = found[1] if found else None
        passed_over = (
            checkpoints.passed_over(ctx.checkpoint_dir, found[0] if found else None) if ctx.attempt > 1 else []
        )
        run = TrainingRun(
            ctx=ctx,
            spec=spec,
            data=data,
            model_dir=model_dir,
            device=device,
            tokenizer=tokenizer,
            model_config=config,
            peft_config=peft_config,
            resume_from=resume,
            passed_over=passed_over,
        )
        self.preflight(run)
        return run

    def common_config(self, run: TrainingRun) -> dict[str, Any]:
        hp = run.hp
        evaluate_periodically = run.data.eval is not None and hp.eval_steps is not None
        return {
            "output_dir": str(run.ctx.checkpoint_dir),
            "num_train_epochs": hp.num_train_epochs,
            "max_steps": hp.max_steps or -1,
            "learning_rate": hp.learning_rate,
            "per_device_train_batch_size": hp.per_device_train_batch_size,
            "per_device_eval_batch_size": hp.per_device_eval_batch_size or hp.per_device_train_batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps,
            "lr_scheduler_type": hp.lr_scheduler_type,
            # transformers 5 reads a warmup_steps below 1 as a share of all steps.
            "warmup_steps": hp.warmup_steps or hp.warmup_ratio,
            "weight_decay": hp.weight_decay,
            "max_grad_norm": hp.max_grad_norm,
            # Gradient checkpointing on CPU only costs time; it saves GPU memory.
            "gradient_checkpointing": hp.gradient_checkpointing and run.device.cuda,
            "seed": hp.seed,
            "data_seed": hp.seed,
            "logging_steps": hp.logging_steps,
            "logging_first_step": True,
            "save_strategy": "steps",
            "save_steps": hp.save_steps,
            "save_total_limit": hp.save_total_limit,
            "eval_strategy": "steps" if evaluate_periodically else "no",
            "eval_steps": hp.eval_steps if evaluate_periodically else None,
            "use_cpu": not run.device.cuda,
            "bf16": run.device.bf16,
            "fp16": False,
            # The trackers' own integrations in transformers do the reporting; each reads its settings
            # (MLFLOW_TRACKING_URI, WANDB_PROJECT...) from the worker's environment.
            "report_to": [tracker.value for tracker in hp.report_to],
            "disable_tqdm": True,
        } | ({"optim": hp.optim} if hp.optim else {})

    def _trl_config(self, run: TrainingRun) -> Any:
        cls = self.config_class()
        kwargs = {**self.common_config(run), **self.config_kwargs(run)}
        names = {item.name for item in dataclasses.fields(cls)}
        if run.tensorboard_dir is not None and "logging_dir" in names:
            kwargs["logging_dir"] = str(run.tensorboard_dir)  # transformers 4's way to place the event files
        unknown = sorted(set(run.hp.trl_args) - names)
        if unknown:
            raise ExecutionError(
                f"hyperparameters.trl_args: {unknown} are not fields of {cls.__name__}; see the TRL "
                "documentation for the fields this version accepts"
            )
        kwargs.update(run.hp.trl_args)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ExecutionError(f"the training settings were refused by {cls.__name__}: {exc}") from exc

    def load_policy(self, run: TrainingRun) -> Any:
        from mloc.executors.train import adapters, models

        quantization = adapters.quantization_config(run.device) if run.quantized else None
        model = models.load_causal_lm(run.model_dir, run.device, quantization)
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            # A bitsandbytes without 4-bit support for this device could hand back a full-precision
            # model; QLoRA then is not QLoRA, so say so instead of training something else.
            layers = adapters.linear4bit_layers(model)
            if not layers:
                raise ExecutionError(
                    f"model.adapter.type 'qlora' asked for a 4-bit base model, but bitsandbytes loaded "
                    f"{run.model_dir} without 4-bit layers on {run.device.label}; update bitsandbytes "
                    "(pip install -U bitsandbytes) or use adapter type 'lora'"
                )
            run.extras["quantization"] = {
                "method": "bitsandbytes",
                "quant_type": quantization.bnb_4bit_quant_type,
                "bits": 4,
                "linear4bit_layers": layers,
            }
            run.ctx.log(f"base model loaded in 4 bits (NF4) on {run.device.label}: {layers} Linear4bit layers")

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=run.hp.gradient_checkpointing and run.device.cuda
            )
        if run.tokenizer.pad_token_id is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = run.tokenizer.pad_token_id
        return model

    # --- results -----------------------------------------------------------------------------------

    def _save_outputs(self, run: TrainingRun, trainer: Any) -> dict[str, str]:
        ctx, spec = run.ctx, run.spec
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        saved: dict[str, str] = {}
        base = spec.model.source.identifier
        if run.peft_config is not None:
            assert spec.model.adapter is not None
            tmp = out / ".adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.save_model(str(tmp))
            run.tokenizer.save_pretrained(tmp)
            adapter_dir = replace_dir(tmp, out / "adapter")
            saved["adapter"] = str(adapter_dir)
            ctx.artifact(
                "adapter",
                adapter_dir,
                kind="lora",
                base_model=base,
                base_model_path=str(run.model_dir),
                adapter_type=spec.model.adapter.type.value,
                r=spec.model.adapter.r,
                task_type=spec.task_type,
            )
            if run.hp.merge_adapter:
                merged = self._merge(run, adapter_dir)
                saved["merged_model"] = str(merged)
                ctx.artifact("merged_model", merged, kind="model", base_model=base, task_type=spec.task_type)
        else:
            tmp = out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.save_model(str(tmp))
            run.tokenizer.save_pretrained(tmp)
            model_dir = replace_dir(tmp, out / "model")
            saved["model"] = str(model_dir)
            ctx.artifact("model", model_dir, kind="model", base_model=base, task_type=spec.task_type)
        return saved

    def _merge(self, run: TrainingRun, adapter_dir: Path) -> Path:
        """Fold the adapter into a full-precision copy of the base model (a quantized base cannot be merged
        into losslessly, so the base is loaded again unquantized)."""
        from peft import PeftModel

        from mloc.executors.train import models

        run.ctx.progress(0, None, "merging the adapter into the base model")
        base = models.load_causal_lm(run.model_dir, run.device)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        tmp = run.ctx.out_dir / ".merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        return replace_dir(tmp, run.ctx.out_dir / "merged")

    def _count_trained(self, run: TrainingRun, trainer: Any, callback: MlocCallback) -> tuple[int, int, int]:
        """Report the steps, samples and tokens this run trained as the task's usage; returns them."""
        steps = max(0, callback.last_step - callback.start_step)
        samples = steps * self.samples_per_step(run, trainer)
        tokens = self.tokens_trained(run, trainer, callback)
        run.ctx.add_usage(train_samples=samples, train_tokens=tokens, train_steps=steps)
        return steps, samples, tokens

    def _finish(self, run: TrainingRun, trainer: Any, callback: MlocCallback, started: float) -> dict[str, Any]:
        ctx, spec = run.ctx, run.spec
        final = dict(callback.last_metrics)
        if run.data.eval is not None and spec.task_type != "ppo":
            ctx.progress(callback.last_step, callback.total_steps, "evaluating")
            evaluated = {
                key: float(value)
                for key, value in trainer.evaluate().items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            ctx.metrics(callback.last_step, **evaluated)
            final.update(evaluated)
        final.update(callback.summary)
        saved = self._save_outputs(run, trainer)
        logs = run.tensorboard_dir
        if logs is not None and logs.is_dir():
            saved["tensorboard"] = str(logs)
            ctx.artifact("tensorboard", logs, kind="tensorboard", task_type=spec.task_type)
        steps, samples, tokens = self._count_trained(run, trainer, callback)
        runtime = callback.summary.get("train_runtime") or (time.perf_counter() - callback.started)
        result: dict[str, Any] = {
            "ok": True,
            "task_type": spec.task_type,
            "base_model": spec.model.source.identifier,
            "adapter": saved.get("adapter"),
            **{key: value for key, value in saved.items() if key != "adapter"},
            "metrics": final,
            "global_step": callback.last_step,
            "resumed_from_step": callback.start_step if run.resume_from is not None else None,
            "train_runtime": round(runtime, 3),
            "train_samples_per_second": callback.summary.get(
                "train_samples_per_second", round(samples / runtime, 3) if runtime else 0.0
            ),
            "dataset": {
                "source": run.data.source,
                "format": run.data.format.value,
                "train_examples": len(run.data.train),
                "eval_examples": len(run.data.eval or []),
            },
            "device": run.device.label,
            # How the base model was held while training: None in full precision, else the 4-bit layout.
            "quantization": run.extras.get("quantization"),
            **self.result_extras(run, trainer),
            "usage": {
                "train_samples": samples,
                "train_tokens": tokens,
                "train_steps": steps,
                "latency_sec": round(time.perf_counter() - started, 3),
            },
        }
        ctx.progress(callback.last_step, callback.last_step or 1, "done")
        return result


def _has_conversations(records: list[Record]) -> bool:
    first = records[0] if records else {}
    return any(isinstance(value, list) and value and isinstance(value[0], dict) for value in first.values())


def _free_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_progress_bars() -> None:
    # Progress goes to the task through ctx.progress; the libraries' console bars would only fill the
    # executor process's log.
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _drop_console_printer(trainer: Any) -> None:
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _unreadable_checkpoint(checkpoint: Path, exc: Exception) -> ExecutionError:
    """A run that failed while it loaded the checkpoint it continues from, before its first step: the
    checkpoint is damaged (a disk fault, a copy cut short). It is set aside, so the next run continues
    from the one before it rather than failing the same way for ever."""
    aside = checkpoint.with_name(f"{checkpoint.name}.damaged")
    number = 1
    while aside.exists():
        number += 1
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged-{number}")
    try:
        checkpoint.rename(aside)
    except OSError as error:
        return ExecutionError(
            f"could not continue from {checkpoint.name} ({type(exc).__name__}: {exc}), and could not set it "
            f"aside ({error.strerror or error}): delete {checkpoint} and resume the task to continue from the "
            "checkpoint before it"
        )
    # The worker's reason names the checkpoint a resume continues from, when one is left.
    left = "" if checkpoints.newest(checkpoint.parent) else ", and no other checkpoint is kept: a resume starts over"
    return ExecutionError(
        f"could not continue from {checkpoint.name} ({type(exc).__name__}: {exc}); it was set aside as "
        f"{aside.name}{left}"
    )
