"""The worker's handle on executor processes, and the pool that keeps idle ones warm."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mloc.state import StopReason
from mloc.worker.capture import Lines
from mloc.worker.host import EVENT_FD_ENV, WORKER_PID_ENV

log = logging.getLogger(__name__)
Event = dict[str, Any]
# How long a finished task waits for the rest of its executor process's output to be read.
DRAIN_SEC = 2.0


class LogSink(Protocol):
    """Where a running task's captured output goes (:meth:`mloc.worker.reporter.Reporter.log_line`)."""

    def __call__(self, text: str, *, level: str = ..., source: str = ...) -> None: ...


class HostDied(Exception):
    """The executor process ended in the middle of a task."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (killed: most often the system ran out of memory)" if -returncode == signal.SIGKILL else ""
            text = f"the executor process died from {name}{hint}"
        else:
            text = f"the executor process exited with code {returncode}"
        super().__init__(text)


@dataclass(frozen=True)
class HostKey:
    python: str
    gpus: tuple[int, ...]


@dataclass
class HostProcess:
    key: HostKey
    proc: asyncio.subprocess.Process
    events: asyncio.StreamReader
    warm_models: list[str] = field(default_factory=list)
    log_sink: LogSink | None = None
    _pumps: list[asyncio.Task[None]] = field(default_factory=list)
    # Set by each output pump when it reads the end-of-task line: the task's output is all in.
    _drained: list[asyncio.Event] = field(default_factory=list)

    @classmethod
    async def start(cls, key: HostKey, env: dict[str, str]) -> HostProcess:
        read_fd, write_fd = os.pipe()
        child_env = {
            **os.environ,
            **env,
            EVENT_FD_ENV: str(write_fd),
            WORKER_PID_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        if key.gpus:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in key.gpus)
        try:
            proc = await asyncio.create_subprocess_exec(
                key.python,
                "-m",
                "mloc.worker.host",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env=child_env,
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
        host = cls(key, proc, reader)
        assert proc.stdout is not None and proc.stderr is not None
        host._drained = [asyncio.Event(), asyncio.Event()]
        host._pumps = [
            asyncio.create_task(host._pump_logs(proc.stdout, Lines("stdout"), host._drained[0])),
            asyncio.create_task(host._pump_logs(proc.stderr, Lines("stderr"), host._drained[1])),
        ]
        ready = await host._next_event()
        if ready is None or ready.get("ev") != "ready":
            await host.kill()
            raise HostDied(proc.returncode)
        return host

    async def _pump_logs(self, stream: asyncio.StreamReader, lines: Lines, drained: asyncio.Event) -> None:
        """The executor process's output, sorted into entries, to the running task's log (between
        tasks, to the worker's debug log)."""
        while True:
            data = await stream.read(64 * 1024)
            ended = lines.tasks_ended
            for captured in lines.feed(data):
                if self.log_sink is not None:
                    self.log_sink(captured.text, level=captured.level, source=captured.source)
                else:
                    log.debug("executor[%s] %s: %s", self.proc.pid, captured.source, captured.text)
            if lines.tasks_ended != ended or not data:
                drained.set()
            if not data:
                return

    async def _next_event(self) -> Event | None:
        line = await self.events.readline()
        if not line:
            return None
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def run(self, payload: dict[str, Any], on_event: Callable[[Event], None]) -> Event:
        """Run one task; returns its 'done' or 'error' event, or raises :class:`HostDied`."""
        for drained in self._drained:
            drained.clear()
        await self._send({"op": "run", **payload})
        outcome: Event | None = None
        while True:
            event = await self._next_event()
            if event is None:
                await self.proc.wait()
                with contextlib.suppress(Exception):
                    # The last words of a dying process (a traceback, an OOM note) belong to the task.
                    await asyncio.wait_for(asyncio.gather(*self._pumps), 2)
                raise HostDied(self.proc.returncode)
            kind = event.get("ev")
            if kind in ("done", "error"):
                outcome = event
            elif kind == "idle":
                self.warm_models = list(event.get("warm_models", []))
                assert outcome is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(d.wait() for d in self._drained)), DRAIN_SEC)
                return outcome
            else:
                on_event(event)

    async def cancel(self, task_id: str, attempt: int, why: StopReason | None = None) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send({"op": "cancel", "task_id": task_id, "attempt": attempt, "why": why})

    async def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def close(self, timeout: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send({"op": "shutdown"})
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()


class HostPool:
    """Idle executor processes kept for reuse; a task takes one with the same interpreter and GPUs,
    preferring one that already holds its model."""

    def __init__(self, env: dict[str, str], max_idle: int = 2) -> None:
        self.env = env
        self.max_idle = max_idle
        self.idle: list[HostProcess] = []

    async def acquire(self, key: HostKey, model: str | None) -> HostProcess:
        matching = [h for h in self.idle if h.key == key and h.alive]
        if model:
            matching.sort(key=lambda h: not any(m.split(":", 1)[-1] == model for m in h.warm_models))
        if matching:
            host = matching[0]
            self.idle.remove(host)
            return host
        return await HostProcess.start(key, self.env)

    async def release(self, host: HostProcess) -> None:
        host.log_sink = None
        if not host.alive:
            return
        self.idle.append(host)
        while len(self.idle) > self.max_idle:
            await self.idle.pop(0).close()

    def warm_models(self) -> list[str]:
        return sorted({m for h in self.idle if h.alive for m in h.warm_models})

    async def close(self) -> None:
        hosts, self.idle = self.idle, []
        await asyncio.gather(*(h.close() for h in hosts), return_exceptions=True)


def default_python() -> str:
    return sys.executable
