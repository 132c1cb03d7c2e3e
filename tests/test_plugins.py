"""Both seeds' plug-in forms beside MLOC's native executors.

The example distribution in tests/plugins/mloc-example-plugins (installed by scripts/setup.sh) adds a
seed-1 executor, ``run(task, out_dir)``, and a seed-2 task module, ``async execute(progress_callback)``,
through entry points. Here they run through a real orchestrator and worker, next to the native echo
executor, and their pieces are checked on their own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mloc_example_plugins.seed_one import SeedOneEchoExecutor
from mloc_example_plugins.wordcount import WordCountModule

import mloc.errors
import mloc.executors
from mloc.client import TERMINAL, Client
from mloc.errors import SpecError, TaskCancelled
from mloc.executors import Executor, RunContext
from mloc.executors.base_executor import ExecutionError as SeedExecutionError
from mloc.executors.base_executor import Executor as SeedExecutor
from mloc.executors.registry import available_task_types, discover, executor_for
from mloc.localcluster import LocalCluster
from mloc.modules import MODULE_REGISTRY, BaseModule, ProgressCallback, TaskType
from mloc.spec import validate
from mloc.spec.plugin import PluginSpec
from mloc.spec.registry import BUILTIN
from tests.support.api import wait_until

LINES = ["the quick brown fox", "jumps over the lazy dog", "the end"]


def task_yaml(task_type: str, name: str | None = None, **hyperparameters: Any) -> bytes:
    metadata = f"metadata: {{name: {name}}}\n" if name else ""
    return f"taskType: {task_type}\n{metadata}hyperparameters: {json.dumps(hyperparameters)}\n".encode()


def context(tmp_path: Path, events: list[dict[str, Any]] | None = None, payload: Any = None) -> RunContext:
    """A real RunContext for an echo task, its events collected in ``events``."""
    sink = events if events is not None else []
    return RunContext(
        task_id="t-1",
        attempt=1,
        owner="alice",
        document=validate({"taskType": "echo", "metadata": {"name": "unit"}, "payload": payload or {"n": 1}}),
        out_dir=tmp_path / "out",
        models_dir=tmp_path / "models",
        worker_id="w-1",
        emit=sink.append,
    )


# --- the pieces on their own -------------------------------------------------------------------------


def test_registry_lists_the_plugin_task_types_beside_the_built_ins() -> None:
    offered = available_task_types()
    assert {"seed_one_echo", "seed_two_wordcount", "echo"} <= set(offered)
    # Built-ins whose libraries are installed are offered beside them (inference needs the extra).
    inference = executor_for("inference")
    assert inference is not None and ("inference" in offered) is inference.available
    seed_one = executor_for("seed_one_echo")
    assert seed_one is not None and seed_one.cls is SeedOneEchoExecutor
    wordcount = executor_for("seed_two_wordcount")
    assert wordcount is not None and getattr(wordcount.cls, "module", None) is WordCountModule
    assert issubclass(wordcount.cls, Executor) and wordcount.cls.task_types == ("seed_two_wordcount",)


def test_seed_one_import_path_names_the_same_classes() -> None:
    assert SeedExecutor is mloc.executors.Executor
    assert SeedExecutionError is mloc.executors.ExecutionError is mloc.errors.ExecutionError


def test_seed_one_executor_gets_the_task_as_plain_data_and_its_out_dir(tmp_path: Path) -> None:
    class Recorder(Executor):
        name = "recorder"

        def run(self, task: dict, out_dir: Path) -> dict:  # type: ignore[override]
            result = {"ok": True, "name": task["metadata"]["name"], "payload": task["spec"]["payload"]}
            self.save_json(out_dir / "responses.json", result)
            return result

    assert Recorder.served_task_types("from_entry_point") == ("from_entry_point",)
    assert Recorder.served_task_types() == ("recorder",)
    ctx = context(tmp_path)
    executor: Executor = Recorder()  # as the worker holds it: every executor is called as run(ctx)
    result = executor.run(ctx)
    assert result == {"ok": True, "name": "unit", "payload": {"n": 1}}
    assert json.loads((ctx.out_dir / "responses.json").read_text()) == result


def test_native_run_ctx_executors_are_left_as_they_are(tmp_path: Path) -> None:
    class Native(Executor):
        name = "native"
        task_types = ("native_a", "native_b")

        def run(self, ctx: RunContext) -> dict[str, Any]:
            return {"task_id": ctx.task_id}

    assert Native.served_task_types("ignored") == ("native_a", "native_b")
    assert Native().run(context(tmp_path)) == {"task_id": "t-1"}


def test_plugin_task_types_are_validated_by_the_generic_spec_and_built_ins_keep_theirs() -> None:
    document = validate({"taskType": "seed_two_wordcount", "hyperparameters": {"lines": ["a b"], "anything": 1}})
    assert isinstance(document.spec, PluginSpec)
    assert document.kind == "SeedTwoWordcountTask"
    assert document.to_wire()["spec"]["hyperparameters"] == {"lines": ["a b"], "anything": 1}
    with pytest.raises(SpecError, match=r"spec\.lines: unknown field"):
        validate({"taskType": "seed_two_wordcount", "lines": ["a b"]})
    with pytest.raises(SpecError, match=r"hyperparameters\.anything: unknown field"):
        validate({"taskType": "echo", "hyperparameters": {"anything": 1}})
    with pytest.raises(SpecError, match="unknown taskType 'seed_three'"):
        validate({"taskType": "seed_three"})


def test_task_type_enum_names_the_built_in_task_types() -> None:
    assert {str(member) for member in TaskType} == set(BUILTIN)


def test_a_module_must_be_async() -> None:
    with pytest.raises(TypeError, match="must be 'async def execute"):

        class Blocking(BaseModule):
            def execute(self, progress_callback: ProgressCallback | None = None) -> dict[str, Any]:  # type: ignore[override]
                return {}


class Stepper(BaseModule):
    """Reports progress both ways a module may call the callback, then waits to be cancelled."""

    async def execute(self, progress_callback: ProgressCallback | None = None) -> dict[str, Any]:
        assert progress_callback is not None
        progress_callback(1, 2)  # called plainly
        await progress_callback(2, 2, "both steps")  # or awaited
        if self.task["spec"]["payload"].get("block"):
            await asyncio.Event().wait()  # until cancelled
        return {"task_id": self.task_id, "payload": self.task["spec"]["payload"]}


@pytest.fixture
def registered_stepper() -> Iterator[str]:
    MODULE_REGISTRY["unit_stepper"] = Stepper
    discover.cache_clear()
    yield "unit_stepper"
    del MODULE_REGISTRY["unit_stepper"]
    discover.cache_clear()


def test_module_in_module_registry_is_served_with_its_progress(registered_stepper: str, tmp_path: Path) -> None:
    info = executor_for(registered_stepper)
    assert info is not None and info.available
    events: list[dict[str, Any]] = []
    result = info.cls().run(context(tmp_path, events))
    assert result == {"task_id": "t-1", "payload": {"n": 1}}
    progress = [(e["step"], e["total"], e["message"]) for e in events if e["ev"] == "progress"]
    assert progress == [(1, 2, None), (2, 2, "both steps")]


def test_cancel_signal_cancels_a_module_coroutine(registered_stepper: str, tmp_path: Path) -> None:
    info = executor_for(registered_stepper)
    assert info is not None
    ctx = context(tmp_path, payload={"block": True})
    threading.Timer(0.3, ctx.cancel_event.set).start()
    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        info.cls().run(ctx)
    assert time.monotonic() - started < 3


# --- through a real orchestrator and worker -----------------------------------------------------------


def test_plugin_tasks_run_beside_a_native_executor_in_one_worker(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1, topics="tasks.*")
    client = client_for(cluster)
    assert {"seed_one_echo", "seed_two_wordcount", "echo"} <= set(client.worker("local-1")["task_types"])

    seed_one = client.submit(task_yaml("seed_one_echo", name="greeting", message="hello"))
    wordcount = client.submit(task_yaml("seed_two_wordcount", lines=LINES, pause_sec=0.5))
    native = client.submit(b"taskType: echo\npayload: {n: 7}\n")

    seen: list[tuple[float, float]] = []  # (step, total) as the API showed them while the module ran

    def watch(record: dict[str, Any]) -> bool:
        progress = record.get("progress")
        if progress and (progress["step"], progress["total"]) not in seen:
            seen.append((progress["step"], progress["total"]))
        return record["state"] in TERMINAL

    done = wait_until(client, wordcount["task_id"], watch, 60)
    assert done["state"] == "succeeded", done
    records = {
        name: client.wait(answer["task_id"], timeout=60)
        for name, answer in (("seed_one", seed_one), ("native", native))
    }
    assert all(r["state"] == "succeeded" for r in records.values()), records
    assert {done["worker_id"], *(r["worker_id"] for r in records.values())} == {"local-1"}

    results = cluster.results_dir
    assert results is not None
    written = json.loads((results / seed_one["task_id"] / "responses.json").read_text())
    assert written == {
        "ok": True,
        "message": "Task completed",
        "echo": "hello",
        "task_name": "greeting",
        "out_dir": seed_one["task_id"],
    }
    assert client.result(seed_one["task_id"]) == written

    counted = json.loads((results / wordcount["task_id"] / "responses.json").read_text())
    assert counted["words"] == 11 and counted["counts"]["the"] == 3
    assert counted["task_id"] == wordcount["task_id"]
    assert done["progress"]["step"] == 3 and done["progress"]["total"] == 3
    assert done["progress"]["message"] == "counted line 3"
    assert len(seen) >= 2 and seen == sorted(seen), seen
    lines = [line["text"] for line in client.logs(wordcount["task_id"])["lines"]]
    assert [line for line in lines if line.startswith("line ")] == [
        "line 1/3: 4 words",
        "line 2/3: 5 words",
        "line 3/3: 2 words",
    ]

    assert client.result(native["task_id"])["payload"] == {"n": 7}


def test_plugin_failures_and_cancellation_end_their_tasks(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)

    failing = client.submit(task_yaml("seed_one_echo", fail="the input bucket is empty; upload data first"))
    empty = client.submit(task_yaml("seed_two_wordcount", lines=[]))
    for answer, message in (
        (failing, "the input bucket is empty; upload data first"),
        (empty, "hyperparameters.lines is empty; give at least one line of text to count"),
    ):
        record = client.wait(answer["task_id"], timeout=60)
        assert record["state"] == "failed" and record["reason_code"] == "executor_error", record
        assert record["reason"] == message

    slow = client.submit(task_yaml("seed_two_wordcount", lines=LINES, pause_sec=60))
    wait_until(client, slow["task_id"], lambda r: (r.get("progress") or {}).get("step") == 1, 60)
    asked = time.monotonic()
    client.cancel(slow["task_id"])
    record = client.wait(slow["task_id"], timeout=30)
    assert record["state"] == "cancelled", record
    # Sooner than MLOC_CANCEL_GRACE_SEC (10 s), after which the executor process would be killed; and
    # the module's own handler ran, which a killed process could not have logged.
    assert time.monotonic() - asked < 8
    lines = [line["text"] for line in client.logs(slow["task_id"])["lines"]]
    assert "cancelled after 4 words" in lines
