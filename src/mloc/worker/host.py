"""The executor process: runs tasks one at a time for its worker, keeping executors (and the models
they loaded) alive between tasks.

Protocol: the worker writes JSON lines to stdin ({"op": "run" | "cancel" | "shutdown", ...}); this
process writes JSON events to the file descriptor named by MLOC_HOST_EVENT_FD. Its log records travel
as events with their level and source; its stdout and stderr, where libraries write for themselves,
are the task's log too (sorted by :mod:`mloc.worker.capture`), each ended after a task by a line that
tells the worker the task's output is all in.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from mloc.errors import ExecutionError, MlocError, NoExecutor, TaskCancelled
from mloc.executors.base import Executor, RunContext
from mloc.executors.registry import executor_for
from mloc.llm.cache import share_between_executors
from mloc.spec import validate
from mloc.state import StopReason
from mloc.tasklog import Source
from mloc.worker.capture import END_OF_TASK
from mloc.worker.peak import PeakMeter

EVENT_FD_ENV = "MLOC_HOST_EVENT_FD"
WORKER_PID_ENV = "MLOC_WORKER_PID"


def release_freed_memory() -> None:
    """Hand the heap a finished task freed back to the system. A warm executor lives on between tasks,
    and glibc keeps freed pages in its arenas, so its RSS would stay near the largest task's peak
    (about 100 MiB more after the Gemma inference and RAG examples, measured)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class TaskLogHandler(logging.Handler):
    """This process's log records, as entries of the running task's log: MLOC's own loggers (the
    executors, the engines) and those of the running executor's package (a plug-in's) as
    ``executor``, every other (a library's, ``warnings``) as ``library``. Between tasks they go to
    stderr, which the worker keeps in its own debug log."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            own = any(record.name == name or record.name.startswith(name + ".") for name in self.host.own_loggers)
            if not own:
                text = f"{record.name}: {text}"
            if self.host.current is None:
                sys.stderr.write(f"{record.levelname} {text}\n")
                return
            self.host.emit(
                {
                    "ev": "log",
                    "level": record.levelname,
                    "source": Source.EXECUTOR if own else Source.LIBRARY,
                    "message": text,
                    "ts": record.created,
                }
            )
        except Exception:
            self.handleError(record)


class Host:
    def __init__(self, event_fd: int) -> None:
        self._events = os.fdopen(event_fd, "w", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._cancel = threading.Event()
        # Cancels name their task's run (id and attempt), so one that arrives before its run starts
        # is not lost, and one for an earlier run never stops a later run of the same task (a resume).
        # Each with why it was stopped (a StopReason's value), when the worker said.
        self._cancelled: dict[tuple[str, int], str | None] = {}
        self._current: tuple[str, int] | None = None
        self._context: RunContext | None = None  # the current run's, once made
        self._executors: dict[str, Executor] = {}
        # Logger names whose records are the executor's own: MLOC's, and the running plug-in's package.
        self.own_loggers: tuple[str, ...] = ("mloc",)

    @property
    def current(self) -> str | None:
        """The task running now, if any."""
        return self._current[0] if self._current else None

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            self._events.write(line + "\n")
            self._events.flush()

    def _read_commands(self) -> None:
        shutdown = False
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("op") == "cancel":
                run = (str(message.get("task_id")), int(message.get("attempt") or 0))
                with self._lock:
                    self._cancelled[run] = message.get("why")
                    if self._current == run:
                        self._stop(run)
            elif message.get("op") == "run":
                self._inbox.put(message)
            elif message.get("op") == "shutdown":
                shutdown = True
                break
        if not shutdown:
            # The worker closed the pipe without saying goodbye: it died. A task still running here
            # would hold its GPU memory from the requeued attempt, so this process goes now.
            die_with_group()
        self._cancel.set()
        self._inbox.put(None)

    def _stop(self, run: tuple[str, int]) -> None:
        """Stop the current run, saying why where it is known (the lock is held)."""
        why = self._cancelled.get(run)
        if self._context is not None and why is not None and why in StopReason.__members__.values():
            self._context.stop_reason = StopReason(why)
        self._cancel.set()

    def _executor(self, task_type: str) -> Executor:
        if task_type not in self._executors:
            info = executor_for(task_type)
            if info is None:
                raise NoExecutor(f"no executor for task type {task_type!r} in this environment")
            if info.missing:
                raise NoExecutor(
                    f"the {task_type} executor needs {', '.join(info.missing)}, which this environment lacks"
                )
            self._executors[task_type] = info.cls()
        return self._executors[task_type]

    def _run(self, message: dict[str, Any]) -> None:
        run = (str(message["task_id"]), int(message["attempt"]))
        with self._lock:
            self._current = run
            self._cancel.clear()
            if run in self._cancelled:
                self._cancel.set()
        meter: PeakMeter | None = None
        outcome: dict[str, Any] = {"ev": "error", "code": "executor_error", "message": "the executor was interrupted"}
        try:
            document = validate(message["document"])
            ctx = RunContext(
                task_id=message["task_id"],
                attempt=message["attempt"],
                owner=message["owner"],
                document=document,
                out_dir=Path(message["out_dir"]),
                models_dir=Path(message["models_dir"]),
                worker_id=message["worker_id"],
                gpu_indices=message.get("gpus", []),
                emit=self.emit,
                cancel_event=self._cancel,
            )
            with self._lock:
                self._context = ctx
                if run in self._cancelled:
                    self._stop(run)  # again, now that the context can hear why
            executor = self._executor(document.spec.task_type)
            written_in = getattr(type(executor), "module", type(executor)).__module__.split(".")[0]
            self.own_loggers = ("mloc", written_in)
            meter = PeakMeter(model_warm=self._holds(document.spec.model_identifier()))
            meter.start()
            result = executor.run(ctx)
            if not isinstance(result, dict):
                raise ExecutionError(f"the executor returned {type(result).__name__}, not a result dict")
            outcome = {"ev": "done", "result": result}
        except TaskCancelled as exc:
            outcome = {"ev": "error", "code": "cancelled", "message": str(exc)}
        except MlocError as exc:
            outcome = {"ev": "error", "code": exc.code, "message": exc.message}
        except MemoryError:
            outcome = {"ev": "error", "code": "out_of_memory", "message": "the executor ran out of memory"}
        except Exception as exc:
            text = "".join(traceback.format_exception(exc)).rstrip()
            self.emit({"ev": "log", "level": "ERROR", "source": Source.EXECUTOR, "message": text})
            outcome = {"ev": "error", "code": "executor_error", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            if meter is not None:
                # Measured before the freed heap goes back to the system; it goes with the outcome.
                outcome["memory"] = meter.stop()
            self.emit(outcome)
            # A line break first, in case a library left a line unfinished.
            print(f"\n{END_OF_TASK}", flush=True)
            print(f"\n{END_OF_TASK}", file=sys.stderr, flush=True)
            with self._lock:
                self._current = None
                self._context = None
                self._cancelled.pop(run, None)
            release_freed_memory()
        warm = [key for ex in self._executors.values() for key in ex.warm_models()]
        self.emit({"ev": "idle", "warm_models": warm})

    def _holds(self, model: str | None) -> bool:
        """Whether an executor here has ``model`` loaded already (its weights are then not the task's to add)."""
        warm = {key.split(":", 1)[-1] for ex in self._executors.values() for key in ex.warm_models()}
        return model is not None and model in warm

    def serve(self) -> None:
        _log_to(self)
        threading.Thread(target=self._read_commands, name="commands", daemon=True).start()
        self.emit({"ev": "ready", "pid": os.getpid()})
        while (message := self._inbox.get()) is not None:
            self._run(message)
        for executor in self._executors.values():
            try:
                executor.close()
            except Exception:
                traceback.print_exc()


def _log_to(host: Host) -> None:
    """Every logger's records to the task's log: MLOC's from INFO, the rest from WARNING (as
    Python shows them by default), and ``warnings.warn`` as records too."""
    root = logging.getLogger()
    root.handlers[:] = [TaskLogHandler(host)]
    root.setLevel(logging.WARNING)
    logging.getLogger("mloc").setLevel(logging.INFO)
    logging.captureWarnings(True)


def die_with_group(*_: object) -> None:
    """End this executor process and everything it started (an engine's own processes): they share
    the process group the worker gave this process."""
    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _follow_the_worker() -> None:
    """Die with the worker even when nothing is read from stdin: the kernel sends SIGTERM the moment
    the worker process ends (Linux), and SIGTERM here takes the whole process group down."""
    signal.signal(signal.SIGTERM, die_with_group)
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    # The worker may have died between fork and prctl; then our parent is already someone else.
    if os.getppid() != int(os.environ.get(WORKER_PID_ENV, os.getppid())):
        die_with_group()


def main() -> None:
    _follow_the_worker()
    # Whether this worker downloads models is decided once, from the environment it was started in
    # (MLOC_OFFLINE, else HF_HUB_OFFLINE): the libraries themselves are then kept off the hub, as MLOC
    # fetches what a task names (mloc.llm.fetch) before they load it from disk.
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    os.environ.setdefault("MLOC_OFFLINE", "1" if hub_offline else "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # One engine cache for all this process's executors: a RAG task reuses the inference task's model.
    share_between_executors()
    Host(int(os.environ[EVENT_FD_ENV])).serve()


if __name__ == "__main__":
    main()
