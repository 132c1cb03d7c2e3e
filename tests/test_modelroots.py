"""Which local folders a user's task may read models from (mloc.modelroots); the whole path, from
submit to the worker, is covered in tests/reliability/test_auth.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import redis.asyncio as aioredis

from mloc import keys
from mloc.modelroots import Kind, ModelRoots, Reference, check_at_submit, check_on_worker, references
from mloc.settings import Settings

TASK = "0f8c2b7e-1d2a-4c3b-9e4f-5a6b7c8d9e0f"


def test_every_place_a_task_can_name_a_model_is_found() -> None:
    spec = {
        "taskType": "ppo",
        "model": {"source": {"type": "local", "identifier": "/m/policy"}, "adapter": {"path": TASK}},
        "hyperparameters": {"reward_model": "/m/reward", "value_model": "org/value"},
    }
    assert references(spec) == [
        Reference("spec.model.source.identifier", "/m/policy", Kind.PATH),
        Reference("spec.model.adapter.path", TASK, Kind.TASK),
        Reference("spec.hyperparameters.reward_model", "/m/reward", Kind.MAYBE),
        Reference("spec.hyperparameters.value_model", "org/value", Kind.MAYBE),
    ]
    hub = {"model": {"source": {"identifier": "org/model"}, "adapter": {"path": "/a/lora"}}}
    assert [(r.kind, r.value) for r in references(hub)] == [(Kind.MAYBE, "org/model"), (Kind.PATH, "/a/lora")]
    assert references({"model": {"source": {"type": "package", "identifier": "gemma3-270m"}}}) == []
    assert references({"taskType": "echo", "payload": {"model": "x"}}) == []
    # An agent's input is its question: text, not a dataset to check (it failed every such task).
    assert references({"taskType": "agent_inference", "input": "What is 17 * 23?"}) == []
    # The dataset an inference task reads: a local file (also as a file:// URL), or another task's lines.
    for path, local in (
        ("/d/rows.jsonl", "/d/rows.jsonl"),
        ("file:///d/rows.csv", "/d/rows.csv"),
        ("rows.csv", "rows.csv"),
    ):
        found = references({"inference": {"input": {"path": path}}})
        assert found == [Reference("spec.inference.input.path", local, Kind.PATH)]
    assert references({"inference": {"input": {"path": "s3://bucket/rows.parquet"}}}) == [
        Reference("spec.inference.input.path", "s3://bucket/rows.parquet", Kind.URL)
    ]
    assert references({"inference": {"input": {"path": "simplecache::/d/x.csv"}}})[0].kind is Kind.PATH
    assert references({"inference": {"input": {"task": TASK}}}) == [
        Reference("spec.inference.input.task", TASK, Kind.TASK)
    ]


def test_a_root_that_holds_the_results_dir_opens_only_the_users_own_results() -> None:
    roots = ModelRoots((Path("/data"),), Path("/data/results"))
    ref = Reference("spec.model.source.identifier", "x", Kind.PATH)
    assert roots.refusal(Path("/data/models/llama"), ref, None, "bob") is None
    assert roots.result_task(Path(f"/data/results/{TASK}/adapter")) == TASK
    assert roots.refusal(Path(f"/data/results/{TASK}/adapter"), ref, "bob", "bob") is None
    refused = roots.refusal(Path(f"/data/results/{TASK}/adapter"), ref, "alice", "bob")
    assert refused is not None and "spec.model.source.identifier" in refused and "your tasks" in refused
    assert roots.refusal(Path("/data/results/shared"), ref, None, "bob") is not None
    outside = roots.refusal(Path("/etc"), ref, None, "bob")
    assert outside is not None and "MLOC_MODEL_ROOTS" in outside


def test_roots_come_from_the_settings_with_the_models_dir_always_in(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "MLOC_MODEL_ROOTS": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b"), ""]),
            "MLOC_HOME": str(tmp_path / "home"),
        }
    )
    roots = ModelRoots.of(settings, results_dir=tmp_path / "results")
    assert roots.roots == (tmp_path / "a", tmp_path / "b", tmp_path / "home" / "models")
    assert roots.results_dir == tmp_path / "results"
    assert ModelRoots.of(Settings.model_validate({"MLOC_HOME": str(tmp_path)})).roots == (tmp_path / "models",)


def test_in_a_remote_artifact_store_a_users_task_reads_only_its_own_tasks_folders(
    redis_url: str, tmp_path: Path
) -> None:
    """The workers read the store with its credentials, and every user's task files are in it."""
    settings = Settings.model_validate({"MLOC_HOME": str(tmp_path), "MLOC_ARTIFACT_STORE": "s3://bucket/mloc/"})
    roots = ModelRoots.of(settings, results_dir=tmp_path / "results")
    assert roots.store == "s3://bucket/mloc"
    # A file:// store is a local folder, which the path rules already cover.
    local = Settings.model_validate({"MLOC_HOME": str(tmp_path), "MLOC_ARTIFACT_STORE": "file:///shared/mloc"})
    assert ModelRoots.of(local).store is None
    alices, bobs = TASK, "1a2b3c4d-0000-4000-8000-000000000001"

    def spec(path: str) -> dict[str, object]:
        return {"taskType": "inference", "inference": {"input": {"path": path}}}

    async def checks() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await r.hset(keys.task(alices), mapping={"owner": "alice"})
            await r.hset(keys.task(bobs), mapping={"owner": "bob"})
            for check in (check_at_submit, check_on_worker):
                own = f"s3://bucket/mloc/{alices}/1/files/results.jsonl"
                assert await check(r, spec(own), "alice", roots) is None
                assert await check(r, spec("s3://elsewhere/mloc/rows.parquet"), "alice", roots) is None
                assert await check(r, spec("s3://bucket/mloc-other/rows.jsonl"), "alice", roots) is None
                for theirs in (
                    f"s3://bucket/mloc/{bobs}/1/files/results.jsonl",
                    f"S3://bucket//mloc/{bobs}/1/files/results.jsonl",  # the same objects, written otherwise
                    "s3://bucket/mloc/files/file-0123.rows.jsonl",  # in the store, in no task's folder
                    "s3://bucket/mloc",
                ):
                    refused = await check(r, spec(theirs), "alice", roots)
                    assert refused is not None, theirs
                    assert refused.startswith("spec.inference.input.path") and "artifact store" in refused
                    assert "inference.input.task" in refused
        finally:
            await r.aclose()

    asyncio.run(checks())
