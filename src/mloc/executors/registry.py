"""Find executors through the ``mloc.executors`` entry-point group, built-ins and third-party alike.

An entry point names an :class:`Executor` subclass (native ``run(ctx)`` or the first seed's
``run(task, out_dir)``) or a :class:`~mloc.modules.BaseModule` subclass (the second seed's form); the
entry point's name is the task type of a class that declares no ``task_types``. Modules registered in
code, in :data:`mloc.modules.MODULE_REGISTRY`, are served too. Modules are wrapped in a bridging
executor, so everything past this file sees executors only.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from mloc.executors.base import Executor
from mloc.modules import MODULE_REGISTRY, BaseModule
from mloc.modules.bridge import module_executor

ENTRY_POINT_GROUP = "mloc.executors"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorInfo:
    cls: type[Executor]
    missing: tuple[str, ...]

    @property
    def available(self) -> bool:
        return not self.missing


def _as_executor(target: object, entry_name: str) -> type[Executor] | None:
    if isinstance(target, type) and issubclass(target, Executor):
        return target
    if isinstance(target, type) and issubclass(target, BaseModule):
        return module_executor(entry_name, target)
    return None


def _add(found: dict[str, ExecutorInfo], cls: type[Executor], task_types: tuple[str, ...]) -> None:
    info = ExecutorInfo(cls, tuple(cls.missing_requirements()))
    for task_type in task_types:
        if task_type in found and found[task_type].available:
            continue
        found[task_type] = info


@functools.cache
def discover() -> dict[str, ExecutorInfo]:
    """task type -> the executor that runs it. Loading a class must not import heavy libraries."""
    found: dict[str, ExecutorInfo] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            target = ep.load()
        except Exception as exc:  # a broken plug-in must not stop the worker
            log.warning("executor plug-in %s could not be loaded: %s", ep.value, exc)
            continue
        cls = _as_executor(target, ep.name)
        if cls is None:
            log.warning("entry point %s is neither an mloc Executor nor a BaseModule subclass; ignored", ep.value)
            continue
        _add(found, cls, cls.served_task_types(ep.name))
    for task_type, module in MODULE_REGISTRY.items():
        _add(found, module_executor(str(task_type), module), (str(task_type),))
    return found


def available_task_types() -> list[str]:
    return sorted(task for task, info in discover().items() if info.available)


def executor_for(task_type: str) -> ExecutorInfo | None:
    return discover().get(task_type)


def capabilities() -> dict[str, dict[str, object]]:
    return {task: dict(info.cls.capabilities()) for task, info in discover().items() if info.available}
