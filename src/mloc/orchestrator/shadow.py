"""A held worker: when a waiting task can start on it (the shadow time), and what may run there first.

Pure computation over figures read elsewhere (:mod:`.backfill` reads them from Redis), so the rules
of EASY backfill can be checked on their own:

- :func:`expected_end`: when a task on a worker is expected to give its resources back.
- :func:`shadow_time`: the earliest moment the ends free enough of a worker for a waiting task.
- :class:`Hold`: the waiting task's claim on that worker; :meth:`Hold.admits` says whether another
  task may start there meanwhile (it ends before the shadow time, or it leaves what the held task
  needs free at that time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mloc.orchestrator.placement import Request, usable_gpus
from mloc.records import WorkerView
from mloc.spec.quantity import format_cpu, readable_memory

# Task ids named in a pending reason, at most.
SHOWN_TASKS = 4


@dataclass(frozen=True)
class Need:
    """What the held task takes from a worker: CPU (millicores), memory (bytes), GPUs among
    ``usable`` (the worker's GPUs of the model and memory it asks for) and one slot."""

    cpu: int
    mem: int
    gpu_count: int
    usable: frozenset[int]


@dataclass(frozen=True)
class Capacity:
    """A worker's free resources at one moment."""

    cpu: int
    mem: int
    slots: int
    gpus: frozenset[int]

    def fits(self, need: Need) -> bool:
        return (
            self.slots >= 1
            and self.cpu >= need.cpu
            and self.mem >= need.mem
            and len(self.gpus & need.usable) >= need.gpu_count
        )

    def missing(self, need: Need) -> tuple[int, int, int, int]:
        """What ``need`` lacks here: GPUs, slots, CPU, memory (0 where enough)."""
        return (
            max(0, need.gpu_count - len(self.gpus & need.usable)),
            max(0, 1 - self.slots),
            max(0, need.cpu - self.cpu),
            max(0, need.mem - self.mem),
        )

    def plus(self, held: Holding) -> Capacity:
        return Capacity(self.cpu + held.cpu, self.mem + held.mem, self.slots + 1, self.gpus | held.gpus)

    def minus(self, cpu: int, mem: int, gpus: Iterable[int]) -> Capacity:
        return Capacity(self.cpu - cpu, self.mem - mem, self.slots - 1, self.gpus - frozenset(gpus))

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "mem": self.mem, "slots": self.slots, "gpus": sorted(self.gpus)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capacity:
        return cls(int(data["cpu"]), int(data["mem"]), int(data["slots"]), frozenset(int(g) for g in data["gpus"]))


def need_of(req: Request, view: WorkerView) -> Need:
    """What ``req`` takes from ``view``, in these terms."""
    return Need(req.cpu, req.mem, req.gpu_count, frozenset(usable_gpus(req, view)) if req.gpu_count else frozenset())


def capacity_of(view: WorkerView) -> Capacity:
    """What ``view`` has free, as last reported."""
    return Capacity(view.cpu_free, view.mem_free, view.slots_free, frozenset(view.free_gpus))


@dataclass(frozen=True)
class Holding:
    """A task assigned to or running on a worker, with what it holds and when it should end."""

    task_id: str
    cpu: int
    mem: int
    gpus: frozenset[int]
    ends_at: float | None  # unix seconds; None when nothing says
    basis: str  # what ``ends_at`` comes from, for a person
    owner: str = ""  # whose task it is (for fair share)
    since: float | None = None  # when it started (or was placed), unix seconds


def expected_end(
    *,
    now: float,
    assigned_at: float | None,
    started_at: float | None,
    progress_eta: tuple[float, float] | None,
    median_sec: float | None,
    timeout_sec: float | None,
) -> tuple[float | None, str]:
    """When a placed task should end, and from what, in this order:

    1. its progress ETA (``progress_eta``: seconds left as of the unix time it was reported);
    2. else the median run of its kind (``median_sec``, from its placement, as the history measures);
    3. else its timeout (``timeout_sec``, from its start).

    Never later than its timeout, and never before ``now``: a task past its estimate may end at any
    moment. (None, ...) when none of the three is known.
    """
    start = started_at or assigned_at or now
    limit = start + timeout_sec if timeout_sec else None
    if progress_eta is not None:
        left, reported_at = progress_eta
        end, basis = reported_at + left, "progress ETA"
    elif median_sec is not None:
        end, basis = (assigned_at or start) + median_sec, "median run of its kind"
    elif limit is not None:
        end, basis = limit, "timeout"
    else:
        return None, "no progress ETA, run history or timeout"
    if limit is not None and limit < end:
        end, basis = limit, "timeout"
    return max(now, end), basis


@dataclass(frozen=True)
class Shadow:
    """When a waiting task can start on a worker: ``at`` (unix seconds; None when it waits for a
    task whose end nothing says), what is free then, and the tasks that must end first."""

    at: float | None
    free: Capacity
    waiting_for: tuple[Holding, ...]


def shadow_time(need: Need, free_now: Capacity, holdings: Iterable[Holding], now: float) -> Shadow | None:
    """The earliest moment enough of a worker is free for ``need``, as its tasks end at their
    expected ends (those with no known end last); None when even all of them ending is not enough."""
    if free_now.fits(need):
        return Shadow(now, free_now, ())
    free = free_now
    ended: list[Holding] = []
    unknown = float("inf")
    for held in sorted(holdings, key=lambda h: (unknown if h.ends_at is None else h.ends_at, h.task_id)):
        free = free.plus(held)
        ended.append(held)
        if free.fits(need):
            at = None if held.ends_at is None else max(now, held.ends_at)
            return Shadow(at, free, tuple(ended))
    return None


def in_words(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def clock(at: float, now: float) -> str:
    """'14:05:10 UTC', with the date when it is not today (UTC)."""
    stamp = time.gmtime(at)
    shape = "%H:%M:%S" if stamp[:3] == time.gmtime(now)[:3] else "%Y-%m-%d %H:%M:%S"
    return f"{time.strftime(shape, stamp)} UTC"


@dataclass
class Hold:
    """A waiting task's claim on one worker (stored as JSON where every orchestrator reads it).

    ``free`` is what the worker will have free at the shadow time ``at``; work that stays past
    ``at`` takes from it, and is admitted only if the held task still fits what is left."""

    task_id: str
    worker_id: str
    at: float | None
    need: Need
    free: Capacity
    # What the held task lacks now ("2 GPUs"), and the tasks that must end first (ids; the first one
    # with no known end, if any, is named as such).
    short: str
    waiting_for: list[str] = field(default_factory=list)
    unknown_end: str | None = None
    made_at: float = 0.0

    @classmethod
    def of(cls, task_id: str, worker_id: str, need: Need, free_now: Capacity, shadow: Shadow, now: float) -> Hold:
        unknown = next((h.task_id for h in shadow.waiting_for if h.ends_at is None), None)
        return cls(
            task_id,
            worker_id,
            shadow.at,
            need,
            shadow.free,
            short=describe_missing(free_now.missing(need)),
            waiting_for=[h.task_id for h in shadow.waiting_for],
            unknown_end=unknown,
            made_at=now,
        )

    def ends_before(self, run_sec: float | None, now: float) -> bool:
        return self.at is not None and run_sec is not None and now + run_sec <= self.at

    def admits(self, cpu: int, mem: int, gpus: Iterable[int], run_sec: float | None, now: float) -> bool:
        """Whether another task (taking ``cpu``, ``mem``, ``gpus`` and a slot, expected to run
        ``run_sec``, None when unknown) may start on the held worker now."""
        return self.ends_before(run_sec, now) or self.free.minus(cpu, mem, gpus).fits(self.need)

    def take(self, cpu: int, mem: int, gpus: Iterable[int], run_sec: float | None, now: float) -> None:
        """Count an admitted task: one still running at the shadow time uses what is free then."""
        if not self.ends_before(run_sec, now):
            self.free = self.free.minus(cpu, mem, gpus)

    def when(self, now: float) -> str:
        if self.at is None:
            return f"(start time unknown: {self.unknown_end} has no progress ETA, run history or timeout)"
        if self.at <= now + 0.5:
            return "from now"
        return f"from ~{clock(self.at, now)} (in {in_words(self.at - now)})"

    def reason(self, now: float) -> str:
        """The held task's pending reason."""
        text = f"reserved on {self.worker_id} {self.when(now)}"
        if not self.waiting_for:
            return text
        shown = ", ".join(self.waiting_for[:SHOWN_TASKS])
        more = f" and {len(self.waiting_for) - SHOWN_TASKS} more" if len(self.waiting_for) > SHOWN_TASKS else ""
        return f"{text}: waiting for {self.short} held by {shown}{more}"

    def blocked(self, run_sec: float | None, now: float) -> str:
        """The pending reason of a task the hold keeps off its worker."""
        if run_sec is None:
            why = "this task has no run history of its kind and no timeout, so it cannot be shown to end first"
        elif self.at is None:
            why = f"this task (usually {in_words(run_sec)}) cannot be shown to end first"
        else:
            why = f"this task (usually {in_words(run_sec)}) would not end by then"
        return (
            f"waiting for capacity: {self.worker_id} is reserved for older task {self.task_id} "
            f"{self.when(now)} and {why}; it starts there once that task has started, or on another worker"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "worker_id": self.worker_id,
            "at": self.at,
            "need": {
                "cpu": self.need.cpu,
                "mem": self.need.mem,
                "gpu_count": self.need.gpu_count,
                "usable": sorted(self.need.usable),
            },
            "free": self.free.to_json(),
            "short": self.short,
            "waiting_for": self.waiting_for,
            "unknown_end": self.unknown_end,
            "made_at": self.made_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hold:
        need = data["need"]
        return cls(
            task_id=str(data["task_id"]),
            worker_id=str(data["worker_id"]),
            at=None if data.get("at") is None else float(data["at"]),
            need=Need(int(need["cpu"]), int(need["mem"]), int(need["gpu_count"]), frozenset(need["usable"])),
            free=Capacity.from_json(data["free"]),
            short=str(data.get("short", "")),
            waiting_for=[str(t) for t in data.get("waiting_for", [])],
            unknown_end=data.get("unknown_end"),
            made_at=float(data.get("made_at") or 0.0),
        )

    def copy(self) -> Hold:
        return replace(self, waiting_for=list(self.waiting_for))


def describe_missing(missing: tuple[int, int, int, int]) -> str:
    """'2 GPUs, 1.5 CPU' for what :meth:`Capacity.missing` says a task lacks."""
    gpus, slots, cpu, mem = missing
    parts = []
    if gpus:
        parts.append(f"{gpus} GPU{'s' if gpus > 1 else ''}")
    if cpu:
        parts.append(f"{format_cpu(cpu)} CPU")
    if mem:
        parts.append(f"{readable_memory(mem)} of memory")
    if slots:
        parts.append("a task slot")
    return ", ".join(parts) or "its turn"
