"""Running one assigned task: recording its start and end, the executor and its result (what it
used is worked out in :mod:`mloc.worker.accounting`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from mloc import artifacts, checkpoints, keys, memoryhistory, modelroots, moves, requeue, tasklog, transition
from mloc.errors import ExecutionError, MlocError, NoExecutor, TaskCancelled
from mloc.executors.base import RunContext, encode_json, write_bytes_atomic, write_json_atomic
from mloc.executors.registry import executor_for
from mloc.moves import Change
from mloc.records import ADMIN, SUBMITTED_BY, Assignment, AssignmentError
from mloc.settings import Settings
from mloc.spec import Document, validate
from mloc.spec.base import TIMEOUT_LABEL
from mloc.spec.dataset import COUNTED_BYTES, RESULT_LINES
from mloc.spec.references import MAKERS, TRAINING, Output
from mloc.state import Reason, StopReason, TaskState
from mloc.store import Coalescer, TaskStore
from mloc.worker import outputs
from mloc.worker.accounting import cores_asked, daily_counters, peak_fields, run_usage
from mloc.worker.process import HostDied, HostKey, HostPool, HostProcess, default_python
from mloc.worker.reporter import Reporter

log = logging.getLogger(__name__)
T = TypeVar("T")
# Distinct instant-task assignments whose validated documents a worker keeps (see TaskRunner._instant).
INSTANT_DOCUMENTS_KEPT = 256
INSTANT_BODY_KEPT_BYTES = 8 * 1024  # larger bodies are validated each time, so the cache stays small


@dataclass
class Running:
    task_id: str
    attempt: int
    stop_reason: StopReason | None = None
    host: HostProcess | None = None
    inline: RunContext | None = None  # the run's context, when its executor runs in this process
    document: Document | None = None  # already validated
    kill_timer: asyncio.Task[None] | None = None  # kills the executor if the polite stop fails
    memory: dict[str, Any] | None = None  # what its executor process measured (mloc.worker.peak)


class TaskRunner:
    """How a worker runs the tasks assigned to it. :class:`mloc.worker.worker.Worker` adds
    membership (registration, heartbeats), the assignment and control loops, and shutdown."""

    settings: Settings
    redis: aioredis.Redis
    store: TaskStore
    mover: Coalescer  # makes this worker's task moves, sent in batches
    worker_id: str
    results_dir: Path
    models_dir: Path
    executor_pythons: dict[str, str]  # MLOC_EXECUTOR_PYTHON: task type -> the interpreter that runs it
    hardware: dict[str, Any]
    pool: HostPool
    running: dict[str, Running]
    handling: Counter[str]  # tasks whose assignment is being handled (twice, when delivered twice)
    stopping: asyncio.Event
    backoff: requeue.Backoff
    max_requeues: int
    _tasks: set[asyncio.Task[None]]
    _instant_documents: dict[str, Document | None]

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop(self, run: Running, why: StopReason) -> None:
        if run.stop_reason is not None:
            return
        run.stop_reason = why
        if run.inline is not None:
            run.inline.stop(why)
        if run.host is not None:
            await self._stop_host(run, run.host)

    async def _stop_host(self, run: Running, host: HostProcess) -> None:
        """Ask the executor process to stop the task; kill it if it has not stopped after the grace."""
        await host.cancel(run.task_id, run.attempt, run.stop_reason)

        async def kill_later() -> None:
            await asyncio.sleep(self.settings.cancel_grace_sec)
            if run.task_id in self.running and run.host is host and host.alive:
                log.warning(
                    "task %s did not stop within %.0fs; killing its executor",
                    run.task_id,
                    self.settings.cancel_grace_sec,
                )
                await host.kill()

        run.kill_timer = self._spawn(kill_later())

    async def _ack(self, entry_id: str) -> None:
        stream = keys.worker_stream(self.worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, keys.WORKER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    def _accept(self, entry_id: str, fields: dict[str, str]) -> tuple[asyncio.Task[None], bool]:
        """Start handling one assignment read from the stream. Also says whether the task ends at
        once (its executor runs on the loop): such a task's end is its only Redis call."""
        try:
            assignment = Assignment.decode(fields)
        except AssignmentError as exc:
            return self._spawn(self._refuse(entry_id, fields.get("task") or "", exc)), False
        # Work that finishes at once is recorded as started and finished in one step, after it ran,
        # fenced on the attempt the assignment announces (one that announces none is started first).
        document = self._instant(assignment) if assignment.attempt is not None else None
        return self._spawn(self._handle_assignment(entry_id, assignment, document)), document is not None

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        handler, _ = self._accept(entry_id, fields)
        await handler

    async def _handle_assignment(self, entry_id: str, assignment: Assignment, document: Document | None) -> None:
        self.handling[assignment.task_id] += 1
        try:
            await self._take(entry_id, assignment, document)
        finally:
            self.handling[assignment.task_id] -= 1
            if not self.handling[assignment.task_id]:
                del self.handling[assignment.task_id]

    async def _take(self, entry_id: str, assignment: Assignment, document: Document | None) -> None:
        """Run one assignment; ``document`` is the task's when it ends at once (see :meth:`_accept`)."""
        task_id = assignment.task_id
        started = time.time()
        deferred = document is not None
        if deferred:
            run = Running(task_id, assignment.attempt or 0, document=document)
        else:
            start = self._start_change(started)
            try:
                outcome = await self._persist(f"task {task_id}: recording its start", self.mover.apply, task_id, start)
                attempt = (
                    outcome.attempt
                    if outcome.ok
                    else await self._persist(
                        f"task {task_id}: reading its start", self._started_here, task_id, repr(started)
                    )
                )
            except aioredis.RedisError:
                return  # stopping with Redis away: the entry stays unacknowledged, the reaper requeues it
            if attempt is None:
                await self._ack(entry_id)  # cancelled or moved meanwhile: nothing to run
                return
            run = Running(task_id, attempt)
            try:
                await self._log(task_id, *self._taken(assignment, attempt))
            except aioredis.RedisError as exc:
                # The start is recorded: the task runs, and its log goes without these two lines.
                log.warning("task %s: its start was not logged (%s)", task_id, exc)
        self.running[task_id] = run
        timeout = assignment.timeout_sec
        loop = asyncio.get_running_loop()
        watchdog = (
            loop.call_later(float(timeout), lambda: self._spawn(self._stop(run, StopReason.TIMEOUT)))
            if timeout
            else None
        )
        acked = False
        try:
            acked = await self._execute(run, assignment, started, entry_id, deferred_start=deferred)
        except aioredis.RedisError as exc:
            # Left held by this worker: its sweep (or, once it stops heartbeating, the reaper) hands it back.
            log.error("task %s: Redis failed while ending it (%s); it is handed back", task_id, exc)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if run.kill_timer is not None:
                # Stopped in time: a shutdown must not wait out the grace of a task that is gone.
                run.kill_timer.cancel()
            self.running.pop(task_id, None)
            if not acked:
                with contextlib.suppress(aioredis.RedisError):
                    await self._ack(entry_id)

    async def _refuse(self, entry_id: str, task_id: str, error: AssignmentError) -> None:
        """Fail a task whose assignment this worker cannot read, and acknowledge the entry: read
        again, it would be refused again, and the task would hold the worker's capacity for ever."""
        log.error("%s", error)
        try:
            if task_id:
                failed = await self._persist(
                    f"task {task_id}: recording that its assignment is unreadable",
                    self.store.transition,
                    task_id,
                    moves.REFUSE,
                    expect_worker=self.worker_id,
                    release=True,
                    fields={
                        "finished_at": repr(time.time()),
                        "reason": str(error),
                        "reason_code": Reason.ASSIGNMENT_UNREADABLE.value,
                    },
                )
                if not failed.ok:
                    log.warning("task %s: not failed (%s %s)", task_id, failed.error, failed.detail)
                else:
                    await self._log(task_id, tasklog.ended(TaskState.FAILED, str(error)))
            await self._ack(entry_id)
        except aioredis.RedisError as exc:
            log.warning("task %s: Redis failed while refusing its assignment (%s)", task_id, exc)

    async def _persist(self, what: str, operation: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run a Redis write a task's outcome depends on until it goes through. Giving up would leave
        the task held by a worker that still heartbeats, so nothing would ever requeue it; once the
        worker is stopping, its heartbeat ends and the reaper takes over, so it gives up then."""
        delay = 0.25
        while True:
            try:
                return await operation(*args, **kwargs)
            except aioredis.RedisError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("%s failed (%s); trying again in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _started_here(self, task_id: str, started_at: str) -> int | None:
        """The attempt this worker's start began when an earlier try of it was applied and only its
        answer was lost (Redis killed between the two): the start time recorded is that try's own."""
        state, worker_id, recorded_at, attempts = await self.redis.hmget(
            keys.task(task_id), "state", "worker_id", "started_at", "attempts"
        )
        ours = worker_id == self.worker_id and recorded_at == started_at
        return int(attempts) if ours and state in (TaskState.RUNNING, TaskState.CANCELLING) else None

    async def _recorded(self, task_id: str, attempt: int) -> bool:
        """Whether this worker's ``attempt`` of the task has already ended in Redis."""
        state, worker_id, attempts = await self.redis.hmget(keys.task(task_id), "state", "worker_id", "attempts")
        ended = state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
        return bool(ended and worker_id == self.worker_id and attempts == str(attempt))

    def _start_change(self, started: float, *, expect_attempt: int | None = None, **logged: Any) -> Change:
        """The move to running, as the worker takes the task (or with its end, for instant work)."""
        return Change(
            moves.START,
            expect_worker=self.worker_id,
            expect_attempt=expect_attempt,
            new_attempt=True,
            fields={"started_at": repr(started), "pending_reason": "", "reason": "", "reason_code": ""},
            now=started,
            **logged,
        )

    def _instant(self, assignment: Assignment) -> Document | None:
        """The task's document when its executor runs on the event loop and returns at once.

        Kept per assignment body: a batch of identical tasks is validated once, not once per task.
        Only these documents are shared between runs, and an instant executor runs to its end on the
        loop, so no two runs hold one at the same time."""
        if assignment.body in self._instant_documents:
            return self._instant_documents[assignment.body]
        document = self._instant_document(assignment)
        if len(self._instant_documents) >= INSTANT_DOCUMENTS_KEPT:
            self._instant_documents.clear()
        if 0 < len(assignment.body) <= INSTANT_BODY_KEPT_BYTES:
            self._instant_documents[assignment.body] = document
        return document

    def _instant_document(self, assignment: Assignment) -> Document | None:
        task_type = assignment.task_type
        if task_type in self.executor_pythons:
            return None
        info = executor_for(task_type)
        if info is None or not info.available:
            return None
        try:
            document = validate(assignment.document)
        except MlocError:
            return None
        return document if info.cls.isolation_for(document.spec) == "loop" else None

    async def _execute(
        self,
        run: Running,
        assignment: Assignment,
        started: float,
        entry_id: str,
        *,
        deferred_start: bool = False,
    ) -> bool:
        """Run the task and record how it ended; True when the stream entry was acknowledged too.
        ``deferred_start``: the move to running is recorded together with the outcome, fenced on the
        attempt the assignment announced, so a stale message runs nothing."""
        task_id = run.task_id
        document_data = assignment.document
        owner = assignment.owner
        gpus = list(assignment.gpus)
        task_type = assignment.task_type
        out_dir = self.results_dir / task_id
        reporter = Reporter(
            self.redis, task_id, started, retention_sec=self.settings.log_retention_sec, run=run.attempt
        )
        result: dict[str, Any] | None = None
        state, reason_code, reason = TaskState.FAILED, Reason.EXECUTOR_ERROR.value, ""
        crashed = False
        # An error no executor expected: its traceback is logged once the run's end is recorded, as an
        # error of the task's, or as a note where the task had been moved elsewhere meanwhile.
        unexpected: Exception | None = None
        try:
            trusted = await self._check_models(task_id, document_data, owner)
            document_data = await outputs.resolve_task_outputs(
                self.redis, self.settings, self.models_dir, document_data, owner, trusted=trusted
            )
            result = await self._run_executor(run, task_type, document_data, owner, gpus, out_dir, reporter)
            await self._write_result(out_dir / "responses.json", result)
            if self.settings.artifact_store_url:  # published before success is reported, or the task fails
                await artifacts.publish(self.settings, task_id, run.attempt, self.worker_id, out_dir)
            state, reason_code, reason = TaskState.SUCCEEDED, "", ""
        except TaskCancelled:
            state, reason_code, reason = (
                TaskState.CANCELLED,
                Reason.CANCELLED_BY_USER.value,
                "cancelled on request",
            )
        except HostDied as exc:
            if run.stop_reason == StopReason.CANCELLED:
                state, reason_code, reason = (
                    TaskState.CANCELLED,
                    Reason.CANCELLED_BY_USER.value,
                    f"cancelled on request; the executor did not stop within {self.settings.cancel_grace_sec:g}s "
                    "(MLOC_CANCEL_GRACE_SEC) and was killed, with the models it held",
                )
            else:
                reason_code, reason, crashed = Reason.EXECUTOR_CRASHED.value, str(exc), True
        except MlocError as exc:
            reason_code = Reason.NO_EXECUTOR.value if exc.code == NoExecutor.code else Reason.EXECUTOR_ERROR.value
            reason = exc.message
        except OSError as exc:
            reason = f"cannot write results to {out_dir}: {exc.strerror or exc}"
        except Exception as exc:
            unexpected = exc
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            await reporter.close()
        if run.stop_reason == StopReason.LOST:
            _discarded(task_id, reason if unexpected else "", "this worker was declared lost")
            return False  # the orchestrator already requeued it when it declared this worker lost
        if run.stop_reason == StopReason.SHUTDOWN:
            # What the attempt used until it was stopped is known here, unlike a lost worker's: it counts
            # for the owner (a dataset chunk's next run keeps the rows it finished without counting them).
            usage, daily = self._used(reporter, None, time.time() - started, assignment, TaskState.FAILED)
            await requeue.requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                attempt=run.attempt,
                reason_code=Reason.WORKER_SHUTDOWN,
                reason=f"worker {self.worker_id} stopped while the task ran",
                backoff=self.backoff,
                max_requeues=self.max_requeues,
                final_usage=daily,
                owner=owner,
                run_usage=usage,
            )
            await _note_counted(task_type, out_dir)
            return False
        if run.stop_reason == StopReason.TIMEOUT and state != TaskState.SUCCEEDED:
            state, reason_code = TaskState.FAILED, Reason.TIMEOUT.value
            limit = assignment.labels.get(TIMEOUT_LABEL)
            whose = f"the admin's limit, {limit}" if limit else "spec.timeout_sec"
            reason = f"timed out: ran longer than {whose} ({assignment.timeout_sec:g}s) and was stopped"
        if run.stop_reason == StopReason.CANCELLED and state not in (TaskState.SUCCEEDED, TaskState.CANCELLED):
            state, reason_code, reason = (
                TaskState.CANCELLED,
                Reason.CANCELLED_BY_USER.value,
                "cancelled on request",
            )
        if state == TaskState.CANCELLED and run.stop_reason == StopReason.CANCELLED:
            # The orchestrator may have said why it stopped the task (a hard budget): that reason shows,
            # and its code, so a script tells a budget's cancel from a user's.
            note, code = await self.redis.hmget(keys.task(task_id), "cancel_reason", "cancel_reason_code")
            if note:
                reason = note + reason.removeprefix("cancelled on request")
            if code in Reason.__members__.values():
                reason_code = code
        if state in (TaskState.FAILED, TaskState.CANCELLED) and task_type in TRAINING:
            reason += await asyncio.to_thread(_resume_hint, task_id, out_dir)
        finished = time.time()
        usage, daily = self._used(reporter, result, finished - started, assignment, state)
        if crashed and run.stop_reason is None:
            # A dead executor process (most often out of memory) may be the machine's fault, so it is
            # retried, with backoff; but it may be the task's own doing, so it spends an attempt.
            retry = await requeue.requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                attempt=run.attempt,
                reason_code=Reason.EXECUTOR_CRASHED,
                reason=reason,
                backoff=self.backoff,
                final_usage=daily,
                owner=owner,
                run_usage=usage,
            )
            await _note_counted(task_type, out_dir)
            if retry.state != TaskState.FAILED:
                log.info("task %s: %s; retried", task_id, reason)
                return False
            log.info("task %s failed: %s", task_id, reason)
            await self._ack(entry_id)
            return True
        # Built in the order they happened: the log's lines are stamped as they are made.
        taken = self._logged(*self._taken(assignment, run.attempt)) if deferred_start else {}
        final = Change(
            moves.finish(state),
            expect_worker=self.worker_id,
            expect_attempt=run.attempt,
            release=True,
            result=result if state == TaskState.SUCCEEDED else None,
            usage=daily,
            owner=owner,
            ack=entry_id,
            fields={
                "finished_at": repr(finished),
                "usage": transition.encode(usage),
                "reason": reason,
                "reason_code": reason_code,
                "cancel_requested": "",
                **(peak_fields(run.memory, gpus) if run.memory is not None else {}),
            },
            now=finished,
            # Its log line goes with the move, in the same call: one round trip per task, not two.
            **self._logged(tasklog.ended(state, reason, finished - started)),
        )
        what = f"task {task_id}: recording how it ended"
        if not deferred_start:
            outcome = await self._persist(what, self.mover.apply, task_id, final)
        else:
            start = self._start_change(started, expect_attempt=run.attempt - 1, **taken)
            outcome = await self._persist(what, self.mover.apply, task_id, start, then=final)
        recorded = outcome.ok or await self._recorded(task_id, run.attempt)
        if recorded:
            await _note_counted(task_type, out_dir)
        if not outcome.ok and recorded:
            return True  # an earlier try was applied; only its answer was lost
        if not outcome.ok:
            if deferred_start:
                # It was cancelled or moved before its start was recorded: as if it never ran.
                await asyncio.to_thread(shutil.rmtree, out_dir, True)
                return False
            log.warning(
                "task %s: result not recorded (%s %s); it was moved elsewhere",
                task_id,
                outcome.error,
                outcome.detail,
            )
            _discarded(task_id, reason if unexpected else "", "it was moved elsewhere")
            return False
        if unexpected is not None:
            log.error("task %s failed", task_id, exc_info=unexpected)
        if state != TaskState.SUCCEEDED:
            log.info("task %s %s: %s", task_id, state, reason)
        elif run.memory is not None:
            await self._compare_with_estimate(task_id, run.memory, gpus)
        return True

    async def _compare_with_estimate(self, task_id: str, memory: dict[str, Any], gpus: list[int]) -> None:
        """Keep how the run's peak compares with admission's estimate, for the next estimate of its kind."""
        try:
            raw = await self.redis.hget(keys.task(task_id), "memory_estimate")
            estimate = json.loads(raw) if raw else None
            if isinstance(estimate, dict):
                device = "gpu" if gpus and memory.get("gpu_peak_bytes") else "cpu"
                await memoryhistory.remember(self.redis, task_id, estimate, memory, device=device)
        except (aioredis.RedisError, ValueError) as exc:
            log.warning("task %s: its memory peak was not compared with its estimate (%s)", task_id, exc)

    def _used(
        self, reporter: Reporter, result: dict[str, Any] | None, wall: float, assignment: Assignment, state: TaskState
    ) -> tuple[dict[str, float], dict[str, float]]:
        """What a run used, as its task records it and as its owner's usage day counts it."""
        gpus = list(assignment.gpus)
        usage = run_usage(reporter.usage, result, wall, len(gpus), cores_asked(assignment.document))
        return usage, daily_counters(assignment.task_type, state, usage, gpus, self.hardware["gpus"])

    def _logged(self, *lines: tasklog.Line) -> dict[str, Any]:
        """A :class:`Change`'s log part: ``lines`` written into the task's log with the move."""
        return {"log": tuple(map(tasklog.stored, lines)), "log_retention_sec": self.settings.log_retention_sec}

    async def _log(self, task_id: str, *lines: tasklog.Line) -> None:
        """Lifecycle lines into the task's log, after the move they report was recorded."""
        await tasklog.append(self.redis, task_id, *lines, retention_sec=self.settings.log_retention_sec)

    def _taken(self, assignment: Assignment, attempt: int) -> tuple[tasklog.Line, tasklog.Line]:
        """The placement and the start, written by the worker that took the task: the scheduler's
        own write could reach the log after a quick task's later lines."""
        return tasklog.assigned(self.worker_id, assignment.gpus), tasklog.started(self.worker_id, attempt)

    async def _check_models(self, task_id: str, document_data: dict[str, Any], owner: str) -> bool:
        """Refuse to run a user's task that names local models outside the folders it may read (see
        :mod:`mloc.modelroots`), before anything is opened. True when the admin submitted the task:
        it may name any path and any task's adapter."""
        spec = document_data["spec"]
        if not modelroots.references(spec):
            return False
        submitted_by = await self.redis.hget(keys.task(task_id), SUBMITTED_BY)
        # A task stored before the field existed is the admin's when its owner is.
        if (submitted_by or owner) == ADMIN:
            return True
        roots = modelroots.ModelRoots.of(self.settings, models_dir=self.models_dir, results_dir=self.results_dir)
        refused = await modelroots.check_on_worker(self.redis, spec, owner, roots)
        if refused:
            raise ExecutionError(refused)
        return False

    @staticmethod
    async def _write_result(path: Path, result: dict[str, Any]) -> None:
        # Small results are written on the loop: a thread hop would cost more than the write.
        if len(result) < 32:
            data = encode_json(result)
            if len(data) < 64 * 1024:
                write_bytes_atomic(path, data)
                return
        await asyncio.to_thread(write_json_atomic, path, result)

    async def _run_executor(
        self,
        run: Running,
        task_type: str,
        document_data: dict[str, Any],
        owner: str,
        gpus: list[int],
        out_dir: Path,
        reporter: Reporter,
    ) -> dict[str, Any]:
        info = executor_for(task_type)
        python = self.executor_pythons.get(task_type)
        if python is None and (info is None or not info.available):
            missing = f" (missing {', '.join(info.missing)})" if info else ""
            raise NoExecutor(f"worker {self.worker_id} cannot run {task_type!r} tasks{missing}")
        document = run.document or validate(document_data)
        isolation = "process" if python or info is None else info.cls.isolation_for(document.spec)
        if isolation in ("inline", "loop") and info is not None:
            loop = asyncio.get_running_loop()

            def emit(event: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(reporter.handle, event)

            ctx = RunContext(
                task_id=run.task_id,
                attempt=run.attempt,
                owner=owner,
                document=document,
                out_dir=out_dir,
                models_dir=self.models_dir,
                worker_id=self.worker_id,
                gpu_indices=gpus,
                emit=emit,
                cancel_event=threading.Event(),
            )
            run.inline = ctx
            if run.stop_reason is not None:
                ctx.stop(run.stop_reason)
            if isolation == "loop":
                return info.cls().run(ctx)
            return await asyncio.to_thread(info.cls().run, ctx)
        key = HostKey(python or default_python(), tuple(gpus))
        host = await self.pool.acquire(key, document.spec.model_identifier())
        run.host = host
        host.log_sink = reporter.log_line
        if run.stop_reason is not None:  # stopped while the executor process was starting
            await self._stop_host(run, host)
        try:
            outcome = await host.run(
                {
                    "task_id": run.task_id,
                    "attempt": run.attempt,
                    "owner": owner,
                    "document": document_data,
                    "out_dir": str(out_dir),
                    "models_dir": str(self.models_dir),
                    "worker_id": self.worker_id,
                    "gpus": gpus,
                },
                reporter.handle,
            )
        finally:
            run.host = None
            await self.pool.release(host)
        run.memory = outcome.get("memory")
        if outcome["ev"] == "done":
            return outcome["result"]
        message = outcome.get("message", "the executor failed")
        if outcome.get("code") == TaskCancelled.code:
            raise TaskCancelled(message)
        if outcome.get("code") == NoExecutor.code:
            raise NoExecutor(message)
        raise ExecutionError(message)


async def _note_counted(task_type: str, out_dir: Path) -> None:
    """Once a run's usage was recorded, write how much of its dataset result lines that counted (see
    :data:`mloc.spec.dataset.COUNTED_BYTES`): a later run that keeps them counts only those past it."""
    if task_type not in MAKERS[Output.LINES]:
        return  # no other kind writes result lines: no look in the folder for them
    try:
        size = (out_dir / RESULT_LINES).stat().st_size
    except OSError:
        return  # not a dataset task, or its folder is gone
    tmp = out_dir / f".{COUNTED_BYTES}.tmp"
    try:
        tmp.write_text(str(size))
        os.replace(tmp, out_dir / COUNTED_BYTES)
    except OSError as exc:
        log.warning("%s: how much of its lines was counted was not written (%s)", out_dir.name, exc)


def _resume_hint(task_id: str, out_dir: Path) -> str:
    """What a failed or cancelled training task's reason adds when it saved a checkpoint."""
    found = checkpoints.newest(out_dir / checkpoints.CHECKPOINTS_DIR)
    return f"; {found[1].name} is kept: `mloc resume {task_id}` continues from it" if found else ""


def _discarded(task_id: str, failure: str, why: str) -> None:
    """Say that a run's own failure is not the task's: the task went on elsewhere (``why``)."""
    if failure:
        log.warning("task %s: this run failed (%s), but %s: its outcome is discarded", task_id, failure, why)
