"""The ``echo`` executor: returns its payload; used to check a fleet and to measure dispatch."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from mloc.errors import ExecutionError
from mloc.executors.base import Executor, Isolation, RunContext
from mloc.spec.base import SpecBase
from mloc.spec.echo import EchoSpec


class EchoExecutor(Executor):
    name = "echo"
    task_types = ("echo",)
    isolation = "inline"

    @classmethod
    def isolation_for(cls, spec: SpecBase) -> Isolation:
        if not isinstance(spec, EchoSpec):
            return "inline"
        options = spec.hyperparameters
        if options.isolate:
            return "process"
        # Nothing to wait for: a thread hop would cost more than the work.
        instant = not (options.sleep_sec or options.ignore_cancel or options.crash)
        return "loop" if instant else "inline"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.spec
        assert isinstance(spec, EchoSpec)
        options = spec.hyperparameters
        started = time.perf_counter()
        if options.ignore_cancel:
            time.sleep(options.sleep_sec)
        elif options.sleep_sec:
            step_sec = options.sleep_sec / options.steps
            for step in range(options.steps):
                # A wait cut short by a cancel completed no step: none is reported.
                ctx.cancel_event.wait(step_sec)
                ctx.check_cancelled()
                ctx.progress(step + 1, options.steps)
                ctx.log(f"step {step + 1}/{options.steps}")
            ctx.check_cancelled()
        if options.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if options.fail_message:
            raise ExecutionError(options.fail_message)
        return {
            "ok": True,
            "payload": spec.payload,
            "worker_id": ctx.worker_id,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "usage": {"latency_sec": round(time.perf_counter() - started, 6), "num_requests": 1},
        }
