"""Two eval runs side by side: the difference of each score and whether it stands out of the noise."""

from __future__ import annotations

import math

from mloc.api.evals import table


def test_a_difference_is_significant_beyond_twice_the_combined_standard_error() -> None:
    first = {"arith": {"acc": 0.50, "acc_stderr": 0.05}}
    second = {"arith": {"acc": 0.70, "acc_stderr": 0.05}, "words": {"exact_match": 0.3}}
    rows = {(row.task, row.metric): row for row in table([first, second])}
    acc = rows[("arith", "acc")]
    assert acc.difference is not None and math.isclose(acc.difference, 0.20)
    assert acc.combined_stderr is not None and math.isclose(acc.combined_stderr, math.hypot(0.05, 0.05))
    assert acc.significant is True
    close = table([first, {"arith": {"acc": 0.55, "acc_stderr": 0.05}}])[0]
    assert close.significant is False
    # A score one run lacks has no difference, and a run without a standard error no test.
    words = rows[("words", "exact_match")]
    assert (words.difference, words.significant) == (None, None)
    unmeasured = table([{"t": {"acc": 0.5}}, {"t": {"acc": 0.9}}])[0]
    assert unmeasured.difference is not None and unmeasured.significant is None


def test_a_standard_error_of_zero_measures_no_spread_so_no_difference_is_called_significant() -> None:
    # Three samples each, all right in one run and all wrong in the other: both standard errors are 0.
    rows = table([{"t": {"acc": 0.0, "acc_stderr": 0.0}}, {"t": {"acc": 1.0, "acc_stderr": 0.0}}])
    assert rows[0].difference == 1.0 and rows[0].combined_stderr == 0.0
    assert rows[0].significant is None
