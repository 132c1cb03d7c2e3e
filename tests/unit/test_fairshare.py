"""The fair-share arithmetic: weights the admin may set, decay, and the order key."""

from __future__ import annotations

import math

import pytest

from mloc.budgetunits import check_weight
from mloc.errors import BadRequest
from mloc.orchestrator.fairshare import FIRST_UNIT, decayed, share_key, typical_cost
from mloc.transition import FAIR_SHARE_CPU_WEIGHT, fair_share_cost


@pytest.mark.parametrize("weight", [0.001, 0.5, 1, 2, 1000])
def test_a_weight_above_zero_and_at_most_a_thousand_is_taken(weight: float) -> None:
    assert check_weight(weight) == float(weight)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (-1, "weight is -1; give a number above 0 (1 is an equal share"),
        (0, "weight is 0; give a number above 0"),
        (float("nan"), "weight is nan; give a number above 0 and at most 1000"),
        (float("inf"), "weight is inf; give a number above 0 and at most 1000"),
        (1000.5, "weight is 1000.5, more than 1000; weights are ratios between users"),
        ("two", "weight 'two' is not a number"),
        (True, "weight True is not a number"),
    ],
)
def test_a_negative_zero_nan_or_absurd_weight_is_refused_with_the_reason(weight: object, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        check_weight(weight)
    assert message in refused.value.message


def test_usage_halves_every_half_life_and_never_grows_back() -> None:
    assert decayed(8.0, 1000.0, 1000.0 + 3600, 3600) == pytest.approx(4.0)
    assert decayed(8.0, 1000.0, 1000.0 + 7200, 3600) == pytest.approx(2.0)
    assert decayed(8.0, 1000.0, 900.0, 3600) == 8.0  # a clock behind the record's


def test_a_task_costs_its_gpu_seconds_or_its_wall_time_at_the_cpu_weight() -> None:
    assert fair_share_cost({"wall_sec": 10.0, "gpu_seconds": 40.0}) == 40.0
    assert fair_share_cost({"wall_sec": 10.0, "gpu_seconds": 0.0}) == pytest.approx(10 * FAIR_SHARE_CPU_WEIGHT)
    assert fair_share_cost({"tasks": 1.0}) == 0.0


def test_the_order_key_weighs_usage_and_holdings_by_the_users_weight() -> None:
    unit = typical_cost([(10.0, 5.0), (2.0, 1.0)])
    assert unit == pytest.approx(2.0)
    assert typical_cost([(0.0, 0.0)]) == FIRST_UNIT  # nothing finished: holdings alone order users
    # Twice the weight: twice the usage for the same place.
    assert share_key(20.0, 0, unit, 2.0) == share_key(10.0, 0, unit, 1.0)
    # A held task counts as a typical task's cost.
    assert share_key(0.0, 3, unit, 1.0) == pytest.approx(6.0)
    assert math.isfinite(share_key(1e12, 10_000, unit, 0.001))
