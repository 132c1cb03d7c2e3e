"""The eval executor, run directly on a real tiny model: custom tasks from files the tests write, scored
by lm-eval exactly as lm-eval scores them on its own, adapters, progress and cancel, and bad input."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

import mloc.spec
from mloc.errors import ExecutionError, SpecError, TaskCancelled
from mloc.executors.base import Event, RunContext
from mloc.executors.eval import TASKS_DIR, EvalExecutor
from tests.llm.builders import TINY_HIDDEN, make_lora
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("eval")

MC_ROWS = [
    {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), str(i), "zero"], "answer": i % 4}
    for i in range(8)
]
EM_WORDS = ["yes", "no", "blue", "red", "one", "two"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", hidden_size=TINY_HIDDEN)


@pytest.fixture(scope="module")
def executor() -> Any:
    instance = EvalExecutor()
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    mc = folder / "arith.jsonl"
    mc.write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    em = folder / "words.csv"
    em.write_text("question,target\n" + "".join(f"Say {word}.,{word}\n" for word in EM_WORDS))
    # MMLU's layout: one column per choice, the answer as the letter naming its column.
    letters = folder / "letters.csv"
    letters.write_text(
        "question,A,B,C,answer\n" + "".join(f"Pick {i}.,{i},{i + 1},{i + 2},{'ABC'[i % 3]}\n" for i in range(4))
    )
    return {"mc": mc, "em": em, "letters": letters}


def custom(data: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {"name": "arith", "path": str(data["mc"]), "type": "multiple_choice"},
        {"name": "words", "path": str(data["em"]), "type": "exact_match"},
        {
            "name": "letters",
            "path": str(data["letters"]),
            "type": "multiple_choice",
            "columns": {"choices": ["A", "B", "C"]},
        },
    ]


def document(model: Path, adapter: Path | None = None, **options: Any) -> mloc.spec.Document:
    source: dict[str, Any] = {"source": {"type": "local", "identifier": str(model)}, "engine": "transformers"}
    if adapter is not None:
        source["adapter"] = {"path": str(adapter)}
    spec = {"taskType": "eval", "model": source, "eval": {"batch_size": 4, "max_tokens": 4, **options}}
    return mloc.spec.load(yaml.safe_dump({"apiVersion": "mloc/v1", "kind": "EvalTask", "spec": spec}))


def run(
    executor: EvalExecutor, doc: mloc.spec.Document, out_dir: Path, *, on_event: Any = None
) -> tuple[dict[str, Any], list[Event]]:
    events: list[Event] = []
    cancel = threading.Event()

    def emit(event: Event) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event, cancel)

    ctx = RunContext(
        task_id="task-1",
        attempt=1,
        owner="alice",
        document=doc,
        out_dir=out_dir,
        models_dir=out_dir / "models",
        worker_id="w1",
        emit=emit,
        cancel_event=cancel,
    )
    return executor.run(ctx), events


def test_custom_tasks_score_as_lm_eval_scores_them_alone_with_stderr_metrics_and_progress(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    result, events = run(executor, document(tiny_model, custom=custom(data)), tmp_path)

    assert result["ok"] is True and result["model"] == str(tiny_model) and result["engine"] == "transformers"
    scores = result["scores"]
    assert set(scores) == {"arith", "words", "letters"}
    assert set(scores["arith"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(scores["words"]) == {"exact_match", "exact_match_stderr"}
    for values in scores.values():
        assert all(isinstance(value, float) for value in values.values()), values
    assert 0 <= scores["arith"]["acc"] <= 1 and scores["arith"]["acc_stderr"] > 0
    assert result["samples"] == {
        "arith": {"rows": 8, "scored": 8},
        "words": {"rows": 6, "scored": 6},
        "letters": {"rows": 4, "scored": 4},
    }
    assert result["config"]["tasks"]["arith"]["output_type"] == "multiple_choice"
    assert result["config"]["tasks"]["words"]["generation_kwargs"]["max_gen_toks"] == 4
    assert 0 < result["usage"]["eval_sec"] < result["usage"]["latency_sec"]

    # lm-eval on its own, over the configs the task wrote and the model loaded by lm-eval itself.
    import lm_eval
    from lm_eval.tasks import TaskManager

    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model), "dtype": "float32", "device": "cpu"},
        tasks=["arith", "words", "letters"],
        batch_size=4,
        task_manager=TaskManager(include_path=str(tmp_path / TASKS_DIR), include_defaults=False),
        log_samples=False,
    )
    assert direct is not None
    for task, values in scores.items():
        for metric, value in values.items():
            assert direct["results"][task][f"{metric},none"] == pytest.approx(value, abs=1e-9), (task, metric)

    metrics = [event for event in events if event["ev"] == "metrics"]
    assert {key for event in metrics for key in event["values"]} >= {
        "arith/acc",
        "arith/acc_stderr",
        "words/exact_match",
    }
    progress = [event for event in events if event["ev"] == "progress"]
    # 8 questions x 4 choices + 4 x 3 are scored, then 6 completions generated.
    assert {(event["message"], event["total"]) for event in progress if event["step"] == event["total"]} == {
        ("scoring choices", 44),
        ("generating", 6),
    }
    assert usage_of(events) == 18


def usage_of(events: list[Event]) -> float:
    return sum(event["counters"].get("eval_samples", 0) for event in events if event["ev"] == "usage")


def test_an_adapter_changes_the_scores_and_the_base_model_is_untouched_after(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    lora = make_lora(tiny_model, tmp_path / "lora")
    tasks = custom(data)[:1] + custom(data)[2:]
    base, _ = run(executor, document(tiny_model, custom=tasks), tmp_path / "base")
    adapted, _ = run(executor, document(tiny_model, adapter=lora, custom=tasks), tmp_path / "adapted")
    again, _ = run(executor, document(tiny_model, custom=tasks), tmp_path / "again")

    assert adapted["adapter"] == str(lora)
    assert adapted["scores"] != base["scores"]
    assert again["scores"] == base["scores"]


def test_few_shot_examples_come_from_the_other_rows(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    result, _ = run(executor, document(tiny_model, custom=custom(data)[:1], num_fewshot=3, limit=5), tmp_path)
    assert result["config"]["tasks"]["arith"]["num_fewshot"] == 3
    assert result["samples"]["arith"] == {"rows": 8, "scored": 5}


def test_a_cancel_while_scoring_stops_the_evaluation(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    def cancel_when_scoring(event: Event, cancel: threading.Event) -> None:
        if event["ev"] == "progress" and event.get("message") == "scoring choices":
            cancel.set()

    with pytest.raises(TaskCancelled):
        run(executor, document(tiny_model, custom=custom(data)[:1]), tmp_path, on_event=cancel_when_scoring)


# --- bad input --------------------------------------------------------------------------------------


def failure(executor: EvalExecutor, doc: mloc.spec.Document, out_dir: Path) -> str:
    with pytest.raises(ExecutionError) as caught:
        run(executor, doc, out_dir)
    return caught.value.message


def test_an_unknown_column_is_named_with_the_columns_the_file_has(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    task = {"name": "words", "path": str(data["em"]), "type": "exact_match", "columns": {"target": "answer_text"}}
    message = failure(executor, document(tiny_model, custom=[task]), tmp_path)
    assert message == (
        f"eval.custom[0] ('words'): column(s) answer_text not in {str(data['em'])!r}, whose columns are question, "
        "target; name the file's columns in columns.question, columns.target"
    )


def test_a_missing_file_says_where_to_put_it(executor: EvalExecutor, tiny_model: Path, tmp_path: Path) -> None:
    task = {"name": "gone", "path": str(tmp_path / "nowhere.jsonl"), "type": "multiple_choice"}
    message = failure(executor, document(tiny_model, custom=[task]), tmp_path)
    assert message.startswith(f"eval.custom[0] ('gone'): file {str(tmp_path / 'nowhere.jsonl')!r} does not exist")
    assert "give its absolute path" in message


def test_an_answer_that_is_not_a_choice_names_the_row(executor: EvalExecutor, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [{**MC_ROWS[0]}, {**MC_ROWS[1], "answer": "seven"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    message = failure(
        executor, document(tiny_model, custom=[{"name": "bad", "path": str(path), "type": "multiple_choice"}]), tmp_path
    )
    assert f"row 2 of {str(path)!r}: answer 'seven' in column 'answer' is not one of the 4 choices" in message


def test_more_shots_than_other_rows_is_refused(
    executor: EvalExecutor, tiny_model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    message = failure(executor, document(tiny_model, custom=custom(data)[2:], num_fewshot=4), tmp_path)
    assert "num_fewshot 4 needs more rows than the file's 4" in message and "lower num_fewshot below 4" in message


def test_a_harness_task_whose_data_is_not_cached_is_named_with_how_to_cache_it(
    executor: EvalExecutor, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    import huggingface_hub.constants

    # An empty cache, whatever this machine holds.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    message = failure(executor, document(tiny_model, tasks=["arc_easy"]), tmp_path)
    assert message.startswith(
        "eval.tasks: the data of harness task 'arc_easy' (dataset 'allenai/ai2_arc/ARC-Easy') is not in this "
        f"worker's Hugging Face cache ({tmp_path / 'datasets'})"
    )
    assert "TaskManager().load(['arc_easy'])" in message


@pytest.mark.parametrize(
    ("eval_section", "path", "words"),
    [
        ({}, "spec.eval", "nothing to evaluate"),
        (
            {"custom": [{"name": "a", "path": "/d/a.txt", "type": "exact_match"}]},
            "spec.eval.custom.0.path",
            ".jsonl, .json or .csv",
        ),
        (
            {"custom": [{"name": "a", "path": "/d/a.csv", "type": "generation", "metric": "rouge"}]},
            "spec.eval.custom.0.metric.0",
            "'exact_match', 'bleu', 'chrf' or 'ter'",
        ),
        (
            {"custom": [{"name": "a", "path": "/d/a.csv", "type": "exact_match", "columns": {"choices": "c"}}]},
            "spec.eval.custom.0",
            "are for multiple_choice tasks",
        ),
        (
            {
                "custom": [
                    {"name": "a", "path": "/d/a.csv", "type": "exact_match", "columns": {"question": "the question"}}
                ]
            },
            "spec.eval.custom.0.columns.question",
            "must be a plain name",
        ),
        (
            {"tasks": ["arith"], "custom": [{"name": "arith", "path": "/d/a.csv", "type": "exact_match"}]},
            "spec.eval",
            "arith used twice",
        ),
    ],
)
def test_bad_specs_are_refused_at_submit_naming_the_field(eval_section: dict[str, Any], path: str, words: str) -> None:
    body = {"apiVersion": "mloc/v1", "kind": "EvalTask", "spec": {"taskType": "eval", "eval": eval_section}}
    with pytest.raises(SpecError) as caught:
        mloc.spec.validate(body)
    assert [detail["path"] for detail in caught.value.details] == [path]
    assert words in caught.value.details[0]["message"]


def test_the_vllm_engine_is_refused_with_the_fix() -> None:
    body = {
        "kind": "EvalTask",
        "spec": {
            "taskType": "eval",
            "model": {"source": {"identifier": "m"}, "engine": "vllm"},
            "eval": {"tasks": ["x"]},
        },
    }
    with pytest.raises(SpecError) as caught:
        mloc.spec.validate(body)
    assert "set model.engine to 'transformers' or 'auto'" in caught.value.message
