"""Serve a :class:`~mloc.modules.base_module.BaseModule` as an executor, so the worker needs no second
plug-in path: the executor registry wraps each module in one of these classes.

The module's coroutine runs on a fresh asyncio loop in the executor's thread. The task's cancel signal
is a ``threading.Event`` set from outside that loop, so the loop checks it between short waits and
cancels the coroutine when it is set.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.base import Executor, Isolation, RunContext
from mloc.modules.base_module import BaseModule, ProgressCallback
from mloc.spec.base import SpecBase

# How long a cancel may go unnoticed; short next to a task, long enough to cost no measurable CPU.
CANCEL_POLL_SEC = 0.1


class ModuleExecutor(Executor):
    """Runs one module class; :func:`module_executor` makes a subclass per task type."""

    module: ClassVar[type[BaseModule]]

    @classmethod
    def isolation_for(cls, spec: SpecBase) -> Isolation:
        return cls.module.isolation

    def run(self, ctx: RunContext) -> dict[str, Any]:
        # A loop per task: the module may leave nothing running between tasks.
        result = asyncio.run(_drive(self.module(ctx), ctx))
        if result is None:
            return {}
        if not isinstance(result, dict):
            raise ExecutionError(
                f"{self.module.__qualname__}.execute returned {type(result).__name__}; return a dict (the result)"
            )
        return result


def module_executor(task_type: str, module: type[BaseModule]) -> type[ModuleExecutor]:
    """The executor class that serves ``task_type`` with ``module``."""
    return type(
        f"{module.__name__}Executor",
        (ModuleExecutor,),
        {
            "name": task_type,
            "task_types": (task_type,),
            "module": module,
            "requires": module.requires,
            "__module__": module.__module__,
        },
    )


def progress_callback(ctx: RunContext) -> ProgressCallback:
    """Report through ``ctx.progress``; the answer is an already finished future, so a module may call
    it plainly or ``await`` it."""

    def report(step: float, total: float | None = None, message: str | None = None) -> asyncio.Future[None]:
        ctx.progress(step, total, message)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    return report


async def _drive(module: BaseModule, ctx: RunContext) -> Any:
    job = asyncio.ensure_future(module.execute(progress_callback=progress_callback(ctx)))
    while not job.done():
        await asyncio.wait({job}, timeout=CANCEL_POLL_SEC)
        if ctx.cancelled and not job.done():
            job.cancel()
            # Let the module's cleanup (finally blocks, except CancelledError) run to its end.
            await asyncio.gather(job, return_exceptions=True)
            raise TaskCancelled("the task was cancelled")
    return job.result()
