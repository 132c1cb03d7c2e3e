"""Which spec model validates which ``taskType``; third-party task types plug in by entry point.

A task type some installed executor serves without a spec model of its own (the seeds' plug-in forms
add only code) is validated by the generic :mod:`mloc.spec.plugin` model, so it can be submitted
wherever the plug-in is installed.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from mloc.spec.agent import AgentSpec
from mloc.spec.base import Document, SpecBase
from mloc.spec.echo import EchoSpec
from mloc.spec.eval import EvalSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.plugin import plugin_spec
from mloc.spec.rag import RagSpec
from mloc.spec.train import DPOSpec, GRPOSpec, PPOSpec, SFTSpec

ENTRY_POINT_GROUP = "mloc.task_specs"

BUILTIN: dict[str, type[SpecBase]] = {
    "inference": InferenceSpec,
    "sft": SFTSpec,
    "ppo": PPOSpec,
    "dpo": DPOSpec,
    "grpo": GRPOSpec,
    "rag_inference": RagSpec,
    "agent_inference": AgentSpec,
    "echo": EchoSpec,
    "eval": EvalSpec,
}


@functools.cache
def spec_types() -> dict[str, type[SpecBase]]:
    """All known task types: the built-ins, ``mloc.task_specs`` entry points, then the task types of
    installed executors that have no spec model (validated by the generic plug-in spec)."""
    types = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in types:
            cls = ep.load()
            if isinstance(cls, type) and issubclass(cls, SpecBase):
                types[ep.name] = cls
    for task_type in _executor_task_types():
        if task_type not in types:
            types[task_type] = plugin_spec(task_type)
    return types


def _executor_task_types() -> list[str]:
    # Imported here, not at the top: executors are built on the spec models, so loading them while the
    # spec package itself loads would be circular.
    from mloc.executors.registry import discover

    return sorted(discover())


@functools.cache
def document_model(task_type: str) -> type[Document]:
    """The envelope model whose ``spec`` is this task type's spec."""
    spec_cls = spec_types()[task_type]
    return type(
        f"{spec_cls.kind}Document",
        (Document,),
        {"__annotations__": {"spec": spec_cls}, "__module__": __name__},
    )


def kinds() -> dict[str, str]:
    """kind -> taskType."""
    return {cls.kind: name for name, cls in spec_types().items()}
