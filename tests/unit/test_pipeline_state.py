"""A pipeline's state from its steps' states (mloc.orchestrator.pipelines.pipeline_state)."""

from __future__ import annotations

import pytest

from mloc.orchestrator.pipelines import pipeline_state


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({"succeeded"}, "succeeded"),
        ({"succeeded", "pending"}, "running"),
        ({"failed", "running"}, "running"),  # a failure does not end the steps still going
        ({"failed", "cancelled", "succeeded"}, "failed"),
        ({"cancelled", "succeeded"}, "cancelled"),
        ({"cancelling", "cancelled"}, "running"),
        # A step retention removed had ended; how is not known, so all that is said is that the pipeline did.
        ({None, "succeeded"}, "ended"),
        ({None}, "ended"),
        ({None, "failed"}, "failed"),
        ({None, "assigned"}, "running"),
    ],
)
def test_a_pipeline_runs_until_every_step_has_ended_and_a_failure_outranks_a_cancel(
    states: set[str | None], expected: str
) -> None:
    assert pipeline_state(states) == expected
