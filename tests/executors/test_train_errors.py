"""Bad training input fails fast, before any weights are loaded, with a message that says what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mloc.errors import ExecutionError, SpecError
from mloc.executors.train import GRPOExecutor, PPOExecutor, SFTExecutor
from mloc.executors.train.ppo import ppo_trainer_available
from tests.executors.support_train import QA, build_models, make_context, task_yaml, write_jsonl

pytestmark = pytest.mark.extra("train")

ROOT = Path(__file__).resolve().parents[2]
LORA = {"type": "lora", "r": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("error-models"))


def _fails(executor: Any, text: str, tmp_path: Path) -> str:
    ctx, events = make_context(text, tmp_path / "out")
    with pytest.raises(ExecutionError) as info:
        executor.run(ctx)
    # Nothing was trained: no step metrics, no checkpoint folder.
    assert not events.of("metrics")
    assert not ctx.checkpoint_dir.exists()
    return info.value.message


def test_malformed_jsonl_names_the_file_and_line(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(QA[0]) + "\n" + '{"prompt": "x", "completion": \n')
    message = _fails(SFTExecutor(), task_yaml("sft", models["base"], {"path": str(data)}, {}, adapter=LORA), tmp_path)
    assert f"{data} line 2" in message and "not valid JSON" in message


def test_missing_dataset_file_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    message = _fails(SFTExecutor(), task_yaml("sft", models["base"], {"path": str(missing)}, {}), tmp_path)
    assert str(missing) in message and "does not exist" in message


def test_record_missing_a_column_is_named_by_line(models: dict[str, Path], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [QA[0], {"prompt": "only a prompt"}])
    text = task_yaml("sft", models["base"], {"path": str(data), "format": "prompt_completion"}, {})
    message = _fails(SFTExecutor(), text, tmp_path)
    assert f"{data} line 2" in message and "'completion'" in message


def test_csv_row_with_extra_cells_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "qa.csv"
    data.write_text("prompt,completion\nhello,world\nthis, has, three\n")
    message = _fails(SFTExecutor(), task_yaml("sft", models["base"], {"path": str(data)}, {}), tmp_path)
    assert f"{data} line 3" in message


def test_unknown_adapter_type_is_refused_with_the_field(models: dict[str, Path]) -> None:
    from mloc.spec import load

    with pytest.raises(SpecError) as info:
        load(task_yaml("sft", models["base"], {"examples": QA}, {}, adapter={"type": "ia3"}))
    assert "spec.model.adapter.type" in info.value.message


def test_target_modules_the_model_lacks_are_listed(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml(
        "sft",
        models["base"],
        {"examples": QA},
        {},
        adapter={"type": "lora", "target_modules": ["q_proj", "c_attn"]},
    )
    message = _fails(SFTExecutor(), text, tmp_path)
    assert "['c_attn']" in message and "q_proj" in message and "v_proj" in message


def test_chat_data_for_a_model_without_a_chat_template(models: dict[str, Path], tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    message = _fails(SFTExecutor(), task_yaml("sft", models["base"], {"examples": chats}, {}), tmp_path)
    assert "no chat template" in message


def test_assistant_only_loss_with_a_template_that_does_not_mark_the_assistant(
    models: dict[str, Path], tmp_path: Path
) -> None:
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    text = task_yaml("sft", models["chat"], {"examples": chats}, {"assistant_only_loss": True}, adapter=LORA)
    message = _fails(SFTExecutor(), text, tmp_path)
    assert message.startswith(
        "hyperparameters.assistant_only_loss needs a chat template that marks the assistant's turns with "
        "{% generation %} ... {% endgeneration %}, and this model's does not; set assistant_only_loss: false"
    ), message


def test_unknown_trl_argument_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml("sft", models["base"], {"examples": QA}, {"trl_args": {"not_a_field": 1}}, adapter=LORA)
    message = _fails(SFTExecutor(), text, tmp_path)
    assert "not_a_field" in message and "SFTConfig" in message


def test_reward_model_that_cannot_be_loaded(models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken-reward"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    text = task_yaml(
        "grpo",
        models["base"],
        {"examples": QA},
        {"reward_model": str(broken), "num_generations": 2, "batch_size": 2},
        adapter=LORA,
    )
    message = _fails(GRPOExecutor(), text, tmp_path)
    assert "reward model" in message and str(broken) in message


def test_reward_model_that_does_not_exist(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml(
        "grpo",
        models["base"],
        {"examples": QA},
        {"reward_model": "nobody/no-such-reward-model", "num_generations": 2, "batch_size": 2},
        adapter=LORA,
    )
    message = _fails(GRPOExecutor(), text, tmp_path)
    assert "hyperparameters.reward_model" in message and "local Hugging Face cache" in message


def test_unknown_reward_function_is_refused_at_submit(models: dict[str, Path]) -> None:
    from mloc.spec import load

    with pytest.raises(SpecError) as info:
        load(task_yaml("grpo", models["base"], {"examples": QA}, {"reward_funcs": ["shiny"]}))
    assert "unknown reward function 'shiny'" in info.value.message and "contains:ARG" in info.value.message


def test_qlora_without_bitsandbytes_says_how_to_fix_it(models: dict[str, Path], tmp_path: Path) -> None:
    # A worker without bitsandbytes, made real by hiding the package from the import system.
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bitsandbytes" or name.startswith("bitsandbytes."):
                    raise ModuleNotFoundError(name)
                return None
        sys.meta_path.insert(0, Hide())
        import importlib.util
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from mloc.errors import ExecutionError
        from mloc.executors.train import SFTExecutor
        from tests.executors.support_train import QA, make_context, task_yaml
        base = Path({str(models["base"])!r})
        text = task_yaml("sft", base, {{"examples": QA}}, {{}}, adapter={{"type": "qlora"}})
        ctx, _ = make_context(text, Path({str(tmp_path / "out")!r}))
        try:
            SFTExecutor().run(ctx)
        except ExecutionError as exc:
            print("ERROR:", exc.message)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert "ERROR:" in done.stdout, done.stderr[-2000:]
    assert "bitsandbytes" in done.stdout and "mloc[qlora]" in done.stdout


def test_ppo_reports_whether_this_environment_can_run_it() -> None:
    missing = PPOExecutor.missing_requirements()
    assert bool(missing) is (not ppo_trainer_available())
    if missing:
        assert "setup_ppo_env.sh" in missing[-1]
