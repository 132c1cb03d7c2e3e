"""dpo and grpo on a tiny real Llama, and the built-in GRPO reward functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mloc.executors.train import DPOExecutor, GRPOExecutor
from mloc.executors.train.rewards import build
from tests.executors.support_train import PREFERENCES, QA, build_models, make_context, task_yaml

pytestmark = pytest.mark.extra("train")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("rl-models"))


def test_dpo_learns_to_prefer_the_chosen_answers(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml(
        "dpo",
        models["base"],
        {"examples": PREFERENCES * 2},
        {"max_steps": 6, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2, "beta": 0.1},
        adapter={"type": "lora", "r": 8},
    )
    ctx, events = make_context(text, tmp_path / "out")
    result = DPOExecutor().run(ctx)

    assert result["ok"] and result["task_type"] == "dpo" and result["global_step"] == 6
    margins = events.metric("rewards_margins")
    assert len(margins) == 6 and margins[-1][1] > 0, margins
    assert events.metric("rewards_accuracies")[-1][1] > 0.5
    assert (Path(result["adapter"]) / "adapter_config.json").is_file()
    assert events.usage()["train_samples"] == 12 and events.usage()["train_tokens"] > 0


def test_grpo_scores_completions_with_functions_and_a_reward_model(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml(
        "grpo",
        models["base"],
        {"examples": [{**row, "answer": row["completion"].strip(" .")} for row in QA]},
        {
            "max_steps": 3,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "batch_size": 4,
            "num_generations": 2,
            "max_completion_length": 8,
            "reward_funcs": ["length:20", "contains:the", "answer"],
            "reward_model": str(models["base"]),
        },
        adapter={"type": "lora", "r": 8},
    )
    ctx, events = make_context(text, tmp_path / "out")
    result = GRPOExecutor().run(ctx)

    assert result["ok"] and result["task_type"] == "grpo" and result["global_step"] == 3
    assert len(events.metric("reward")) == 3
    names = set(result["metrics"])
    assert {"rewards_length_20_mean", "rewards_contains_the_mean", "rewards_answer_mean"} <= names
    assert any(name.startswith("rewards_tiny-base") for name in names), names
    assert (Path(result["adapter"]) / "adapter_model.safetensors").is_file()
    assert events.usage()["train_samples"] == 12 and events.usage()["train_tokens"] > 0


def test_builtin_reward_functions_score_as_documented() -> None:
    completions = ["Paris is lovely", '{"a": 1}', "the the the the", ""]
    assert build("length:15")(completions=completions) == pytest.approx([1.0, 8 / 15, 1 - 0 / 15, 0.0])
    assert build("contains:PARIS")(completions=completions) == [1.0, 0.0, 0.0, 0.0]
    assert build(r"regex:^\{")(completions=completions) == [0.0, 1.0, 0.0, 0.0]
    assert build("json")(completions=completions) == [0.0, 1.0, 0.0, 0.0]
    assert build("distinct")(completions=completions) == [1.0, 1.0, 0.25, 0.0]
    answers = ["paris", "2", "the", "x"]
    assert build("answer")(completions=completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": "Paris"}]]
    assert build("contains:paris")(completions=chat) == [1.0]
