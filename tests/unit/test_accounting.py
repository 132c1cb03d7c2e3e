"""What a finished run used (mloc.worker.accounting): the task's usage and its owner's day counters."""

from __future__ import annotations

import json

import pytest

from mloc.state import TaskState
from mloc.worker.accounting import cores_asked, daily_counters, peak_fields, run_usage

H100 = [{"index": 0, "name": "H100"}, {"index": 1, "name": "H100"}]


def test_reported_usage_wins_over_the_result_and_time_is_priced_by_what_was_held() -> None:
    usage = run_usage({"prompt_tokens": 10.0}, {"usage": {"prompt_tokens": 99}}, 2.0, 2, 4.0)
    assert usage == {
        "prompt_tokens": 10.0,
        "total_tokens": 10.0,
        "wall_sec": 2.0,
        "gpu_seconds": 4.0,
        "cpu_seconds": 8.0,
    }


def test_the_results_numbers_count_when_nothing_was_reported_and_flags_do_not() -> None:
    result = {"usage": {"completion_tokens": 7, "cached": True, "note": "x", "cpu_seconds": 0.5}}
    usage = run_usage({}, result, 1.5, 0, 1.0)
    # The executor's own CPU-seconds stand; a boolean is not a count.
    assert usage == {
        "completion_tokens": 7.0,
        "total_tokens": 7.0,
        "cpu_seconds": 0.5,
        "wall_sec": 1.5,
        "gpu_seconds": 0.0,
    }


def test_a_day_counts_the_task_by_type_and_outcome_with_its_figures() -> None:
    usage = {"wall_sec": 3.0, "gpu_seconds": 6.0, "cpu_seconds": 3.0, "total_tokens": 40.0, "other": 1.0}
    daily = daily_counters("inference", TaskState.SUCCEEDED, usage, [1, 0], H100)
    assert daily == {
        "tasks": 1.0,
        "tasks.inference": 1.0,
        "tasks.inference.succeeded": 1.0,
        "state.succeeded": 1.0,
        "wall_sec": 3.0,
        "gpu_seconds": 6.0,
        "cpu_seconds": 3.0,
        "total_tokens": 40.0,
        "gpu_seconds.H100": 6.0,
    }


def test_training_steps_and_eval_samples_are_counted_too() -> None:
    trained = daily_counters("sft", TaskState.SUCCEEDED, {"train_steps": 300.0, "train_samples": 1200.0}, [], H100)
    assert (trained["train_steps"], trained["train_samples"]) == (300.0, 1200.0)
    assert daily_counters("eval", TaskState.SUCCEEDED, {"eval_samples": 80.0}, [], H100)["eval_samples"] == 80.0


def test_gpu_seconds_by_model_only_for_gpu_runs_and_unknown_cards_are_gpus() -> None:
    cpu_run = daily_counters("echo", TaskState.FAILED, {"gpu_seconds": 0.0}, [], H100)
    assert not any(name.startswith("gpu_seconds.") for name in cpu_run)
    assert cpu_run["state.failed"] == 1.0
    assert daily_counters("sft", TaskState.SUCCEEDED, {"gpu_seconds": 1.0}, [5], H100)["gpu_seconds.gpu"] == 1.0


@pytest.mark.parametrize(
    ("hardware", "cores"),
    [({"cpu": "500m"}, 0.5), ({"cpu": 4}, 4.0), ({}, 1.0), ({"cpu": "lots"}, 1.0), (None, 1.0)],
)
def test_cores_asked(hardware: dict[str, object] | None, cores: float) -> None:
    document = {"spec": {"resources": {"hardware": hardware}}} if hardware is not None else {"spec": {}}
    assert cores_asked(document) == cores


def test_peak_is_the_gpus_when_the_task_had_gpus_else_the_process_trees() -> None:
    memory = {"gpu_peak_bytes": 5_000, "rss_peak_bytes": 300}
    on_gpu = peak_fields(memory, [0])
    assert on_gpu["memory_peak_bytes"] == "5000"
    assert json.loads(on_gpu["memory_peak"]) == {**memory, "device": "gpu"}
    on_cpu = peak_fields(memory, [])
    assert on_cpu["memory_peak_bytes"] == "300"
    assert json.loads(on_cpu["memory_peak"])["device"] == "cpu"


def test_tokens_reported_as_prompt_and_completion_add_up_to_a_total() -> None:
    usage = run_usage({"prompt_tokens": 777.0, "completion_tokens": 100.0}, None, 2.0, 0, 1.0)
    assert usage["total_tokens"] == 877.0
    assert daily_counters("inference", TaskState.SUCCEEDED, usage, [], H100)["total_tokens"] == 877.0
    # A total the executor gave stands; a run that counted no tokens gets none.
    assert run_usage({"total_tokens": 5.0, "prompt_tokens": 1.0}, None, 1.0, 0, 1.0)["total_tokens"] == 5.0
    assert "total_tokens" not in run_usage({}, None, 1.0, 0, 1.0)
