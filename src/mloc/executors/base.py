"""The executor plug-in interface.

An executor gets one :class:`RunContext` per task: the validated spec, an output folder, callbacks for
progress, logs, metrics and usage, and a cancel signal. It returns the result dict that becomes
``RESULTS_DIR/<task_id>/responses.json``. To fail the task with a message a person can act on, it
raises :class:`mloc.errors.ExecutionError`; any other exception fails the task too, with its text.

Executors run in a long-lived executor process by default, so one that crashes, leaks or exhausts
memory takes down only that process, and so models stay loaded between tasks (keep them on ``self``).
Trivial executors may set ``isolation = "inline"`` to run on a worker thread instead, or ``"loop"`` for
work that returns in microseconds without blocking (it runs on the worker's event loop itself).

The first seed's executors are written as ``run(self, task: dict, out_dir: Path)`` and set only ``name``;
such a class is accepted as it is: its ``run`` is adapted when the class is created, so every caller
still calls ``run(ctx)``, and the entry point's name is the task type it serves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson

from mloc import checkpoints
from mloc.errors import TaskCancelled
from mloc.spec.base import Document, SpecBase
from mloc.state import StopReason

Isolation = Literal["loop", "inline", "process"]
_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
Event = dict[str, Any]


def encode_json(obj: Any) -> bytes:
    """``obj`` as the JSON files MLOC writes hold it (indented, ending with a newline)."""
    return orjson.dumps(obj, option=_JSON_OPTIONS, default=str)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    return write_bytes_atomic(path, encode_json(obj))


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` so a reader sees the old file or the new one, never half of one."""
    # Plain os calls on strings: a worker writes one of these per task, and pathlib's own work made
    # each write about a fifth slower.
    folder, name = os.path.split(os.fspath(path))
    try:
        os.mkdir(folder)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    # Unique per process and thread, so concurrent writers never share a temporary file.
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # Owner-only, as results are private to their task's user (a sandboxed tool runs as another uid).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:  # a write may take only part of a large buffer
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@dataclass
class RunContext:
    """Everything an executor may use for one task. Callbacks are cheap and thread-safe."""

    task_id: str
    attempt: int
    owner: str
    document: Document
    out_dir: Path
    models_dir: Path
    worker_id: str
    gpu_indices: list[int] = field(default_factory=list)
    emit: Callable[[Event], object] = field(default=lambda event: None, repr=False)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    # Why the worker stops the run (a user's cancel, the worker's own shutdown, the time limit), when it
    # said: an executor that stops gracefully can tell its log which it was.
    stop_reason: StopReason | None = None
    _last_progress: float = field(default=0.0, repr=False)
    _last_step: float = field(default=0.0, repr=False)  # the step of the last progress sent

    @property
    def spec(self) -> SpecBase:
        return self.document.spec

    @property
    def task(self) -> dict[str, Any]:
        """The task as plain data, as the first seed's ``run(task, out_dir)`` received it."""
        return self.document.to_wire()

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / checkpoints.CHECKPOINTS_DIR

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def stop(self, why: StopReason | None) -> None:
        """Ask the run to stop (``cancelled`` turns true), saying why."""
        if why is not None:
            self.stop_reason = why
        self.cancel_event.set()

    def check_cancelled(self) -> None:
        """Raise :class:`TaskCancelled` if the task was cancelled; call it between units of work."""
        if self.cancel_event.is_set():
            raise TaskCancelled("the task was cancelled")

    def progress(
        self,
        step: float,
        total: float | None = None,
        message: str | None = None,
        *,
        unit: str | None = None,
        since: float | None = None,
    ) -> None:
        """Report progress; at most a few updates a second reach Redis. ``unit`` names what ``step``
        counts where a reader adds it up ("rows": a dataset chunk's, summed into its task's). ``since``:
        the step this run's work began at, now (a resumed training run's checkpoint step): the time left
        is then told from the pace since, not since the run's start at step 0."""
        now = time.monotonic()
        final = total is not None and step >= total
        # Always sent: an end, a new stage counting from its start ("answering" 0/4 after "embedding" 3/3),
        # and where a run's work begins (``since``).
        new_stage = step < self._last_step
        if not final and not new_stage and since is None and now - self._last_progress < 0.25:
            return
        self._last_progress = now
        self._last_step = step
        event: dict[str, Any] = {"ev": "progress", "step": step, "total": total, "message": message, "ts": time.time()}
        if unit:
            event["unit"] = unit
        if since is not None:
            event["since"] = since
        self.emit(event)

    def log(self, message: str, level: str = "INFO") -> None:
        self.emit({"ev": "log", "level": level, "message": message, "ts": time.time()})

    def metrics(self, step: int, **values: float) -> None:
        """Record per-step metrics (loss, reward, KL...), readable through the API."""
        self.emit({"ev": "metrics", "step": step, "values": values, "ts": time.time()})

    def add_usage(self, **counters: float) -> None:
        """Add to the task's usage counters (prompt_tokens, completion_tokens, train_samples, ...)."""
        self.emit({"ev": "usage", "counters": counters})

    def artifact(self, name: str, path: Path, kind: str = "file", **info: Any) -> None:
        """Register an artifact (an adapter, an index) so later tasks and the API can find it."""
        self.emit({"ev": "artifact", "name": name, "path": str(path), "kind": kind, "info": info})

    def save_json(self, path: Path | str, obj: Any) -> Path:
        target = Path(path)
        if not target.is_absolute():
            target = self.out_dir / target
        return write_json_atomic(target, obj)


class Executor(ABC):
    """Base class of every executor. Subclasses set ``name`` and ``task_types`` and implement ``run``."""

    name: ClassVar[str]
    task_types: ClassVar[tuple[str, ...]]
    isolation: ClassVar[Isolation] = "process"
    # Top-level modules the executor imports; the worker offers its task types only where they exist.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and _takes_task_and_out_dir(run):
            cls.run = _with_context(run)  # type: ignore[method-assign]  # the seed form, adapted once here

    @classmethod
    def served_task_types(cls, entry_point: str | None = None) -> tuple[str, ...]:
        """The task types this class runs: ``task_types`` where it declares them, else the name of the
        entry point that registered it, else ``name`` (the first seed's executors set only ``name``)."""
        declared = getattr(cls, "task_types", ())
        if declared:
            return tuple(declared)
        fallback = entry_point or getattr(cls, "name", None)
        return (fallback,) if fallback else ()

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """Modules ``requires`` names that this environment lacks (checked without importing them)."""
        return [module for module in cls.requires if importlib.util.find_spec(module) is None]

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """Extra facts the worker advertises for scheduling (for example the engines it has)."""
        return {}

    @classmethod
    def isolation_for(cls, spec: SpecBase) -> Isolation:
        """Where a given task runs; most executors answer with their class-wide setting."""
        return cls.isolation

    @abstractmethod
    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Run one task and return its result (it becomes responses.json)."""

    def warm_models(self) -> list[str]:
        """Keys of the models this executor holds loaded ("engine:model"); the scheduler prefers a
        worker that already has a task's model."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the executor keeps between tasks (loaded models)."""

    @staticmethod
    def save_json(path: Path, obj: Any) -> Path:
        return write_json_atomic(path, obj)


def _takes_task_and_out_dir(run: Any) -> bool:
    """Whether ``run`` has the first seed's shape: two required arguments after ``self``."""
    if not inspect.isfunction(run):
        return False
    required = [
        p
        for p in list(inspect.signature(run).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) == 2


def _with_context(run: Callable[[Any, dict[str, Any], Path], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A ``run(ctx)`` that calls a seed-form ``run(task, out_dir)`` with the task as plain data."""

    def run_with_context(self: Executor, ctx: RunContext) -> dict[str, Any]:
        return run(self, ctx.task, ctx.out_dir)

    # Not functools.wraps: its __wrapped__ would make inspect report the seed signature again.
    run_with_context.__name__ = run.__name__
    run_with_context.__qualname__ = run.__qualname__
    run_with_context.__doc__ = run.__doc__
    return run_with_context
