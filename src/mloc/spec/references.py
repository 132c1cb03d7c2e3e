"""References from a task to another task's outputs: where a spec names them, whether the named task
will make that output, and the form the workers read once the name is an id.

============  ====================================  ==============================  ===============================
output        written as                            made by                         stored as
============  ====================================  ==============================  ===============================
adapter       ``model.adapter.from``                sft, dpo, grpo, ppo             ``model.adapter.path: <id>``
merged model  ``model.source.from``                 the same, with                  ``model.source: {type: task,
                                                    ``hyperparameters.merge_adapter``  identifier: <id>}``
result lines  ``inference.input.from``,             an inference task over a        ``...input.task: <id>``
              ``input.from`` (RAG questions), or    dataset (``inference.input``)
              ``...input.task`` (an id)
collection    ``hyperparameters.collection.from``   a rag_inference task with a     ``hyperparameters.collection``:
                                                    named collection                its name (and its vector_db,
                                                                                    embedding_model)
              ``hyperparameters.retriever_``        the same                        ``retriever_collection`` (and
              ``collection.from`` (an agent)                                        ``retriever_vector_db``)
eval scores   ``when.from``, ``when.beats``         eval                            the same fields, as ids
============  ====================================  ==============================  ===============================

The task that refers waits for the one it names. A collection lives on the disk of the worker that
indexed it, so the orchestrator adds to the waiting task's placement the vector store that worker
advertised (:func:`mloc.orchestrator.pipelines.needs_at_release`); models and result lines are read through
the results dir or the artifact store, as an id given by hand is. Nothing here needs a server: the
orchestrator plans a submission with these rules and `mloc validate` checks a file with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mloc.spec.base import Document


class Output(StrEnum):
    ADAPTER = "adapter"
    MERGED_MODEL = "merged model"
    LINES = "result lines"
    COLLECTION = "vector collection"
    SCORES = "eval scores"


TRAINING = frozenset({"sft", "dpo", "grpo", "ppo"})
MAKERS: dict[Output, frozenset[str]] = {
    Output.ADAPTER: TRAINING,
    Output.MERGED_MODEL: TRAINING,
    Output.LINES: frozenset({"inference"}),
    Output.COLLECTION: frozenset({"rag_inference"}),
    Output.SCORES: frozenset({"eval"}),
}


@dataclass(frozen=True)
class Reference:
    where: str  # the field as the user wrote it, e.g. "spec.model.adapter.from"
    entry: str  # a task name of the same submission, or an id
    output: Output


@dataclass(frozen=True)
class Producer:
    """What is known of the task a reference names before it has run (or after, for an existing task)."""

    task_type: str
    spec: dict[str, Any]  # its spec, wire form
    state: str | None = None  # an existing task's state; None for a task of the same submission
    artifacts: dict[str, Any] | None = None  # an existing task's recorded artifacts

    @classmethod
    def stored(cls, h: dict[str, str]) -> Producer:
        """From an existing task's record."""
        document = json.loads(h.get("spec") or "{}")
        return cls(
            h.get("task_type", ""), document.get("spec") or {}, h.get("state"), json.loads(h.get("artifacts") or "{}")
        )


def find(wire: dict[str, Any]) -> list[Reference]:
    """A task's references to other tasks' outputs (its wire form)."""
    spec = wire.get("spec") or {}
    model = spec.get("model") or {}
    found = []
    if ((model.get("adapter")) or {}).get("from"):
        found.append(Reference("spec.model.adapter.from", model["adapter"]["from"], Output.ADAPTER))
    if ((model.get("source")) or {}).get("from"):
        found.append(Reference("spec.model.source.from", model["source"]["from"], Output.MERGED_MODEL))
    for where, source in (
        ("spec.inference.input", ((spec.get("inference") or {}).get("input")) or {}),
        ("spec.input", spec.get("input") or {}),  # a RAG task's questions
    ):
        # An id given as `task` is a reference as `from` is: checked at submit, and waited for.
        for part in ("from", "task"):
            if isinstance(source, dict) and source.get(part):
                found.append(Reference(f"{where}.{part}", source[part], Output.LINES))
    collection = (spec.get("hyperparameters") or {}).get("collection_from")
    if spec.get("taskType") == "rag_inference" and collection:
        found.append(Reference("spec.hyperparameters.collection.from", collection, Output.COLLECTION))
    searched = (spec.get("hyperparameters") or {}).get("retriever_collection_from")
    if spec.get("taskType") == "agent_inference" and searched:
        found.append(Reference("spec.hyperparameters.retriever_collection.from", searched, Output.COLLECTION))
    when = spec.get("when") or {}
    for part in ("from", "beats"):
        if when.get(part):
            found.append(Reference(f"spec.when.{part}", when[part], Output.SCORES))
    return found


def problem(reference: Reference, entry: str, producer: Producer, child: Document) -> str | None:
    """Why the task ``entry`` names will not have the output ``reference`` wants, with the fix; None
    when it will."""
    output = reference.output
    makers = MAKERS[output]
    if producer.task_type not in makers:
        return (
            f"{entry!r} is a task of type {producer.task_type or 'unknown'!r}, which makes no {output}; name "
            f"{_a(' or '.join(sorted(makers)))} task"
            + (
                " that merges its adapter (hyperparameters.merge_adapter: true)"
                if output == Output.MERGED_MODEL
                else ""
            )
        )
    spec = producer.spec
    if output == Output.MERGED_MODEL:
        return _merged_model(entry, producer)
    if output == Output.LINES and not ((spec.get("inference") or {}).get("input")):
        return f"{entry!r} runs inline prompts and writes no result lines; give it inference.input"
    if output == Output.COLLECTION:
        return _collection(entry, spec, child)
    if output == Output.SCORES:
        return _scores(entry, spec, child)
    return None


def _a(words: str) -> str:
    return f"{'an' if words[:1] in tuple('aeiou') else 'a'} {words}"


def _merged_model(entry: str, producer: Producer) -> str | None:
    if producer.state == "succeeded":
        if (producer.artifacts or {}).get("merged_model"):
            return None
        return (
            f"task {entry} finished without a merged model (it did not set hyperparameters.merge_adapter); "
            "load its adapter with model.adapter.from instead, or train again with merge_adapter: true"
        )
    if not (producer.spec.get("hyperparameters") or {}).get("merge_adapter"):
        return (
            f"{entry!r} does not merge its adapter, so it makes no merged model; set hyperparameters.merge_adapter: "
            "true on it, or load its adapter with model.adapter.from"
        )
    return None


def _collection(entry: str, spec: dict[str, Any], child: Document) -> str | None:
    options = spec.get("hyperparameters") or {}
    if not options.get("collection"):
        return (
            f"{entry!r} indexes into a temporary collection that ends with it; give it hyperparameters.collection "
            "(a name) so later tasks can use the collection"
        )
    mine = getattr(child.spec, "hyperparameters", None)
    given = mine.model_fields_set if mine is not None else set()
    # An agent's retriever names the store as retriever_vector_db and reads the embedder from the collection.
    fields = _AGENT_FIELDS if child.spec.task_type == "agent_inference" else _RAG_FIELDS
    for field, theirs_field in fields:
        theirs = options.get(theirs_field)
        if field in given and theirs is not None and getattr(mine, field) != theirs:
            return (
                f"hyperparameters.{field} {getattr(mine, field)!r} differs from {theirs!r}, which {entry!r} builds "
                f"its collection with; remove {field} (the collection's own is taken)"
            )
    return None


# The child's field, the indexing task's field it must agree with.
_RAG_FIELDS = (("vector_db", "vector_db"), ("embedding_model", "embedding_model"))
_AGENT_FIELDS = (("retriever_vector_db", "vector_db"),)


def _scores(entry: str, spec: dict[str, Any], child: Document) -> str | None:
    """The eval task must score the task ``when.score`` names, with that metric where MLOC knows it."""
    condition = child.spec.when
    if condition is None:
        return None
    options = spec.get("eval") or {}
    custom = {task["name"]: task for task in options.get("custom") or []}
    harness = options.get("tasks") or []
    if condition.task in custom:
        from mloc.spec.eval import CustomTask

        metrics = CustomTask.model_validate(custom[condition.task]).score_names()
        if condition.metric not in metrics:
            return (
                f"{entry!r} scores {condition.task} by {', '.join(metrics)}, not {condition.metric!r}; write "
                f"when.score as '{condition.task}/{metrics[0]}'"
            )
        return None
    # A harness task may be a group, whose subtasks have scores of their own: those names are not known here.
    if not harness:
        return (
            f"{entry!r} scores {', '.join(custom) or 'nothing'}, not {condition.task!r}; write when.score as "
            "'<one of those>/<metric>'"
        )
    return None


def rewrite(wire: dict[str, Any], reference: Reference, task_id: str, producer: Producer) -> None:
    """Replace the reference with the id (and what the workers read) in the wire form."""
    spec = wire["spec"]
    if reference.output == Output.ADAPTER:
        adapter = spec["model"]["adapter"]
        adapter.pop("from")
        adapter["path"] = task_id
    elif reference.output == Output.MERGED_MODEL:
        spec["model"]["source"] = {"type": "task", "identifier": task_id}
    elif reference.output == Output.LINES:
        source = spec["input"] if reference.where.startswith("spec.input.") else spec["inference"]["input"]
        source.pop("from", None)
        source["task"] = task_id
    elif reference.output == Output.COLLECTION:
        options, theirs = spec["hyperparameters"], producer.spec.get("hyperparameters") or {}
        agent = spec.get("taskType") == "agent_inference"
        options.pop("retriever_collection_from" if agent else "collection_from")
        options["retriever_collection" if agent else "collection"] = theirs["collection"]
        for field, theirs_field in _AGENT_FIELDS if agent else _RAG_FIELDS:
            if theirs.get(theirs_field) is not None:
                options[field] = theirs[theirs_field]
    else:
        spec["when"][reference.where.rsplit(".", 1)[1]] = task_id
