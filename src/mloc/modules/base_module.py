"""The second seed's plug-in form: a task module whose async ``execute`` does the work.

A module is built once per task from its :class:`~mloc.executors.base.RunContext` and runs through a
bridging executor (:mod:`mloc.modules.bridge`), so it gets the same executor process, result handling,
progress, logs and cancellation as a native executor. Its ``execute`` runs on an asyncio loop of its
own; cancelling the task cancels that coroutine, so ``await`` points are where a module stops.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel

from mloc.executors.base import RunContext
from mloc.spec.base import SpecBase


class ProgressCallback(Protocol):
    """What ``execute`` receives as ``progress_callback``; awaiting its answer is optional."""

    def __call__(self, step: float, total: float | None = None, message: str | None = None) -> Awaitable[None]: ...


class BaseModule(ABC):
    """Base class of a task module. Subclasses implement ``async def execute(self, progress_callback=None)``
    and return the result dict (it becomes responses.json)."""

    # Where the module runs: its own executor process (the default), or a thread of the worker.
    isolation: ClassVar[Literal["inline", "process"]] = "process"
    # Top-level modules it imports; the worker offers its task type only where they exist.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.task_id: str = ctx.task_id
        self.task: dict[str, Any] = ctx.task
        self.spec: SpecBase = ctx.spec
        self.config: dict[str, Any] = _hyperparameters(ctx.spec)
        self.out_dir: Path = ctx.out_dir

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Caught where the module is defined, not when its first task runs.
        if not inspect.iscoroutinefunction(cls.execute):
            raise TypeError(f"{cls.__qualname__}.execute must be 'async def execute(self, progress_callback=None)'")

    @abstractmethod
    async def execute(self, progress_callback: ProgressCallback | None = None) -> dict[str, Any] | None:
        """Do the task; return its result (None counts as an empty result)."""

    def log(self, message: str, level: str = "INFO") -> None:
        """A line in the task's log, readable through the API while it runs."""
        self.ctx.log(message, level)

    def save_json(self, path: Path | str, obj: Any) -> Path:
        """Write JSON atomically; a relative path is taken inside the task's output folder."""
        return self.ctx.save_json(path, obj)


def _hyperparameters(spec: SpecBase) -> dict[str, Any]:
    """The task's ``hyperparameters`` as plain data: the settings seed 2's task files give a module."""
    value = getattr(spec, "hyperparameters", None)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return dict(value) if isinstance(value, dict) else {}
