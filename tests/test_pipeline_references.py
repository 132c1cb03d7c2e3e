"""References to every output a task makes, at planning (real orchestrator code on the test Redis):
a merged model, a vector collection and eval scores named by task, rewritten to ids the workers read;
each reference to an output the named task will not have refused whole, naming the task, the output
and the fix. And the eval harness check at submit: workers advertise the harness tasks whose data they
hold, and a task naming others is refused while eval workers are registered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from mloc import keys
from mloc.client import ApiError, Client
from mloc.errors import SpecError
from mloc.executors.eval_data import available, cache_folder, cached_builds
from mloc.localcluster import LocalCluster
from mloc.orchestrator import harness, pipelines
from mloc.orchestrator.orchestrator import Orchestrator
from mloc.orchestrator.placement import explain, request_of
from mloc.orchestrator.users import Principal
from mloc.records import WorkerStatus, WorkerView
from mloc.settings import Settings
from mloc.spec import Document, validate

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}


def document(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mloc/v1", "kind": "Task", "metadata": {"name": name}, "spec": spec}


def sft(name: str, *, merge: bool = True) -> dict[str, Any]:
    return document(
        name,
        {
            "taskType": "sft",
            "model": {"source": TINY["source"]},
            "dataset": {"examples": [{"prompt": "a", "completion": "b"}]},
            "hyperparameters": {"max_steps": 1, "merge_adapter": merge},
        },
    )


def infer(name: str, model: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return document(name, {"taskType": "inference", "model": model, "inference": {"prompts": ["x"]}, **extra})


def evaluate(name: str, custom: str = "arith", kind: str = "multiple_choice", **model: Any) -> dict[str, Any]:
    options = {"custom": [{"name": custom, "path": "/data/arith.jsonl", "type": kind}]}
    return document(name, {"taskType": "eval", "model": {**TINY, **model}, "eval": options})


def rag(name: str, **options: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"taskType": "rag_inference", "model": TINY, "questions": ["q?"], "hyperparameters": options}
    if "collection" not in options or isinstance(options["collection"], str):
        spec["documents"] = [{"text": "MLOC schedules tasks.", "metadata": {"source": "intro"}}]
    return document(name, spec)


def agent(name: str, **options: Any) -> dict[str, Any]:
    spec = {"taskType": "agent_inference", "model": TINY, "input": "When is lunch?",
            "hyperparameters": {"tools": ["retriever"], **options}}  # fmt: skip
    return document(name, spec)


def echo(name: str, **extra: Any) -> dict[str, Any]:
    return document(name, {"taskType": "echo", "payload": name, **extra})


def submit(redis_url: str, documents: list[dict[str, Any]], who: str = "alice", admin: bool = True) -> Any:
    async def run() -> Any:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await Orchestrator(r, Settings()).submit_graph(
                [validate(d) for d in documents], Principal(who, admin=admin)
            )
        finally:
            await r.aclose()

    return asyncio.run(run())


def stored(sync_redis: redis.Redis, task_id: str) -> Document:
    return validate(json.loads(sync_redis.hget(keys.task(task_id), "spec") or "{}"))


@pytest.mark.parametrize(
    ("documents", "where", "expected"),
    [
        (
            [sft("tune", merge=False), infer("use", {"source": {"from": "tune"}})],
            "spec.model.source.from",
            "'tune' does not merge its adapter, so it makes no merged model; set hyperparameters.merge_adapter: true "
            "on it, or load its adapter with model.adapter.from",
        ),
        (
            [evaluate("ev"), infer("use", {"source": {"from": "ev"}})],
            "spec.model.source.from",
            "'ev' is a task of type 'eval', which makes no merged model; name a dpo or grpo or ppo or sft task that "
            "merges its adapter",
        ),
        (
            [evaluate("ev"), infer("use", {**TINY, "adapter": {"from": "ev"}})],
            "spec.model.adapter.from",
            "'ev' is a task of type 'eval', which makes no adapter; name a dpo or grpo or ppo or sft task",
        ),
        (
            [infer("gen", TINY), rag("ask", collection={"from": "gen"})],
            "spec.hyperparameters.collection.from",
            "'gen' is a task of type 'inference', which makes no vector collection; name a rag_inference task",
        ),
        (
            [rag("index"), rag("ask", collection={"from": "index"})],
            "spec.hyperparameters.collection.from",
            "'index' indexes into a temporary collection that ends with it; give it hyperparameters.collection",
        ),
        (
            [rag("index", collection="handbook"), rag("ask", collection={"from": "index"}, vector_db="faiss")],
            "spec.hyperparameters.collection.from",
            "hyperparameters.vector_db 'faiss' differs from 'chromadb', which 'index' builds its collection with",
        ),
        (
            [
                rag("index", collection="handbook"),
                agent("search", retriever_collection={"from": "index"}, retriever_vector_db="faiss"),
            ],
            "spec.hyperparameters.retriever_collection.from",
            "hyperparameters.retriever_vector_db 'faiss' differs from 'chromadb', which 'index' builds its collection",
        ),
        (
            [infer("gen", TINY), agent("search", retriever_collection={"from": "gen"})],
            "spec.hyperparameters.retriever_collection.from",
            "'gen' is a task of type 'inference', which makes no vector collection; name a rag_inference task",
        ),
        (
            [sft("tune"), echo("gate", when={"from": "tune", "score": "arith/acc", "min": 0.5})],
            "spec.when.from",
            "'tune' is a task of type 'sft', which makes no eval scores; name an eval task",
        ),
        (
            [evaluate("ev"), echo("gate", when={"from": "ev", "score": "arth/acc", "min": 0.5})],
            "spec.when.from",
            "'ev' scores arith, not 'arth'; write when.score as '<one of those>/<metric>'",
        ),
        (
            [evaluate("ev"), echo("gate", when={"from": "ev", "score": "arith/bleu", "min": 0.5})],
            "spec.when.from",
            "'ev' scores arith by acc, acc_norm, not 'bleu'; write when.score as 'arith/acc'",
        ),
        (
            [
                evaluate("ev"),
                evaluate("other", custom="words", kind="exact_match"),
                echo("gate", when={"from": "ev", "score": "arith/acc", "beats": "other"}),
            ],
            "spec.when.beats",
            "'other' scores words, not 'arith'",
        ),
    ],
)
def test_a_reference_to_an_output_the_task_will_not_have_is_refused_whole(
    redis_url: str, sync_redis: redis.Redis, documents: list[dict[str, Any]], where: str, expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        submit(redis_url, documents)
    assert f"task {len(documents)} of the submission: {where}: {expected}" in caught.value.message
    assert caught.value.message.endswith("nothing was stored")
    assert caught.value.details[0]["path"] == where
    assert sync_redis.zcard(keys.TASKS_ALL) == 0


def test_references_to_a_merged_model_a_collection_and_scores_become_ids(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    documents = [
        sft("tune"),
        infer("merged", {"source": {"from": "tune"}, "engine": "transformers"}),
        rag("index", collection="handbook", embedding_model="all-MiniLM-L6-v2", vector_db="faiss"),
        rag("ask", collection={"from": "index"}),
        evaluate("base"),
        evaluate("tuned", source={"from": "tune"}),
        echo("gate", when={"from": "tuned", "score": "arith/acc", "beats": "base"}),
        agent("search", retriever_collection={"from": "index"}),
    ]
    answer = submit(redis_url, documents)
    ids = {task["name"]: task["task_id"] for task in answer["tasks"]}
    depends = {task["name"]: task["depends_on"] for task in answer["tasks"]}
    merged = stored(sync_redis, ids["merged"]).spec.model  # type: ignore[attr-defined]
    assert (merged.source.type, merged.source.identifier, merged.source.from_) == ("task", ids["tune"], None)
    assert depends["merged"] == [ids["tune"]] and depends["tuned"] == [ids["tune"]]
    # The collection is named as the task that indexes it names it, with its store and embedder.
    options = stored(sync_redis, ids["ask"]).spec.hyperparameters  # type: ignore[attr-defined]
    assert (options.collection, options.collection_from, options.vector_db, options.embedding_model) == (
        "handbook",
        None,
        "faiss",
        "all-MiniLM-L6-v2",
    )
    assert depends["ask"] == [ids["index"]]
    # An agent's retriever searches it the same way, in the store it was built in.
    searched = stored(sync_redis, ids["search"]).spec.hyperparameters  # type: ignore[attr-defined]
    assert (searched.retriever_collection, searched.retriever_collection_from, searched.retriever_vector_db) == (
        "handbook",
        None,
        "faiss",
    )
    assert depends["search"] == [ids["index"]]
    when = stored(sync_redis, ids["gate"]).spec.when
    assert when is not None and (when.from_, when.beats) == (ids["tuned"], ids["base"])
    assert depends["gate"] == [ids["tuned"], ids["base"]]
    waiting = json.loads(sync_redis.hget(keys.task(ids["gate"]), "waiting_on") or "[]")
    assert waiting == [ids["tuned"], ids["base"]]
    # The placement request is the rewritten task's.
    request = json.loads(sync_redis.hget(keys.task(ids["merged"]), "req") or "{}")
    assert request["model"] == ids["tune"]


def test_an_existing_task_is_checked_by_what_it_made_and_whose_it_is(redis_url: str, sync_redis: redis.Redis) -> None:
    # Alice's, submitted with the admin's token (the eval's data file is outside alice's folders).
    tune = submit(redis_url, [sft("tune", merge=False)])["tasks"][0]["task_id"]
    evaluation = submit(redis_url, [evaluate("ev")])["tasks"][0]["task_id"]
    before = sync_redis.zcard(keys.TASKS_ALL)
    with pytest.raises(SpecError, match=f"'{tune}' does not merge its adapter"):
        submit(redis_url, [infer("use", {"source": {"from": tune}})], admin=False)
    # A training task that ended without merging: the artifacts on its record say so.
    sync_redis.hset(keys.task(tune), mapping={"state": "succeeded", "artifacts": json.dumps({"adapter": {}})})
    with pytest.raises(SpecError, match=f"task {tune} finished without a merged model"):
        submit(redis_url, [infer("use", {"source": {"from": tune}})], admin=False)
    with pytest.raises(SpecError, match="nor a task id of yours"):
        submit(
            redis_url, [echo("gate", when={"from": evaluation, "score": "arith/acc", "min": 0})], who="bob", admin=False
        )
    assert sync_redis.zcard(keys.TASKS_ALL) == before


# ------------------------------------------------------------------------------------- harness data
def eval_view(worker_id: str, harness_tasks: list[str], *, task_types: tuple[str, ...] = ("eval",)) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        status=WorkerStatus.ACTIVE,
        last_heartbeat=0.0,
        topics=["tasks.*"],
        tags=set(),
        task_types=set(task_types),
        capabilities={"eval": {"engines": ["transformers"], "harness_tasks": harness_tasks}},
        gpus=[],
        cpu_total=4000,
        mem_total=8 << 30,
        slots_total=2,
        cpu_free=4000,
        mem_free=8 << 30,
        slots_free=2,
        free_gpus=set(),
    )


def harness_task(*names: str) -> Document:
    return validate(document("ev", {"taskType": "eval", "model": TINY, "eval": {"tasks": list(names)}}))


def test_a_harness_task_no_eval_worker_holds_is_refused_naming_it_and_the_fix() -> None:
    views = [eval_view("w1", ["hellaswag"]), eval_view("w2", ["arc_easy"])]
    harness.check(harness_task("hellaswag"), views)
    with pytest.raises(SpecError) as caught:
        harness.check(harness_task("hellaswag", "piqa"), views)
    message = caught.value.message
    assert message.startswith(
        "spec.eval.tasks: no registered worker can run this task: no worker holds the data of harness task(s) 'piqa' "
        "(workers that run eval tasks, with the harness data they hold: w1: hellaswag, w2: arc_easy); to fix: cache it: "
    )
    assert "TaskManager().load(['piqa'])" in message and message.endswith("nothing was stored")
    assert caught.value.details[0]["path"] == "spec.eval.tasks[1]"
    with pytest.raises(SpecError, match="no one worker holds the data of all of 'hellaswag', 'arc_easy'"):
        harness.check(harness_task("hellaswag", "arc_easy"), views)
    # No eval worker registered yet (only one without the executor): the task may wait for one.
    harness.check(harness_task("piqa"), [eval_view("w3", [], task_types=("inference",))])
    # Placement needs the data like a capability: the reason names it and how to cache it.
    reason, never = explain(request_of(harness_task("piqa")), [eval_view("w1", ["hellaswag"])])
    assert never and "1 has no piqa harness task data (w1: has hellaswag)" in reason
    assert "to fix: cache the data of harness task 'piqa'" in reason


def test_the_cached_datasets_name_the_harness_tasks_a_worker_advertises(tmp_path: Path) -> None:
    for build in ("Rowan___hellaswag/default/0.0.0/1a2b", "cais___mmlu/abstract_algebra/0.0.0/3c4d"):
        (tmp_path / build).mkdir(parents=True)
    (tmp_path / "cais___mmlu" / "anatomy").mkdir()  # a config folder with no build in it
    (tmp_path / "downloads" / "x" / "y" / "z").mkdir(parents=True)
    # What custom eval tasks leave: builds of local files, which are no hub dataset.
    (tmp_path / "json" / "default-1958e939" / "0.0.0" / "d78d5935").mkdir(parents=True)
    builds = cached_builds(tmp_path)
    assert builds == {"Rowan___hellaswag/default", "cais___mmlu/abstract_algebra"}
    assert cache_folder("allenai/ai2_arc") == "allenai___ai2_arc" and cache_folder("EleutherAI/ARCChallenge") == (
        "EleutherAI___arc_challenge"
    )
    catalogue: dict[str, dict[str, list[Any]]] = {
        "hellaswag": {"data": [["Rowan/hellaswag", None]]},
        "mmlu_abstract_algebra": {"data": [["cais/mmlu", "abstract_algebra"]]},
        "mmlu_anatomy": {"data": [["cais/mmlu", "anatomy"]]},
        "mmlu_math": {"members": ["mmlu_abstract_algebra"]},
        "mmlu": {"members": ["mmlu_math", "mmlu_anatomy"]},
        "local": {"data": [[str(tmp_path / "cais___mmlu"), None]]},
        "loop": {"members": ["loop"]},
        "arithmetic_1dc": {"data": [["json", None]]},  # files read through the json builder
    }
    assert available(catalogue, builds) == ["hellaswag", "local", "mmlu_abstract_algebra", "mmlu_math"]


def test_a_gate_is_decided_on_the_scores_stored_with_the_eval_tasks(redis_url: str, sync_redis: redis.Redis) -> None:
    from mloc.orchestrator.conditions import decide
    from mloc.store import TaskStore

    scores = {"a": {"scores": {"arith": {"acc": 0.5, "acc_stderr": 0.1}}}, "b": {"scores": {"arith": {"acc": 0.75}}}}
    for task_id, result in scores.items():
        sync_redis.set(keys.task_result(task_id), json.dumps(result))
    names = {"a": "base", "b": "tuned"}

    async def verdict(**when: Any) -> Any:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await decide(TaskStore(r), when, names)
        finally:
            await r.aclose()

    passed = asyncio.run(verdict(**{"from": "b", "score": "arith/acc", "beats": "a", "min": 0.7}))
    assert (
        passed.run
        and passed.reason == "condition met: tuned (b)'s arith/acc is 0.75, at least min 0.7 against 0.5 of base (a)"
    )
    lost = asyncio.run(verdict(**{"from": "a", "score": "arith/acc", "beats": "b", "max": 0.4}))
    assert (lost.run, lost.skip) == (False, True)
    assert lost.reason == "skipped: base (a)'s arith/acc is 0.5, above max 0.4 and does not beat tuned (b)'s 0.75"
    lower = asyncio.run(verdict(**{"from": "a", "score": "arith/acc", "beats": "b", "lower_is_better": True}))
    assert lower.run
    unknown = asyncio.run(verdict(**{"from": "a", "score": "arith/f1", "min": 0}))
    assert (unknown.run, unknown.skip) == (False, False)
    assert unknown.reason == (
        "failed: base (a) has no such metric for arith/f1 (its arith metrics: acc); fix when.score and submit again"
    )
    assert asyncio.run(verdict()) is None


def test_a_task_searching_a_collection_is_placed_where_the_collection_was_built(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    index = "0f8c2b7e-1d2a-4c3b-9e4f-5a6b7c8d9e0f"
    summary = {"collection": "handbook", "vector_db": "faiss", "vector_store": "host-a:/vectors"}
    sync_redis.hset(keys.task(index), mapping={"task_type": "rag_inference", "result_summary": json.dumps(summary)})

    def needs(spec: dict[str, Any]) -> list[tuple[str, str]]:
        async def run() -> list[tuple[str, str]]:
            r = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                return await pipelines.needs_at_release(r, spec, [index])
            finally:
                await r.aclose()

        return asyncio.run(run())

    searching = {"retriever_collection": "handbook", "retriever_vector_db": "faiss"}
    assert needs({"taskType": "agent_inference", "hyperparameters": searching}) == [
        (pipelines.VECTOR_STORES, "host-a:/vectors")
    ]
    assert needs({"taskType": "rag_inference", "hyperparameters": {"collection": "handbook", "vector_db": "faiss"}})
    # Another store's collection of that name is not the one built there.
    other = {**searching, "retriever_vector_db": "chromadb"}
    assert needs({"taskType": "agent_inference", "hyperparameters": other}) == []
    assert needs({"taskType": "inference", "hyperparameters": searching}) == []


@pytest.mark.parametrize(
    ("document_", "expected"),
    [
        (rag("ask", collection={"from": "index", "name": "x"}), "hyperparameters.collection is a name, or {from:"),
        (rag("ask", collection={"from": "index"}, collection_from="other"), "collection.from and collection_from"),
        (agent("search", retriever_collection={"task": "index"}), "got keys task"),
        (agent("search", retriever_collection="handbook", retriever_collection_from="index"), "keep one"),
    ],
    ids=["rag-extra-key", "rag-both", "agent-wrong-key", "agent-both"],
)
def test_a_collection_reference_written_wrong_is_refused_naming_the_form(
    document_: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        validate(document_)
    assert expected in caught.value.message


# ------------------------------------------------------------------------------ ids given by hand
def over_rows(name: str, source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return document(name, {"taskType": "inference", "model": TINY, "inference": {"input": source}, **extra})


def test_an_id_given_as_input_task_is_checked_and_waited_for_as_from_is(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    gen = submit(redis_url, [over_rows("gen", {"path": "/data/rows.jsonl"})])["tasks"][0]["task_id"]
    said = submit(redis_url, [over_rows("use", {"task": gen})])["tasks"][0]
    # A task over rows runs as chunks: they wait, not the task that holds them.
    records = [sync_redis.hgetall(keys.task(task_id)) for task_id in sync_redis.zrange(keys.TASKS_ALL, 0, -1)]
    waiting = [record for record in records if record.get("waiting_on")]
    assert [json.loads(record["waiting_on"]) for record in waiting] == [[gen]]
    assert waiting[0]["pending_reason"] == f"waiting for gen ({gen[:8]}) to succeed"
    assert stored(sync_redis, said["task_id"]).spec.inference.input.task == gen  # type: ignore[attr-defined]

    plain = submit(redis_url, [echo("plain")])["tasks"][0]["task_id"]
    before = sync_redis.zcard(keys.TASKS_ALL)
    with pytest.raises(SpecError) as caught:
        submit(redis_url, [over_rows("use", {"task": plain})])
    assert caught.value.message.startswith(
        f"task 1 of the submission: spec.inference.input.task: '{plain}' is a task of type 'echo', which makes no "
        "result lines; name an inference task"
    )
    with pytest.raises(
        SpecError, match=r"spec\.inference\.input\.task: '00000000-0000-4000-8000-000000000000' is neither"
    ):
        submit(redis_url, [over_rows("use", {"task": "00000000-0000-4000-8000-000000000000"})])
    sync_redis.hset(keys.task(gen), "state", "cancelled")
    with pytest.raises(SpecError, match=f"spec.inference.input.task: task {gen} \\(gen\\) cancelled, so this task"):
        submit(redis_url, [over_rows("use", {"task": gen})])
    assert sync_redis.zcard(keys.TASKS_ALL) == before

    # A dry run checks what the submit would.
    async def dry_run(spec: dict[str, Any]) -> Any:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await Orchestrator(r, Settings()).dry_run(validate(spec), Principal("alice", admin=True))
        finally:
            await r.aclose()

    with pytest.raises(SpecError, match=r"spec\.inference\.input\.task: task .* cancelled"):
        asyncio.run(dry_run(over_rows("use", {"task": gen})))


def test_a_short_id_names_the_task_it_starts_and_a_failed_one_is_named_by_the_field_that_named_it(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    first = submit(redis_url, [echo("first")])["tasks"][0]["task_id"]
    after = submit(redis_url, [echo("after", dependsOn=[first[:8]])])["tasks"][0]["task_id"]
    assert stored(sync_redis, after).spec.depends_on == [first]
    assert json.loads(sync_redis.hget(keys.task(after), "waiting_on") or "[]") == [first]
    with pytest.raises(SpecError, match="'ffffffff' is neither a task of this submission"):
        submit(redis_url, [echo("after", dependsOn=["ffffffff"])])

    evaluation = submit(redis_url, [evaluate("ev")])["tasks"][0]["task_id"]
    sync_redis.hset(keys.task(evaluation), "state", "failed")
    with pytest.raises(SpecError) as caught:
        submit(redis_url, [echo("gate", when={"from": evaluation[:8], "score": "arith/acc", "min": 0})])
    assert caught.value.message.startswith(f"task 1 of the submission: spec.when.from: task {evaluation} (ev) failed")


@pytest.mark.extra("inference")
def test_a_short_id_given_as_input_task_is_stored_as_the_full_id_and_read_by_the_worker(
    make_cluster: Callable[..., LocalCluster],
    client_for: Callable[..., Client],
    sync_redis: redis.Redis,
    tmp_path: Path,
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Count: {i}, "}) + "\n" for i in range(3)))
    cluster = make_cluster(1)
    client = client_for(cluster)

    def over(name: str, source: dict[str, Any]) -> dict[str, Any]:
        body = over_rows(name, source)
        body["spec"]["inference"].update(max_tokens=2, temperature=0)
        return body

    gen = client.submit(over("gen", {"path": str(rows), "columns": {"id": "id"}}))["task_id"]
    assert client.wait(gen, timeout=300)["state"] == "succeeded"

    # A random tiny model may answer blanks, which are bad prompts for the next pass: let them through.
    use = client.submit(over("use", {"task": gen[:8], "max_row_errors": 3}))["task_id"]
    done = client.wait(use, timeout=300)
    assert done["state"] == "succeeded", done.get("reason")
    # The task and every chunk a worker ran hold the full id: no worker ever reads the prefix.
    specs = {}
    for task_id in sync_redis.zrange(keys.TASKS_ALL, 0, -1):
        spec = json.loads(sync_redis.hget(keys.task(task_id), "spec") or "{}")["spec"]
        if "task" in spec["inference"]["input"]:
            specs[task_id] = spec["inference"]["input"]["task"]
    assert use in specs and set(specs.values()) == {gen}, specs
    # Its rows were the first task's lines, whose ids it keeps.
    assert [line["id"] for line in client.result_lines(use)] == ["r0", "r1", "r2"]

    with pytest.raises(ApiError) as caught:
        client.submit(over("use", {"task": "ffff0000"}))
    assert caught.value.status_code == 422
    assert caught.value.message == (
        "task 1 of the submission: spec.inference.input.task: 'ffff0000' is neither a task of this submission "
        "(metadata.name: use) nor a task id of yours; name one of them; nothing was stored"
    )
    # A second task whose id starts as gen's does (its index entry is all a prefix look-up reads).
    twin = f"{gen[:8]}-0000-4000-8000-000000000000"
    sync_redis.zadd(keys.TASKS_ALL, {twin: 0})
    try:
        with pytest.raises(ApiError) as caught:
            client.submit(over("use", {"task": gen[:8]}))
    finally:
        sync_redis.zrem(keys.TASKS_ALL, twin)
    assert caught.value.message == (
        f"task 1 of the submission: spec.inference.input.task: '{gen[:8]}' is the start of several task ids "
        f"({', '.join(sorted([gen, twin]))}); give more characters; nothing was stored"
    )
    with pytest.raises(ApiError, match=r"'g3n!' is not a task id; give the id of an inference task over a dataset"):
        client.submit(over("use", {"task": "g3n!"}))
