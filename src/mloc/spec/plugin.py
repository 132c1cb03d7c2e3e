"""The spec of a task type that a plug-in executor or module serves without a spec model of its own.

Both seeds' plug-in forms add a task type by adding code that runs it, nothing more; such a task is
validated by this generic model: the fields every task has, an optional ``model`` and free-form
``hyperparameters`` handed to the plug-in as they are. A plug-in that wants its settings checked
ships a :class:`~mloc.spec.base.SpecBase` subclass under the ``mloc.task_specs`` entry-point group,
which takes precedence; built-in task types keep their own models.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field

from mloc.spec.base import ModelSpec, SpecBase


class PluginSpec(SpecBase):
    """A plug-in task: common fields, an optional model and the plug-in's own settings."""

    kind: ClassVar[str] = "Task"
    model: ModelSpec | None = Field(None, description="The model the plug-in uses, if any.")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="The plug-in's settings, passed to it unchecked."
    )


def kind_for(task_type: str) -> str:
    """``seed_two_wordcount`` -> ``SeedTwoWordcountTask``, in the style of the built-in kinds."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", task_type) if word]
    return "".join(word[:1].upper() + word[1:] for word in words) + "Task"


def plugin_spec(task_type: str) -> type[PluginSpec]:
    """A :class:`PluginSpec` subclass whose ``taskType`` can only be ``task_type``."""
    kind = kind_for(task_type)
    return type(
        f"{kind}Spec",
        (PluginSpec,),
        {
            "__annotations__": {"task_type": Literal[task_type]},
            "task_type": Field(..., alias="taskType"),
            "kind": kind,
            "__module__": __name__,
        },
    )
