"""Find executors through the ``mloc.executors`` entry-point group, built-ins and third-party alike."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from mloc.executors.base import Executor

ENTRY_POINT_GROUP = "mloc.executors"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorInfo:
    cls: type[Executor]
    missing: tuple[str, ...]

    @property
    def available(self) -> bool:
        return not self.missing


@functools.cache
def discover() -> dict[str, ExecutorInfo]:
    """task type -> the executor that runs it. Loading a class must not import heavy libraries."""
    found: dict[str, ExecutorInfo] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not stop the worker
            log.warning("executor plug-in %s could not be loaded: %s", ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            log.warning("entry point %s is not an mloc Executor subclass; ignored", ep.value)
            continue
        info = ExecutorInfo(cls, tuple(cls.missing_requirements()))
        for task_type in cls.task_types:
            if task_type in found and found[task_type].available:
                continue
            found[task_type] = info
    return found


def available_task_types() -> list[str]:
    return sorted(task for task, info in discover().items() if info.available)


def executor_for(task_type: str) -> ExecutorInfo | None:
    return discover().get(task_type)


def capabilities() -> dict[str, dict[str, object]]:
    return {task: dict(info.cls.capabilities()) for task, info in discover().items() if info.available}
