"""Task modules, the second seed's plug-in form: a :class:`BaseModule` per task type.

Register one as the seed shows, in this file::

    from .my_module import MyModule

    MODULE_REGISTRY[TaskType.MY_TASK] = MyModule

(add ``MY_TASK = "my_task"`` to :class:`TaskType`, or use the plain string as the key). A module in a
separate package registers instead by an entry point in the ``mloc.executors`` group whose name is
the task type and whose target is the module class, exactly as an executor does. Either way the
executor registry serves the module through a bridging executor, so workers find it like any other.
"""

from __future__ import annotations

from enum import StrEnum

from mloc.modules.base_module import BaseModule, ProgressCallback


class TaskType(StrEnum):
    """The task types MLOC ships; a module's task type may be one of these or any plain string."""

    INFERENCE = "inference"
    SFT = "sft"
    PPO = "ppo"
    DPO = "dpo"
    GRPO = "grpo"
    RAG_INFERENCE = "rag_inference"
    AGENT_INFERENCE = "agent_inference"
    ECHO = "echo"
    EVAL = "eval"


# task type -> module class. Read by the executor registry when it first looks for executors; a
# built-in executor of the same task type takes precedence.
MODULE_REGISTRY: dict[str, type[BaseModule]] = {}

__all__ = ["MODULE_REGISTRY", "BaseModule", "ProgressCallback", "TaskType"]
