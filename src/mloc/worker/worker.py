"""The worker: registration, heartbeats, the assignment loop and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from mloc import __version__, heap, keys, orchestrators, stopping
from mloc.connection import redact
from mloc.errors import ConfigError
from mloc.executors.registry import available_task_types, capabilities
from mloc.llm.downloads import held_models
from mloc.llm.factsources import held_model_facts
from mloc.records import Registration, WorkerStatus, heartbeat_fields
from mloc.removals import FolderSweeper
from mloc.requeue import Backoff, hand_back, requeue
from mloc.settings import Settings
from mloc.spec import Document
from mloc.state import Reason, StopReason, TaskState
from mloc.store import Coalescer, TaskStore
from mloc.worker import hardware
from mloc.worker.process import HostPool
from mloc.worker.runner import Running, TaskRunner
from mloc.workers import WorkerRegistry

log = logging.getLogger(__name__)

CONSUME_BLOCK_MS = 500  # how long one read of the assignment stream waits for an entry
CONSUME_COUNT = 64  # the most assignments one read takes
# A command that finds Redis gone is retried for half a minute (mloc.connection.OUTAGE_RETRIES). A
# stopping worker does not wait that out for its own records: what it cannot write within this, the
# orchestrator's reaper does once the worker's heartbeat has expired.
DRAIN_REDIS_SEC = 5.0
# A heartbeat that has not gone through after this long (or two intervals) is said in the log.
HEARTBEAT_SAY_SEC = 10.0
# A worker that has seen no orchestrator on its Redis this long says so, once: it is most likely pointed
# at another server or database than the orchestrators, and would wait for tasks for ever.
NO_ORCHESTRATOR_SAY_SEC = 60.0


class Worker(TaskRunner):
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.store = TaskStore(redis)
        self.mover = Coalescer(self.store)
        self.registry = WorkerRegistry(redis)
        self.worker_id = settings.resolved_worker_id
        self.results_dir = settings.results_dir.resolve()
        self.folders = FolderSweeper(redis, self.results_dir)
        self.models_dir = settings.resolved_models_dir.resolve()
        # Read once: the setting is parsed each time it is asked for, and the runner asks on every task.
        self.executor_pythons = settings.executor_pythons
        self.hardware = hardware.detect(settings)
        self.task_types = self._offered_task_types()
        self.pool = HostPool(env={"MLOC_MODELS_DIR": str(self.models_dir)})
        self.running: dict[str, Running] = {}
        self.handling: Counter[str] = Counter()
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._instant_documents: dict[str, Document | None] = {}
        # Used only for tasks stored without their own policy (submitted to an older orchestrator).
        self.backoff = Backoff(settings.retry_backoff_sec, settings.retry_backoff_max_sec)
        self.max_requeues = settings.max_requeues
        # The model facts last published (registration or heartbeat): sent again only when they change.
        self._published_facts: dict[str, Any] | None = None
        # Tasks Redis says this worker holds that it is not handling, as the last sweep found them.
        self._unhandled: dict[str, tuple[str, int]] = {}
        # Since when no orchestrator has been seen on this Redis (monotonic), and whether that was said.
        self._alone_since = time.monotonic()
        self._said_alone = False
        # The orchestrators' HEARTBEAT_TTL_SEC, from their records, once one was seen.
        self.orchestrator_ttl_sec: float | None = None

    def _offered_task_types(self) -> list[str]:
        """Task types this worker runs: those its own environment has, plus those an interpreter in
        MLOC_EXECUTOR_PYTHON says it can run."""
        offered = set(available_task_types())
        for task_type, python in self.executor_pythons.items():
            missing = probe_interpreter(python, task_type)
            if missing:
                log.warning("%s tasks are not offered: %s cannot run them (%s)", task_type, python, "; ".join(missing))
                offered.discard(task_type)
            else:
                offered.add(task_type)
        return sorted(offered)

    # ------------------------------------------------------------ membership
    async def _recover(self, reason_code: Reason, reason: str) -> None:
        """Hand back whatever an earlier incarnation of this worker id held."""
        await self.registry.set_status(self.worker_id, WorkerStatus.RESTARTING)
        await self._hand_back(reason_code, reason)
        await self._ensure_group()

    async def _hand_back(self, reason_code: Reason, reason: str) -> None:
        """Requeue what this worker holds but is not running (its running tasks it ends itself)."""
        await hand_back(
            self.store,
            self.worker_id,
            reason_code=reason_code,
            reason=reason,
            keep=set(self.running),
            backoff=self.backoff,
            max_requeues=self.max_requeues,
        )

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.worker_stream(self.worker_id), keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def register(self) -> None:
        await self._recover(Reason.WORKER_RESTARTED, f"worker {self.worker_id} restarted")
        facts = await asyncio.to_thread(held_model_facts, self.models_dir, hf_cache=hf_hub_cache())
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
                model_facts=facts,
                heartbeat_interval_sec=self.settings.heartbeat_interval_sec,
                artifact_store=self.settings.artifact_store_url or "",
            )
        )
        self._published_facts = facts
        store = self.settings.artifact_store_url
        log.info(
            "worker %s registered: topics %s, task types %s, %d GPU(s), results in %s, %s",
            self.worker_id,
            ",".join(self.settings.topics),
            ",".join(self.task_types),
            len(self.hardware["gpus"]),
            self.results_dir,
            f"published to {store}"
            if store
            else "not published (no MLOC_ARTIFACT_STORE: served from a shared disk only)",
        )

    async def _heartbeat_loop(self) -> None:
        """Beat until :meth:`_drain` cancels this loop. A stopping worker beats on while its running tasks
        end: MLOC_SHUTDOWN_GRACE_SEC may well be longer than the orchestrator's HEARTBEAT_TTL_SEC, and a
        worker declared lost meanwhile would have its tasks requeued as lost, not handed back."""
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_interval_sec)
            if self.stopping.is_set():
                break
            try:
                # Warm means ready for the next task: an idle executor holding the model. One running a task
                # holds its model too, but a task placed here for it would load the model again beside it.
                warm = set(self.pool.warm_models())
                held = await asyncio.to_thread(held_models, self.models_dir, hf_cache=hf_hub_cache())
                facts = await asyncio.to_thread(held_model_facts, self.models_dir, hf_cache=hf_hub_cache())
                changed = facts if facts != self._published_facts else None
                # A cut network drops no connection: a write waits on it silently. Said, and tried afresh.
                wait = self._beat_wait_sec()
                try:
                    async with asyncio.timeout(wait):
                        answer = await self.registry.heartbeat(self.worker_id, heartbeat_fields(warm, held, changed))
                except TimeoutError:
                    log.warning(
                        "heartbeat: Redis did not answer within %.0fs (network?); trying again. Without one for "
                        "the orchestrator's HEARTBEAT_TTL_SEC this worker is declared lost and its tasks requeued",
                        wait,
                    )
                    continue
                if answer == "ok":
                    self._published_facts = facts
                    await self.sweep()
                    await self.folders.sweep()
                if answer != "ok":
                    advice = self._heartbeat_advice()
                    log.warning(
                        "worker %s was marked %s; stopping its tasks and registering again%s",
                        self.worker_id,
                        answer,
                        f" ({advice})" if advice else "",
                    )
                    for run in list(self.running.values()):
                        await self._stop(run, StopReason.LOST)
                    await self.register()
                with contextlib.suppress(aioredis.RedisError):  # the next heartbeat says what Redis does
                    await self._look_for_orchestrators()
            except aioredis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
        while True:
            await self._drain_beat()
            await asyncio.sleep(self.settings.heartbeat_interval_sec)

    def _beat_wait_sec(self) -> float:
        """How long a heartbeat waits for Redis before it is said and tried afresh."""
        return max(2 * self.settings.heartbeat_interval_sec, HEARTBEAT_SAY_SEC)

    async def _drain_beat(self) -> None:
        """A stopping worker's heartbeat: liveness only. It registers no more; declared lost all the same
        (Redis was away longer than the TTL), it stops its tasks, which the orchestrator has requeued."""
        try:
            async with asyncio.timeout(self._beat_wait_sec()):
                answer = await self.registry.heartbeat(self.worker_id)
        except (aioredis.RedisError, TimeoutError) as exc:
            log.warning("heartbeat while stopping failed: %s", exc or "Redis did not answer")
            return
        if answer != "ok":
            log.warning("worker %s was marked %s while stopping; stopping its tasks now", self.worker_id, answer)
            for run in list(self.running.values()):
                await self._stop(run, StopReason.LOST)

    async def _look_for_orchestrators(self) -> None:
        """Read the orchestrators' records (:mod:`mloc.orchestrators`): say once when none has been seen
        for :data:`NO_ORCHESTRATOR_SAY_SEC`, and again when one appears; learn their heartbeat TTL and say
        when this worker's interval is too long for it."""
        try:
            seen = await orchestrators.live(self.redis)
        except aioredis.RedisError:
            # The silence is counted only while Redis answers: orchestrators could not write there either.
            self._alone_since = time.monotonic()
            raise
        if not seen:
            if not self._said_alone and time.monotonic() - self._alone_since >= NO_ORCHESTRATOR_SAY_SEC:
                self._said_alone = True
                log.warning(
                    "no orchestrator has run on this worker's Redis for %.0fs (%s): no task reaches this "
                    "worker until one does. Check that the orchestrator is running, and that its REDIS_URL "
                    "names the same server and database as this worker's (the number after the last '/', "
                    "0 when left out)",
                    time.monotonic() - self._alone_since,
                    self._redis_named(),
                )
            return
        self._alone_since = time.monotonic()
        if self._said_alone:
            self._said_alone = False
            log.info(
                "%s runs on this worker's Redis now (%s): tasks can reach this worker",
                seen[0].record.named(),
                self._redis_named(),
            )
        ttl = orchestrators.heartbeat_ttl(seen)
        if ttl is not None and ttl != self.orchestrator_ttl_sec:
            self.orchestrator_ttl_sec = ttl
            advice = self._heartbeat_advice()
            if advice:
                log.warning("%s", advice)

    def _redis_named(self) -> str:
        """This worker's Redis URL, passwords left out, and its database number."""
        db = self.redis.connection_pool.connection_kwargs.get("db", 0)
        url = self.settings.redis_url
        named = f"{self.settings.redis_url_variable} {redact(url)}" if url else "no REDIS_URL set"
        return f"{named}, database {db}"

    def _heartbeat_advice(self) -> str:
        """What to change when this worker's heartbeat interval is over a third of the orchestrators'
        HEARTBEAT_TTL_SEC: one late or lost heartbeat then gets it declared lost, and it flaps between
        lost and active. Empty when it is not, or the TTL is not known."""
        ttl, interval = self.orchestrator_ttl_sec, self.settings.heartbeat_interval_sec
        if ttl is None or interval <= ttl / 3:
            return ""
        return (
            f"this worker heartbeats every {interval:g}s (its HEARTBEAT_INTERVAL_SEC), more than a third of the "
            f"orchestrator's HEARTBEAT_TTL_SEC ({ttl:g}s): one late heartbeat and it is declared lost and its tasks "
            f"requeued. Set HEARTBEAT_TTL_SEC to at least three intervals ({3 * interval:g}s) on every "
            f"orchestrator, or HEARTBEAT_INTERVAL_SEC to at most {math.floor(ttl / 3 * 10) / 10:g}s here"
        )

    async def sweep(self) -> list[str]:
        """Hand back the tasks Redis says this worker holds that it is not handling, and return them.
        A Redis outage can lose the answer to a read or a write (an assignment read, a start), and
        leave such a task: its worker heartbeats, so the reaper never takes it. Only a task found so
        at two sweeps in a row, on the same attempt, goes back."""
        began = time.monotonic()
        held = await self.redis.smembers(keys.worker_tasks(self.worker_id))
        unknown = sorted(t for t in held if t not in self.handling)
        if not unknown:
            self._unhandled = {}
            return []
        pipe = self.redis.pipeline(transaction=False)
        for task_id in unknown:
            pipe.hmget(keys.task(task_id), "state", "attempts")
        found = {
            task_id: (state, int(attempts or 0))
            for task_id, (state, attempts) in zip(unknown, await pipe.execute(), strict=True)
            if state in (TaskState.ASSIGNED, TaskState.RUNNING, TaskState.CANCELLING)
        }
        handed: list[str] = []
        for task_id, seen in found.items():
            if self._unhandled.get(task_id) != seen or task_id in self.handling:
                continue
            outcome = await requeue(
                self.store,
                task_id,
                worker_id=self.worker_id,
                attempt=seen[1],
                reason_code=Reason.ORPHANED,
                reason=f"worker {self.worker_id} held it but was not running it (Redis lost an answer to the worker)",
                backoff=self.backoff,
                max_requeues=self.max_requeues,
            )
            if outcome.ok:
                log.warning("task %s: held by this worker but not running here; handed back", task_id)
                handed.append(task_id)
        self._unhandled = {t: seen for t, seen in found.items() if t not in handed}
        if handed:
            await self._drop_entries(set(handed), began)
        return handed

    async def _drop_entries(self, tasks: set[str], began: float) -> None:
        """Acknowledge and delete the stream entries of tasks just handed back. An assignment whose
        read lost its answer stays pending for this worker, which reads only new entries: it would
        stay until the worker registers again. Only entries delivered before the sweep began are
        taken, so a task placed here again since keeps its new entry for its handler."""
        stream = keys.worker_stream(self.worker_id)
        idle_ms = int((time.monotonic() - began) * 1000) + 1
        pending = await self.redis.xpending_range(
            stream, keys.WORKER_GROUP, "-", "+", 1000, consumername=self.worker_id, idle=idle_ms
        )
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry in pending:
            pipe.xrange(stream, min=entry["message_id"], max=entry["message_id"], count=1)
        stale = [
            entry_id for found in await pipe.execute() for entry_id, fields in found if fields.get("task") in tasks
        ]
        if stale:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(stream, keys.WORKER_GROUP, *stale)
            pipe.xdel(stream, *stale)
            await pipe.execute()

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
                        await self._stop(self.running[task_id], StopReason.CANCELLED)
            if time.monotonic() - last_poll > 2.0 and self.running:
                last_poll = time.monotonic()
                ids = list(self.running)
                pipe = self.redis.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hget(keys.task(task_id), "cancel_requested")
                for task_id, flag in zip(ids, await pipe.execute(), strict=True):
                    if flag == "1" and task_id in self.running:
                        await self._stop(self.running[task_id], StopReason.CANCELLED)

    async def _consume_loop(self) -> None:
        stream = keys.worker_stream(self.worker_id)
        while not self.stopping.is_set():
            try:
                reply = await self.redis.xreadgroup(
                    keys.WORKER_GROUP, self.worker_id, {stream: ">"}, count=CONSUME_COUNT, block=CONSUME_BLOCK_MS
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
            read = 0
            ending: list[asyncio.Task[None]] = []
            for _, entries in reply or []:
                read += len(entries)
                for entry_id, fields in entries:
                    if self.stopping.is_set():
                        break  # left unacknowledged: handed back at shutdown
                    handler, instant = self._accept(entry_id, fields)
                    if instant:
                        ending.append(handler)
            if ending and read < CONSUME_COUNT:
                # Nothing waited behind this read, so the next one would only block: the ends of the
                # tasks that finish at once go to Redis first. Sent after it, each such end would
                # reach Redis a hop later (the read written, and Redis woken for it, on the way).
                await asyncio.wait(ending)

    # -------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"RESULTS_DIR {self.results_dir} cannot be created: {exc.strerror or exc}") from exc
        await self.register()
        with contextlib.suppress(aioredis.RedisError):
            await self._look_for_orchestrators()
        heap.settle()
        loops = [
            asyncio.create_task(self._consume_loop(), name="consume"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        await self.stopping.wait()
        await self._drain(loops)

    async def _drain(self, loops: list[asyncio.Task[None]]) -> None:
        log.info("worker %s stopping: taking no new tasks", self.worker_id)
        # Its read blocks for half a second; one that finds Redis gone would retry for half a minute.
        # Cancelled, an entry it was reading stays unacknowledged and is handed back below.
        await asyncio.wait([loops[0]], timeout=2 * CONSUME_BLOCK_MS / 1000)
        await stopping.cancel(loops[0])
        reachable = True
        try:
            async with asyncio.timeout(DRAIN_REDIS_SEC):
                await self.registry.set_status(self.worker_id, WorkerStatus.DRAINING)
                # Assigned but not started: hand back at once, without using an attempt.
                await self._hand_back(Reason.WORKER_SHUTDOWN, f"worker {self.worker_id} shut down")
        except (aioredis.RedisError, TimeoutError) as exc:
            reachable = False
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
                await self._stop(run, StopReason.SHUTDOWN)
            while self.running:
                await asyncio.sleep(0.1)
        await stopping.cancel(*loops[1:])
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()
        with contextlib.suppress(aioredis.RedisError, TimeoutError):
            async with asyncio.timeout(DRAIN_REDIS_SEC if reachable else 0.5):
                await self.registry.set_status(self.worker_id, WorkerStatus.OFFLINE)
                await self.redis.delete(keys.worker_stream(self.worker_id))
        log.info("worker %s stopped", self.worker_id)

    def request_stop(self) -> None:
        self.stopping.set()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache this worker's executors read, found as huggingface_hub finds it
    (the worker itself may not have that library)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


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
