"""The mixed-queue simulation of bench/memfit.py: placed by the users' numbers some tasks land on GPUs too
small for them; placed with the estimate none does, and what no GPU holds is refused."""

from __future__ import annotations

from bench import oomqueue


def test_the_estimate_keeps_every_placement_within_its_gpu() -> None:
    found = oomqueue.simulate(300, seed=1)
    without, with_estimate = found["without_estimate"], found["with_estimate"]
    assert without["placed"] == 300 and without["refused"] == 0 and without["oom"] > 30
    assert with_estimate["oom"] == 0 and with_estimate["placed"] + with_estimate["refused"] == 300
    assert found["oom_rate_ratio"] == 0.0
    # Same seed, same queue.
    assert oomqueue.simulate(300, seed=1) == found
