"""For tests of figures that are about "today" (UTC), whose meaning changes at midnight."""

from __future__ import annotations

import time

DAY_SEC = 86_400


def within_one_utc_day(needed_sec: float) -> None:
    """Return once the current UTC day has at least ``needed_sec`` left, waiting for the next day
    to begin if it has not, so what a test checks about "today" all happens on one day."""
    left = DAY_SEC - time.time() % DAY_SEC
    if left < needed_sec:
        time.sleep(left + 0.5)
