"""hyperparameters.report_to: a real SFT run leaves TensorBoard event files among the task's artifacts, a
tracker that is not installed fails the task before any weights load, and bad values are refused at submit."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from mloc.errors import ExecutionError, SpecError
from mloc.executors.train import SFTExecutor
from mloc.spec import load
from tests.executors.support_train import QA, build_models, make_context, task_yaml

pytestmark = pytest.mark.extra("train")

LORA = {"type": "lora", "r": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("report-models"))


def test_tensorboard_event_files_land_in_the_task_out_folder_as_an_artifact(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = task_yaml(
        "sft",
        models["base"],
        {"examples": QA},
        {"max_steps": 4, "learning_rate": 5e-3, "logging_steps": 1, "batch_size": 2, "report_to": ["tensorboard"]},
        adapter=LORA,
    )
    out = tmp_path / "out"
    ctx, events = make_context(text, out)
    result = SFTExecutor().run(ctx)

    logs = out / "tensorboard"
    assert result["tensorboard"] == str(logs)
    event_files = list(logs.glob("events.out.tfevents.*"))
    assert event_files, sorted(str(path.relative_to(out)) for path in out.rglob("*"))
    artifacts = {event["name"]: event for event in events.of("artifact")}
    assert artifacts["tensorboard"]["path"] == str(logs) and artifacts["tensorboard"]["kind"] == "tensorboard"
    # The files hold the same loss per step that the task reported to MLOC.
    accumulator = EventAccumulator(str(logs))
    accumulator.Reload()
    logged = [(scalar.step, scalar.value) for scalar in accumulator.Scalars("train/loss")]
    reported = events.metric("loss")
    assert [step for step, _ in logged] == [step for step, _ in reported] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx([value for _, value in reported], rel=1e-5)
    # The directory was handed to the trainer for this task only; the executor process runs others later.
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_without_report_to_no_tracker_writes_anything(models: dict[str, Path], tmp_path: Path) -> None:
    text = task_yaml("sft", models["base"], {"examples": QA}, {"max_steps": 1, "batch_size": 2}, adapter=LORA)
    out = tmp_path / "out"
    ctx, events = make_context(text, out)
    result = SFTExecutor().run(ctx)
    assert "tensorboard" not in result
    assert not list(out.rglob("events.out.tfevents.*"))
    assert [event["name"] for event in events.of("artifact")] == ["adapter"]


def test_a_tracker_that_is_not_installed_fails_before_the_model_loads(models: dict[str, Path], tmp_path: Path) -> None:
    assert importlib.util.find_spec("wandb") is None, "this test needs an environment without wandb"
    text = task_yaml("sft", models["base"], {"examples": QA}, {"report_to": ["wandb"]}, adapter=LORA)
    ctx, events = make_context(text, tmp_path / "out")
    with pytest.raises(ExecutionError) as info:
        SFTExecutor().run(ctx)
    assert "hyperparameters.report_to names wandb, which is not installed" in info.value.message
    assert "pip install wandb" in info.value.message
    assert "loading the model" not in [event["message"] for event in events.of("progress")]
    assert not ctx.checkpoint_dir.exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["none", "mlflow"], "'none' cannot be combined with other trackers; give [mlflow] or [none]"),
        (["tensorboard", "tensorboard"], "a tracker is named twice"),
        (["comet"], "'comet' is not one of 'tensorboard', 'mlflow', 'wandb' or 'none'"),
    ],
)
def test_bad_report_to_is_refused_at_submit(tmp_path: Path, value: list[str], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        load(task_yaml("sft", tmp_path, {"examples": QA}, {"report_to": value}))
    assert "spec.hyperparameters.report_to" in str(info.value) and expected in str(info.value)


def test_report_to_takes_one_name_or_a_list_and_defaults_to_none(tmp_path: Path) -> None:
    def trackers(hyperparameters: dict[str, object]) -> list[str]:
        spec = load(task_yaml("sft", tmp_path, {"examples": QA}, hyperparameters)).spec
        return [tracker.value for tracker in spec.hyperparameters.report_to]  # type: ignore[attr-defined]

    assert trackers({}) == ["none"]
    assert trackers({"report_to": "tensorboard"}) == ["tensorboard"]
    assert trackers({"report_to": ["mlflow", "wandb"]}) == ["mlflow", "wandb"]
    assert trackers({"report_to": []}) == ["none"]
