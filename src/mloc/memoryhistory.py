"""Measured memory peaks against the estimates admission made: the last ratio per model and task kind.

When a task with an estimate (``memory_estimate`` on its record) succeeds, its worker compares what the
run measured (:mod:`mloc.worker.peak`) with what was estimated and keeps the ratio in Redis
(:func:`remember`); admission reads it (:func:`latest`) and corrects the next estimate for the same
model and kind by it, saying so in the estimate's notes. Only like is compared with like: the same
device; on a CPU, the RSS the task added to an executor process that had its libraries loaded already
and did not hold the model (else the imports or the missing weights would skew the ratio); on a GPU,
what torch's allocator reserved against the parts it allocates (not the CUDA context, not what vLLM's
``gpu_memory_utilization`` leaves to others), and never for vLLM, which claims its share whatever the
task needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from mloc import keys

RATIO_TTL_SEC = 90 * 86_400
# A correction outside this range would say more about the measurement than about the model.
APPLIED_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Measured:
    """One run's peak against its estimate (the estimate before any correction)."""

    ratio: float
    measured_bytes: int
    estimated_bytes: int
    task_id: str
    at: float

    @property
    def applied(self) -> float:
        """The factor a later estimate is corrected by: the ratio, held within :data:`APPLIED_RANGE`."""
        low, high = APPLIED_RANGE
        return min(max(self.ratio, low), high)


def compared(estimate: dict[str, Any], peak: dict[str, Any], *, device: str) -> tuple[int, int] | None:
    """(measured, estimated) bytes of one run where the two describe the same thing, else None.
    ``estimate`` is a task's ``memory_estimate``, ``peak`` the run's figures, ``device`` where it ran."""
    if estimate.get("device") != device or not estimate.get("model_key"):
        return None
    parts: dict[str, int] = estimate.get("parts") or {}
    uncorrected = int(estimate.get("total_bytes") or 0) - int(parts.get("correction", 0))
    if device == "gpu":
        gpu = peak.get("gpu_peak_bytes")
        if not gpu or str(estimate.get("task", "")).endswith("on vllm"):
            return None
        held = uncorrected - int(parts.get("overhead", 0)) - int(parts.get("reserve", 0))
        return (int(gpu), held) if held > 0 else None
    if not peak.get("libraries_loaded") or peak.get("model_warm"):
        return None
    added = int(peak.get("rss_peak_bytes") or 0) - int(peak.get("rss_start_bytes") or 0)
    return (added, uncorrected) if added > 0 and uncorrected > 0 else None


async def remember(
    redis: aioredis.Redis, task_id: str, estimate: dict[str, Any], peak: dict[str, Any], *, device: str
) -> Measured | None:
    """Keep one finished run's ratio for its model and kind, when it is comparable (see :func:`compared`)."""
    pair = compared(estimate, peak, device=device)
    if pair is None:
        return None
    measured, estimated = pair
    found = Measured(round(measured / estimated, 4), measured, estimated, task_id, round(time.time(), 3))
    key = keys.memory_ratio(str(estimate["model_key"]), str(estimate.get("kind") or ""))
    await redis.set(key, json.dumps(asdict(found)), ex=RATIO_TTL_SEC)
    return found


async def latest(redis: aioredis.Redis, model_key: str, kind: str) -> Measured | None:
    """The last ratio kept for ``model_key`` and ``kind``, or None."""
    raw = await redis.get(keys.memory_ratio(model_key, kind))
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Measured(
            float(data["ratio"]),
            int(data["measured_bytes"]),
            int(data["estimated_bytes"]),
            str(data["task_id"]),
            float(data["at"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
