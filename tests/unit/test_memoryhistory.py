"""A run's measured peak is compared with its estimate only where the two measure the same thing, and a
later estimate is corrected by the ratio, within bounds, saying so."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from mloc import memoryhistory
from mloc.llm.estimate import GIB, MIB, Estimate
from mloc.orchestrator.admission import corrected

CPU_ESTIMATE: dict[str, Any] = {
    "task": "inference on transformers",
    "device": "cpu",
    "total_bytes": 400 * MIB,
    "parts": {"weights": 300 * MIB, "activations": 100 * MIB},
    "model_key": "org/m",
    "kind": "inference on transformers (cpu)",
}
WARM_LIBRARIES = {"rss_peak_bytes": 1500 * MIB, "rss_start_bytes": 1000 * MIB, "libraries_loaded": True}


@pytest.mark.parametrize(
    ("estimate", "peak", "device", "expected"),
    [
        # What the task added to a process that had its libraries: 500 MiB against 400.
        (CPU_ESTIMATE, {**WARM_LIBRARIES, "model_warm": False}, "cpu", (500 * MIB, 400 * MIB)),
        # A fresh process imported torch during the task; a warm one held the weights already.
        (CPU_ESTIMATE, {**WARM_LIBRARIES, "libraries_loaded": False, "model_warm": False}, "cpu", None),
        (CPU_ESTIMATE, {**WARM_LIBRARIES, "model_warm": True}, "cpu", None),
        # Run on another device than estimated for.
        (CPU_ESTIMATE, {**WARM_LIBRARIES, "gpu_peak_bytes": GIB}, "gpu", None),
        # A correction already in the estimate is not compared again.
        (
            {**CPU_ESTIMATE, "total_bytes": 480 * MIB, "parts": {**CPU_ESTIMATE["parts"], "correction": 80 * MIB}},
            {**WARM_LIBRARIES, "model_warm": False},
            "cpu",
            (500 * MIB, 400 * MIB),
        ),
        # On a GPU: torch's reserved bytes against what the process allocates (no CUDA context, no reserve).
        (
            {
                "task": "sft with lora",
                "device": "gpu",
                "total_bytes": 10 * GIB,
                "parts": {"weights": 6 * GIB, "activations": 3 * GIB, "overhead": GIB},
                "model_key": "org/m",
            },
            {"gpu_peak_bytes": 12 * GIB},
            "gpu",
            (12 * GIB, 9 * GIB),
        ),
        # vLLM claims its share of the GPU whatever the task needs.
        (
            {"task": "inference on vllm", "device": "gpu", "total_bytes": 10 * GIB, "parts": {}, "model_key": "m"},
            {"gpu_peak_bytes": 20 * GIB},
            "gpu",
            None,
        ),
    ],
    ids=["added-rss", "fresh-process", "model-warm", "other-device", "corrected-estimate", "gpu", "vllm-gpu"],
)
def test_peaks_are_compared_only_with_estimates_of_the_same_thing(
    estimate: dict[str, Any], peak: dict[str, Any], device: str, expected: tuple[int, int] | None
) -> None:
    assert memoryhistory.compared(estimate, peak, device=device) == expected


def test_the_last_ratio_is_kept_per_model_and_kind(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            peak = {**WARM_LIBRARIES, "model_warm": False}
            kept = await memoryhistory.remember(r, "t1", CPU_ESTIMATE, peak, device="cpu")
            assert kept is not None and kept.ratio == 1.25
            assert await memoryhistory.latest(r, "org/m", "inference on transformers (cpu)") == kept
            assert await memoryhistory.latest(r, "org/m", "sft with lora (cpu)") is None
            # Not comparable: nothing kept, the earlier ratio stands.
            assert (
                await memoryhistory.remember(r, "t2", CPU_ESTIMATE, {**peak, "model_warm": True}, device="cpu") is None
            )
            assert (await memoryhistory.latest(r, "org/m", "inference on transformers (cpu)")) == kept
        finally:
            await r.aclose()

    asyncio.run(scenario())


def test_a_correction_scales_the_estimate_within_bounds_and_says_so() -> None:
    estimate = Estimate(task="sft with lora", device="gpu", weights=6 * GIB, activations=3 * GIB, overhead=GIB)
    up = corrected(estimate, memoryhistory.Measured(1.25, 12 * GIB, 9 * GIB, "t1", 0.0))
    # Only the part the measurement covers is scaled: 9 GiB by 1.25.
    assert up.correction == round(9 * GIB * 0.25) and up.total == estimate.total + up.correction
    assert up.notes[-1].startswith("corrected x1.25 by task t1, an earlier run of this model and kind (measured 12")
    assert "measured correction 2.2" in up.explain()
    wild = corrected(estimate, memoryhistory.Measured(7.0, 63 * GIB, 9 * GIB, "t2", 0.0))
    assert wild.correction == 9 * GIB  # held at x2
    assert wild.notes[-1].endswith("its ratio 7.00 is held within x0.5 to x2")
