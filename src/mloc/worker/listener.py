"""The worker process: registration, heartbeats, the assignment loop and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from mloc import __version__, artifacts, groups, keys, lifecycle
from mloc.connection import connect, redact, resolve_url
from mloc.errors import ConfigError, ExecutionError, MlocError, TaskCancelled
from mloc.executors.base import RunContext, write_json_atomic
from mloc.executors.registry import available_task_types, capabilities, executor_for
from mloc.registry import Registration, WorkerRegistry
from mloc.settings import Settings, get_settings
from mloc.spec import Document, validate
from mloc.state import Reason, TaskState
from mloc.store import Move, TaskStore
from mloc.worker import hardware
from mloc.worker.process import HostDied, HostKey, HostPool, HostProcess, default_python
from mloc.worker.reporter import Reporter

log = logging.getLogger(__name__)
T = TypeVar("T")
TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Running:
    task_id: str
    attempt: int
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None  # "cancelled" or "shutdown"
    host: HostProcess | None = None
    inline_cancel: Any = None  # threading.Event of an inline executor
    document: Document | None = None  # already validated


class Worker:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.store = TaskStore(redis)
        self.registry = WorkerRegistry(redis)
        self.worker_id = settings.resolved_worker_id
        self.results_dir = settings.results_dir.resolve()
        self.models_dir = settings.resolved_models_dir.resolve()
        self.hardware = hardware.detect(settings)
        self.task_types = self._offered_task_types()
        self.pool = HostPool(env={"MLOC_MODELS_DIR": str(self.models_dir)})
        self.running: dict[str, Running] = {}
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Used only for tasks stored without their own policy (submitted to an older orchestrator).
        self.backoff = lifecycle.Backoff(settings.retry_backoff_sec, settings.retry_backoff_max_sec)

    def _offered_task_types(self) -> list[str]:
        """Task types this worker runs: those its own environment has, plus those an interpreter in
        MLOC_EXECUTOR_PYTHON says it can run."""
        offered = set(available_task_types())
        for task_type, python in self.settings.executor_pythons.items():
            missing = probe_interpreter(python, task_type)
            if missing:
                log.warning("%s tasks are not offered: %s cannot run them (%s)", task_type, python, "; ".join(missing))
                offered.discard(task_type)
            else:
                offered.add(task_type)
        return sorted(offered)

    # ------------------------------------------------------------ membership
    async def _recover(self, reason_code: str, reason: str) -> None:
        """Hand back whatever an earlier incarnation of this worker id held."""
        await self.registry.set_status(self.worker_id, "restarting")
        for task_id in await self.registry.task_ids(self.worker_id):
            if task_id in self.running:
                continue
            outcome = await lifecycle.requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                reason_code=reason_code,
                reason=reason,
                backoff=self.backoff,
            )
            if not outcome.ok:
                await self.redis.srem(keys.worker_tasks(self.worker_id), task_id)
        await self.redis.delete(keys.worker_stream(self.worker_id))
        await self._ensure_group()

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.worker_stream(self.worker_id), keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def register(self) -> None:
        await self._recover(Reason.WORKER_RESTARTED, f"worker {self.worker_id} restarted")
        await self.registry.register(
            Registration(
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                topics=self.settings.topics,
                tags=self.settings.tags,
                task_types=self.task_types,
                capabilities=capabilities(),
                hardware=self.hardware,
                cpu_milli=self.hardware["cpu_milli"],
                memory_bytes=self.hardware["memory_bytes"],
                slots=self.settings.worker_slots,
                version=__version__,
            )
        )
        log.info(
            "worker %s registered: topics %s, task types %s, %d GPU(s), results in %s",
            self.worker_id,
            ",".join(self.settings.topics),
            ",".join(self.task_types),
            len(self.hardware["gpus"]),
            self.results_dir,
        )

    async def _heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_interval_sec)
            if self.stopping.is_set():
                return
            try:
                warm = sorted(
                    set(self.pool.warm_models())
                    | {m for r in self.running.values() if r.host for m in r.host.warm_models}
                )
                answer = await self.registry.heartbeat(
                    self.worker_id, {"warm_models": json.dumps(warm), "running": str(len(self.running))}
                )
                if answer != "ok":
                    log.warning(
                        "worker %s was marked %s; stopping its tasks and registering again",
                        self.worker_id,
                        answer,
                    )
                    for run in list(self.running.values()):
                        await self._stop(run, "lost")
                    await self.register()
            except aioredis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    # --------------------------------------------------------------- control
    async def _control_loop(self) -> None:
        """Cancel requests: pub/sub for speed, plus a poll in case a message was missed. A Redis
        outage pauses it; it subscribes again once Redis is back."""
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.worker_control(self.worker_id))
                await self._listen_for_cancels(pubsub)
            except aioredis.RedisError as exc:
                log.warning("control channel failed (%s); subscribing again in 1s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _listen_for_cancels(self, pubsub: Any) -> None:
        last_poll = 0.0
        while not self.stopping.is_set():
            message = await pubsub.get_message(timeout=0.5)
            if message is not None:
                with contextlib.suppress(ValueError, KeyError):
                    task_id = json.loads(message["data"])["cancel"]
                    if task_id in self.running:
                        await self._stop(self.running[task_id], "cancelled")
            if time.monotonic() - last_poll > 2.0 and self.running:
                last_poll = time.monotonic()
                ids = list(self.running)
                pipe = self.redis.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hget(keys.task(task_id), "cancel_requested")
                for task_id, flag in zip(ids, await pipe.execute(), strict=True):
                    if flag == "1" and task_id in self.running:
                        await self._stop(self.running[task_id], "cancelled")

    async def _stop(self, run: Running, why: str) -> None:
        if run.stop_reason is not None:
            return
        run.stop_reason = why
        run.cancel_event.set()
        if run.inline_cancel is not None:
            run.inline_cancel.set()
        if run.host is not None:
            await self._stop_host(run, run.host)

    async def _stop_host(self, run: Running, host: HostProcess) -> None:
        """Ask the executor process to stop the task; kill it if it has not stopped after the grace."""
        await host.cancel(run.task_id)

        async def kill_later() -> None:
            await asyncio.sleep(self.settings.cancel_grace_sec)
            if run.task_id in self.running and run.host is host and host.alive:
                log.warning(
                    "task %s did not stop within %.0fs; killing its executor",
                    run.task_id,
                    self.settings.cancel_grace_sec,
                )
                await host.kill()

        self._spawn(kill_later())

    # ------------------------------------------------------------ assignments
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume_loop(self) -> None:
        stream = keys.worker_stream(self.worker_id)
        while not self.stopping.is_set():
            try:
                reply = await self.redis.xreadgroup(
                    keys.WORKER_GROUP, self.worker_id, {stream: ">"}, count=64, block=500
                )
            except ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    # Refused (out of memory, a read-only replica after failover): wait, then read again.
                    log.warning("assignment stream unavailable: %s; retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                # The stream was recreated on re-registration.
                log.info("assignment stream reset (%s); joining it again", exc)
                with contextlib.suppress(aioredis.RedisError):
                    await self._ensure_group()
                continue
            except aioredis.RedisError as exc:
                log.warning("assignment stream unavailable: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    if self.stopping.is_set():
                        break  # left unacknowledged: handed back at shutdown
                    self._spawn(self._handle(entry_id, fields))

    async def _ack(self, entry_id: str) -> None:
        stream = keys.worker_stream(self.worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, keys.WORKER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        task_id = fields["task"]
        started = time.time()
        body = json.loads(fields["body"])
        start = Move(
            TaskState.RUNNING,
            sources=[TaskState.ASSIGNED],
            expect_worker=self.worker_id,
            new_attempt=True,
            fields={"started_at": repr(started), "pending_reason": "", "reason": "", "reason_code": ""},
            now=started,
        )
        document = self._instant(body)
        deferred: Move | None = None
        if document is not None and fields.get("attempt", "").isdigit():
            # Work that finishes at once is recorded as started and finished in one step, after it
            # ran: fenced on the attempt the assignment announced, so a stale message runs nothing.
            run = Running(task_id, int(fields["attempt"]), document=document)
            deferred = replace(start, expect_attempt=run.attempt - 1)
        else:
            try:
                outcome = await self._persist(f"task {task_id}: recording its start", self.store.apply, task_id, start)
            except aioredis.RedisError:
                return  # stopping with Redis away: the entry stays unacknowledged, the reaper requeues it
            if not outcome.ok:
                await self._ack(entry_id)  # cancelled or moved meanwhile: nothing to run
                return
            run = Running(task_id, outcome.attempt)
        parent = body["spec"].get("metadata", {}).get("labels", {}).get(groups.PARENT_LABEL)
        if parent:
            await groups.shard_started(self.store, parent)
        self.running[task_id] = run
        timeout = body["spec"]["spec"].get("timeout_sec")
        watchdog = (
            asyncio.get_running_loop().call_later(float(timeout), lambda: self._spawn(self._stop(run, "timeout")))
            if timeout
            else None
        )
        acked = False
        try:
            acked = await self._execute(run, body, started, entry_id, deferred_start=deferred)
            if parent and acked:
                await groups.shard_finished(self.store, parent, self.results_dir)
        except aioredis.RedisError as exc:
            log.error("task %s: Redis failed while stopping (%s); the reaper requeues it", task_id, exc)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self.running.pop(task_id, None)
            if not acked:
                with contextlib.suppress(aioredis.RedisError):
                    await self._ack(entry_id)

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

    async def _recorded(self, task_id: str, attempt: int) -> bool:
        """Whether this worker's ``attempt`` of the task has already ended in Redis."""
        state, worker_id, attempts = await self.redis.hmget(keys.task(task_id), "state", "worker_id", "attempts")
        ended = state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
        return bool(ended and worker_id == self.worker_id and attempts == str(attempt))

    def _instant(self, body: dict[str, Any]) -> Document | None:
        """The task's document when its executor runs on the event loop and returns at once."""
        document_data = body["spec"]
        task_type = document_data["spec"]["taskType"]
        labels = document_data.get("metadata", {}).get("labels", {})
        if task_type in self.settings.executor_pythons or groups.PARENT_LABEL in labels:
            return None
        info = executor_for(task_type)
        if info is None or not info.available:
            return None
        try:
            document = validate(document_data)
        except MlocError:
            return None
        return document if info.cls.isolation_for(document.spec) == "loop" else None

    async def _execute(
        self,
        run: Running,
        body: dict[str, Any],
        started: float,
        entry_id: str,
        *,
        deferred_start: Move | None = None,
    ) -> bool:
        """Run the task and record how it ended; True when the stream entry was acknowledged too.
        ``deferred_start`` is the move to running, when it is recorded together with the outcome."""
        task_id = run.task_id
        document_data = body["spec"]
        owner = body.get("owner", "")
        gpus: list[int] = body.get("gpus", [])
        task_type = document_data["spec"]["taskType"]
        out_dir = self.results_dir / task_id
        reporter = Reporter(self.redis, task_id, started, retention_sec=self.settings.log_retention_sec)
        result: dict[str, Any] | None = None
        state, reason_code, reason = TaskState.FAILED, Reason.EXECUTOR_ERROR.value, ""
        crashed = False
        try:
            document_data = await self._resolve_adapter(document_data, owner)
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
            if run.stop_reason == "cancelled":
                state, reason_code, reason = (
                    TaskState.CANCELLED,
                    Reason.CANCELLED_BY_USER.value,
                    "cancelled (executor stopped)",
                )
            else:
                reason_code, reason, crashed = Reason.EXECUTOR_CRASHED.value, str(exc), True
        except MlocError as exc:
            reason_code = Reason.NO_EXECUTOR.value if exc.code == "no_executor" else Reason.EXECUTOR_ERROR.value
            reason = exc.message
        except OSError as exc:
            reason = f"cannot write results to {out_dir}: {exc.strerror or exc}"
        except Exception as exc:
            log.exception("task %s failed", task_id)
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            await reporter.close()
        if run.stop_reason == "lost":
            return False  # the orchestrator already requeued it when it declared this worker lost
        if run.stop_reason == "shutdown":
            await lifecycle.requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                attempt=run.attempt,
                reason_code=Reason.WORKER_SHUTDOWN.value,
                reason=f"worker {self.worker_id} stopped while the task ran",
                backoff=self.backoff,
            )
            return False
        if run.stop_reason == "timeout" and state != TaskState.SUCCEEDED:
            limit = document_data["spec"].get("timeout_sec")
            state, reason_code = TaskState.FAILED, Reason.TIMEOUT.value
            reason = f"timed out: ran longer than spec.timeout_sec ({limit:g}s) and was stopped"
        if run.stop_reason == "cancelled" and state != TaskState.SUCCEEDED:
            state, reason_code, reason = (
                TaskState.CANCELLED,
                Reason.CANCELLED_BY_USER.value,
                "cancelled on request",
            )
        finished = time.time()
        usage = self._usage(reporter, result, finished - started, len(gpus))
        daily = self._daily(task_type, state, usage, gpus)
        if crashed and run.stop_reason is None:
            # A dead executor process (most often out of memory) may be the machine's fault, not the
            # task's: retried like a lost worker, within the same attempt limit and with backoff.
            retry = await lifecycle.requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                attempt=run.attempt,
                reason_code=Reason.EXECUTOR_CRASHED.value,
                reason=reason,
                backoff=self.backoff,
                exhausted_code=Reason.EXECUTOR_CRASHED.value,
                final_usage=daily,
                owner=owner,
            )
            if retry.state != TaskState.FAILED:
                log.info("task %s: %s; retried", task_id, reason)
                return False
            log.info("task %s failed: %s", task_id, reason)
            await self._ack(entry_id)
            return True  # ended: a replica group hears of it
        final = Move(
            state,
            sources=[TaskState.RUNNING],
            expect_worker=self.worker_id,
            expect_attempt=run.attempt,
            release=True,
            result=result if state == TaskState.SUCCEEDED else None,
            usage=daily,
            owner=owner,
            ack=entry_id,
            fields={
                "finished_at": repr(finished),
                "usage": json.dumps(usage),
                "reason": reason,
                "reason_code": reason_code,
                "cancel_requested": "",
            },
            now=finished,
        )
        what = f"task {task_id}: recording how it ended"
        if deferred_start is None:
            outcome = await self._persist(what, self.store.apply, task_id, final)
        else:
            outcome = await self._persist(what, self.store.apply, task_id, deferred_start, then=final)
        if not outcome.ok and await self._recorded(task_id, run.attempt):
            return True  # an earlier try was applied; only its answer was lost
        if not outcome.ok:
            if deferred_start is not None:
                # It was cancelled or moved before its start was recorded: as if it never ran.
                await asyncio.to_thread(shutil.rmtree, out_dir, True)
                return False
            log.warning(
                "task %s: result not recorded (%s %s); it was moved elsewhere",
                task_id,
                outcome.error,
                outcome.detail,
            )
            return False
        if state != TaskState.SUCCEEDED:
            log.info("task %s %s: %s", task_id, state, reason)
        return True

    async def _resolve_adapter(self, document_data: dict[str, Any], owner: str) -> dict[str, Any]:
        """Turn ``model.adapter.path`` naming a training task into the adapter that task produced."""
        adapter = (document_data["spec"].get("model") or {}).get("adapter") or {}
        reference = adapter.get("path") or ""
        if not TASK_ID.match(reference):
            return document_data
        fields = await self.redis.hmget(keys.task(reference), "owner", "state", "artifacts")
        if fields[1] is None:
            raise ExecutionError(f"model.adapter.path names task {reference}, which does not exist")
        if fields[0] != owner:
            raise ExecutionError(f"model.adapter.path names task {reference}, which belongs to another user")
        produced = json.loads(fields[2] or "{}").get("adapter")
        if fields[1] != TaskState.SUCCEEDED or not produced:
            raise ExecutionError(
                f"task {reference} has no adapter to load (it is {fields[1]}); name a succeeded sft, dpo, grpo or "
                "ppo task, or a LoRA folder"
            )
        resolved = json.loads(json.dumps(document_data))
        resolved["spec"]["model"]["adapter"]["path"] = produced["path"]
        return resolved

    @staticmethod
    async def _write_result(path: Path, result: dict[str, Any]) -> None:
        # Small results are written on the loop: a thread hop would cost more than the write.
        if len(result) < 32 and len(json.dumps(result, default=str)) < 64 * 1024:
            write_json_atomic(path, result)
        else:
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
        python = self.settings.executor_pythons.get(task_type)
        if python is None and (info is None or not info.available):
            missing = f" (missing {', '.join(info.missing)})" if info else ""
            raise ExecutionError(f"worker {self.worker_id} cannot run {task_type!r} tasks{missing}")
        document = run.document or validate(document_data)
        isolation = "process" if python or info is None else info.cls.isolation_for(document.spec)
        if isolation in ("inline", "loop") and info is not None:
            import threading

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
            run.inline_cancel = ctx.cancel_event
            if run.stop_reason is not None:
                ctx.cancel_event.set()
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
        if outcome["ev"] == "done":
            return outcome["result"]
        if outcome.get("code") == "cancelled":
            raise TaskCancelled(outcome.get("message", "cancelled"))
        raise ExecutionError(outcome.get("message", "the executor failed"))

    @staticmethod
    def _usage(reporter: Reporter, result: dict[str, Any] | None, wall: float, gpu_count: int) -> dict[str, float]:
        usage = dict(reporter.usage)
        if not usage and result and isinstance(result.get("usage"), dict):
            usage = {
                k: float(v)
                for k, v in result["usage"].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        usage["wall_sec"] = round(wall, 6)
        usage["gpu_seconds"] = round(wall * gpu_count, 6)
        return usage

    def _daily(self, task_type: str, state: TaskState, usage: dict[str, float], gpus: list[int]) -> dict[str, float]:
        daily = {
            "tasks": 1.0,
            f"tasks.{task_type}": 1.0,
            f"tasks.{task_type}.{state}": 1.0,
            f"state.{state}": 1.0,
        }
        for name in (
            "wall_sec",
            "gpu_seconds",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "train_samples",
            "train_tokens",
        ):
            if name in usage:
                daily[name] = usage[name]
        if gpus and usage.get("gpu_seconds"):
            names = {g["index"]: g.get("name", "gpu") for g in self.hardware["gpus"]}
            model = names.get(gpus[0], "gpu")
            daily[f"gpu_seconds.{model}"] = usage["gpu_seconds"]
        return daily

    # -------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"RESULTS_DIR {self.results_dir} cannot be created: {exc.strerror or exc}") from exc
        await self.register()
        loops = [
            asyncio.create_task(self._consume_loop(), name="consume"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        await self.stopping.wait()
        await self._drain(loops)

    async def _drain(self, loops: list[asyncio.Task[None]]) -> None:
        log.info("worker %s stopping: taking no new tasks", self.worker_id)
        await asyncio.gather(loops[0], return_exceptions=True)
        try:
            await self.registry.set_status(self.worker_id, "draining")
            # Assigned but not started: hand back at once, without using an attempt.
            for task_id in await self.registry.task_ids(self.worker_id):
                if task_id not in self.running:
                    await lifecycle.requeue(
                        self.store,
                        task_id,
                        worker_id=self.worker_id,
                        reason_code=Reason.WORKER_SHUTDOWN.value,
                        reason=f"worker {self.worker_id} shut down",
                        backoff=self.backoff,
                    )
        except aioredis.RedisError as exc:
            log.warning(
                "Redis is unavailable while stopping (%s); the orchestrator requeues this worker's tasks once "
                "its heartbeat expires",
                exc,
            )
        if self.running:
            log.info(
                "waiting up to %.0fs for %d running task(s)",
                self.settings.shutdown_grace_sec,
                len(self.running),
            )
            deadline = time.monotonic() + self.settings.shutdown_grace_sec
            while self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for run in list(self.running.values()):
                await self._stop(run, "shutdown")
            while self.running:
                await asyncio.sleep(0.1)
        for loop in loops[1:]:
            loop.cancel()
        await asyncio.gather(*loops[1:], *self._tasks, return_exceptions=True)
        await self.pool.close()
        with contextlib.suppress(aioredis.RedisError):
            await self.registry.set_status(self.worker_id, "offline")
            await self.redis.delete(keys.worker_stream(self.worker_id))
        log.info("worker %s stopped", self.worker_id)

    def request_stop(self) -> None:
        self.stopping.set()


_PROBE = (
    "import json, sys\n"
    "from mloc.executors.registry import executor_for\n"
    "info = executor_for(sys.argv[1])\n"
    "print(json.dumps(list(info.missing) if info else ['no executor for this task type']))\n"
)


def probe_interpreter(python: str, task_type: str) -> list[str]:
    """What another interpreter lacks to run ``task_type`` (empty when it can run it)."""
    try:
        done = subprocess.run(
            [python, "-c", _PROBE, task_type], capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"cannot start it: {exc}"]
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"it failed: {tail}"]
    try:
        return [str(item) for item in json.loads(done.stdout.strip().splitlines()[-1])]
    except (ValueError, IndexError):
        return [f"unexpected answer: {done.stdout[-200:]!r}"]


async def serve(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    url = resolve_url(settings)
    log.info("connecting to Redis at %s", redact(url))
    redis = await connect(url)
    worker = Worker(settings, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (as the orchestrator's uvicorn uses it): each Redis round trip
    costs the worker less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    from mloc.logs import setup

    try:
        settings = get_settings()
    except ValidationError as exc:
        setup("INFO")
        log.error("invalid configuration: %s", exc)
        raise SystemExit(2) from None
    setup(settings.log_level, json_lines=settings.log_json)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings))
    except ConfigError as exc:
        log.error("%s", exc.message)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
