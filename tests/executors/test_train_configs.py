"""The shipped training task files validate, and the tiny template runs as it stands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import mloc.spec
from mloc.errors import SpecError
from mloc.executors.train import SFTExecutor
from mloc.spec.train import GRPOSpec, PPOSpec, SFTSpec
from tests.executors.support_train import make_context
from tests.support.tiny_model import build_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = ["sft_mistral_7b.yaml", "dpo_example.yaml", "grpo_example.yaml", "ppo_example.yaml"]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_training_configs_are_valid_tasks(name: str) -> None:
    document = mloc.spec.load((ROOT / "configs" / name).read_text())
    assert document.spec.task_type == name.split("_")[0]


def test_the_seed_sft_config_is_qlora_on_mistral() -> None:
    spec = mloc.spec.load((ROOT / "configs" / "sft_mistral_7b.yaml").read_text()).spec
    assert isinstance(spec, SFTSpec) and spec.model.adapter is not None
    assert spec.model.source.identifier == "mistralai/Mistral-7B-Instruct-v0.1"
    assert (spec.model.adapter.type.value, spec.model.adapter.r, spec.model.adapter.lora_alpha) == (
        "qlora",
        16,
        32,
    )


def test_seed_ppo_hyperparameters_are_accepted_and_the_missing_model_is_named() -> None:
    fragment = {
        "taskType": "ppo",
        "hyperparameters": {
            "reward_model": "OpenAssistant/reward-model-deberta-v3-large-v2",
            "ppo_epochs": 4,
            "target_kl": 0.1,
        },
    }
    with pytest.raises(SpecError) as info:
        mloc.spec.validate(fragment)
    paths = {detail["path"] for detail in info.value.details}
    assert paths == {"spec.model", "spec.dataset"}
    complete = {
        **fragment,
        "model": {"source": {"identifier": "some/policy"}},
        "dataset": {"path": "prompts.jsonl"},
    }
    spec = mloc.spec.validate(complete).spec
    assert isinstance(spec, PPOSpec) and spec.hyperparameters.ppo_epochs == 4 and spec.hyperparameters.target_kl == 0.1


def test_grpo_batch_must_hold_whole_groups() -> None:
    task = {
        "taskType": "grpo",
        "model": {"source": {"identifier": "x/y"}},
        "dataset": {"examples": [{"prompt": "hi"}]},
        "hyperparameters": {"reward_funcs": ["json"], "batch_size": 3, "num_generations": 2},
    }
    with pytest.raises(SpecError) as info:
        mloc.spec.validate(task)
    assert "multiple of num_generations" in info.value.message
    task["hyperparameters"]["batch_size"] = 4  # type: ignore[index]
    assert isinstance(mloc.spec.validate(task).spec, GRPOSpec)


@pytest.mark.extra("train")
def test_the_tiny_local_template_runs(tmp_path: Path) -> None:
    model = build_tiny_causal_lm(tmp_path / "tiny-llama")
    task = yaml.safe_load((ROOT / "templates" / "sft_tiny_local.yaml").read_text())
    task["spec"]["model"]["source"]["identifier"] = str(model)
    ctx, events = make_context(yaml.safe_dump(task), tmp_path / "out")
    result = SFTExecutor().run(ctx)
    assert result["ok"] and result["global_step"] == 30
    losses = events.metric("loss")
    assert losses[-1][1] < losses[0][1]


def test_importing_the_training_executors_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    script = (
        "import sys; from mloc.executors.train import DPOExecutor, GRPOExecutor, PPOExecutor, SFTExecutor; "
        "[cls.missing_requirements() for cls in (DPOExecutor, GRPOExecutor, PPOExecutor, SFTExecutor)]; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
