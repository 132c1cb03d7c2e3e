"""sft end to end on a tiny real Llama: LoRA, QLoRA, full fine-tuning, checkpoints, resume and cancel."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.train import SFTExecutor
from mloc.executors.train.runner import TrainingRun
from tests.executors.support_train import QA, build_models, make_context, task_yaml, write_jsonl

pytestmark = pytest.mark.extra("train")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("train-models"))


def _logits(model_dir: Path, adapter: Path | None = None) -> object:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(model, adapter) if adapter is not None else model
    batch = tokenizer(QA[0]["prompt"], return_tensors="pt")
    with torch.no_grad():
        return tuned(**batch).logits


def test_sft_lora_lowers_the_loss_and_its_adapter_changes_the_model(models: dict[str, Path], tmp_path: Path) -> None:
    import torch

    data = write_jsonl(tmp_path / "qa.jsonl", QA * 4)
    text = task_yaml(
        "sft",
        models["base"],
        {"path": str(data)},
        {"max_steps": 20, "learning_rate": 5e-3, "logging_steps": 2, "batch_size": 4},
        adapter={"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    )
    ctx, events = make_context(text, tmp_path / "out")
    result = SFTExecutor().run(ctx)

    losses = events.metric("loss")
    assert len(losses) >= 5
    assert losses[-1][1] < losses[0][1] - 0.1, losses
    assert result["ok"] is True and result["task_type"] == "sft" and result["global_step"] == 20
    assert result["base_model"] == str(models["base"])
    assert result["train_samples_per_second"] > 0 and result["train_runtime"] > 0
    adapter = Path(result["adapter"])
    assert adapter == tmp_path / "out" / "adapter" and (adapter / "adapter_config.json").is_file()
    [artifact] = events.of("artifact")
    assert artifact["name"] == "adapter" and artifact["kind"] == "lora" and artifact["path"] == str(adapter)
    usage = events.usage()
    assert usage["train_samples"] == 80 and usage["train_tokens"] > 0
    assert result["usage"]["train_samples"] == 80
    progress = events.of("progress")
    assert progress[-1]["step"] == 20
    assert any(event["total"] == 20 for event in progress)
    # Periodic checkpoints were written where the worker keeps them.
    assert any(path.name.startswith("checkpoint-") for path in ctx.checkpoint_dir.iterdir())

    base, tuned = _logits(models["base"]), _logits(models["base"], adapter)
    assert isinstance(base, torch.Tensor) and isinstance(tuned, torch.Tensor)
    assert not torch.allclose(base, tuned, atol=1e-4)


class PolicyKeepingSFT(SFTExecutor):
    """The real SFT executor, keeping a reference to the policy model it loaded so a test can inspect it."""

    policy: Any = None

    def load_policy(self, run: TrainingRun) -> Any:
        self.policy = super().load_policy(run)
        return self.policy


@pytest.mark.extra("qlora")
def test_qlora_trains_a_4bit_model_and_merges_the_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb
    import torch

    text = task_yaml(
        "sft",
        models["base"],
        {"examples": QA},
        {"max_steps": 3, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2, "merge_adapter": True},
        adapter={"type": "qlora", "r": 4, "lora_alpha": 8},
    )
    ctx, events = make_context(text, tmp_path / "out")
    executor = PolicyKeepingSFT()
    result = executor.run(ctx)

    # The base really is 4-bit, on CUDA and on the CPU alike (bitsandbytes >= 0.48 quantizes on the CPU):
    # its linear layers are bitsandbytes Linear4bit holding packed NF4 bytes, under the LoRA layers.
    quantized = [module for module in executor.policy.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized, "QLoRA trained a base model without any 4-bit layer"
    for module in quantized:
        weight: Any = module.weight  # a bitsandbytes Params4bit: packed bytes plus how to unpack them
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"
    # 7 projections in each of the tiny Llama's 2 layers; the tied lm_head stays in full precision.
    assert len(quantized) == 14
    assert result["quantization"] == {
        "method": "bitsandbytes",
        "quant_type": "nf4",
        "bits": 4,
        "linear4bit_layers": 14,
    }
    assert any("loaded in 4 bits" in event["message"] for event in events.of("log")), events.of("log")

    assert result["global_step"] == 3 and len(events.metric("loss")) == 3
    assert (Path(result["adapter"]) / "adapter_model.safetensors").is_file()
    merged = Path(result["merged_model"])
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert {event["name"] for event in events.of("artifact")} == {"adapter", "merged_model"}
    # The merged model is a plain (unquantized) model that loads without PEFT.
    assert "quantization_config" not in (merged / "config.json").read_text()


def test_full_fine_tune_on_chat_messages_with_an_eval_split(models: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    chats = [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
        }
        for row in QA * 2
    ]
    text = task_yaml(
        "sft",
        models["chat"],
        {"examples": chats, "eval_ratio": 0.25},
        {"max_steps": 3, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2},
    )
    ctx, events = make_context(text, tmp_path / "out")
    result = SFTExecutor().run(ctx)

    assert result["adapter"] is None
    assert result["dataset"] == {
        "source": "dataset.examples",
        "format": "messages",
        "train_examples": 6,
        "eval_examples": 2,
    }
    assert "eval_loss" in result["metrics"]
    tuned = load_file(Path(result["model"]) / "model.safetensors")
    base = load_file(models["chat"] / "model.safetensors")
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert changed, "full fine-tuning left every weight as it was"
    assert [event["kind"] for event in events.of("artifact")] == ["model"]


def test_cancel_stops_within_seconds_and_the_retry_resumes_from_the_checkpoint(
    models: dict[str, Path], tmp_path: Path
) -> None:
    text = task_yaml(
        "sft",
        models["base"],
        {"examples": QA * 4},
        {"max_steps": 30, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2, "save_steps": 1000},
        adapter={"type": "lora", "r": 4},
    )
    out = tmp_path / "out"
    ctx, events = make_context(text, out)
    cancelled_at: list[float] = []

    def cancel_after_a_few_steps() -> None:
        while len(events.metric("loss")) < 4:
            time.sleep(0.02)
        cancelled_at.append(time.monotonic())
        ctx.cancel_event.set()

    watcher = threading.Thread(target=cancel_after_a_few_steps, daemon=True)
    watcher.start()
    with pytest.raises(TaskCancelled):
        SFTExecutor().run(ctx)
    stopped = time.monotonic() - cancelled_at[0]
    assert stopped < 5, f"training went on for {stopped:.1f}s after the cancel"
    checkpoints = sorted(ctx.checkpoint_dir.glob("checkpoint-*"))
    assert checkpoints, "cancel saved no checkpoint"
    saved_step = int(checkpoints[-1].name.split("-")[1])
    assert 4 <= saved_step < 30
    # What the cancelled run trained is its usage too: a resume's run counts only its own steps.
    assert events.usage()["train_steps"] == saved_step and events.usage()["train_samples"] == 2 * saved_step

    # The worker re-runs the task (attempt 2) with the same spec; it picks up at the saved step.
    retry, retry_events = make_context(text, out, attempt=2)
    result = SFTExecutor().run(retry)
    assert result["resumed_from_step"] == saved_step
    assert result["global_step"] == 30
    [started] = [event for event in retry_events.of("progress") if event["message"] == "training"]
    assert started["step"] == saved_step and started["total"] == 30
    first_step = min(step for step, _ in retry_events.metric("loss"))
    assert first_step > saved_step
    assert retry_events.usage()["train_steps"] == 30 - saved_step


def test_a_damaged_checkpoint_is_set_aside_and_the_next_run_continues_from_the_one_before(
    models: dict[str, Path], tmp_path: Path
) -> None:
    text = task_yaml(
        "sft",
        models["base"],
        {"examples": QA * 2},
        {"max_steps": 12, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2, "save_steps": 5},
        adapter={"type": "lora", "r": 4},
    )
    out = tmp_path / "out"
    ctx, _ = make_context(text, out)
    SFTExecutor().run(ctx)
    saved = sorted(ctx.checkpoint_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in saved][-2:] == ["checkpoint-10", "checkpoint-12"], saved
    (saved[-1] / "adapter_model.safetensors").write_bytes(b"\0\0")  # cut short, as a failing disk leaves it

    second, _ = make_context(text, out, attempt=2)
    with pytest.raises(ExecutionError) as failed:
        SFTExecutor().run(second)
    assert failed.value.message.startswith("could not continue from checkpoint-12 (")
    assert failed.value.message.endswith("it was set aside as checkpoint-12.damaged")
    assert (ctx.checkpoint_dir / "checkpoint-12.damaged").is_dir()

    # A checkpoint whose save its worker's death cut short (no trainer state yet) is passed over, saying so.
    half = ctx.checkpoint_dir / "checkpoint-11"
    shutil.copytree(saved[-2], half)
    (half / "trainer_state.json").unlink()
    third, third_events = make_context(text, out, attempt=3)
    result = SFTExecutor().run(third)
    assert result["resumed_from_step"] == 10 and result["global_step"] == 12
    said = [event["message"] for event in third_events.of("log")]
    passed = "run 3: checkpoint-11 is passed over: it has no trainer_state.json, so it was cut short while it was saved"
    assert said.index(passed) < said.index("run 3: resuming from checkpoint-10"), said
