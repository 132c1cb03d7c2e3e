"""The amounts of budgets and fair-share weights: what the admin types, checked, and amounts shown
as people read them. Shared by the CLI, which checks before it sends, and the orchestrator."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum

from mloc.errors import BadRequest

MAX_TOKENS = 1e15
MAX_SECONDS = 1e12


class Metric(StrEnum):
    """What a budget counts."""

    TOKENS = "tokens"  # prompt and completion tokens together
    TOKENS_IN = "tokens_in"  # prompt tokens
    TOKENS_OUT = "tokens_out"  # completion tokens
    GPU_TIME = "gpu_time"  # GPU-seconds: wall time times the GPUs held (on one model, when named)
    CPU_TIME = "cpu_time"  # CPU-seconds: wall time times the cores asked for (one when none)


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


# The usage counters each metric sums (mloc.worker.runner records them).
COUNTERS = {
    Metric.TOKENS: ("prompt_tokens", "completion_tokens"),
    Metric.TOKENS_IN: ("prompt_tokens",),
    Metric.TOKENS_OUT: ("completion_tokens",),
    Metric.GPU_TIME: ("gpu_seconds",),
    Metric.CPU_TIME: ("cpu_seconds",),
}
NOUNS = {
    Metric.TOKENS: "tokens",
    Metric.TOKENS_IN: "input tokens",
    Metric.TOKENS_OUT: "output tokens",
    Metric.GPU_TIME: "GPU time",
    Metric.CPU_TIME: "CPU time",
}
TOKEN_UNITS = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
TIME_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def _is_tokens(metric: Metric) -> bool:
    return metric in (Metric.TOKENS, Metric.TOKENS_IN, Metric.TOKENS_OUT)


def parse_limit(metric: Metric, value: str | float) -> float:
    """A budget's limit from a number or text with a unit: tokens take k, M or G (1M = 1,000,000),
    GPU and CPU time s, m or h (10h = 36,000 seconds); a bare number is tokens or seconds."""
    tokens = _is_tokens(metric)
    units, most = (TOKEN_UNITS, MAX_TOKENS) if tokens else (TIME_UNITS, MAX_SECONDS)
    allowed = "k, M or G (1M = 1,000,000 tokens)" if tokens else "s, m or h (10h = 36,000 seconds)"
    what = f"{metric.value} budget {value!r}"
    if isinstance(value, bool):
        raise BadRequest(f"{what} is not an amount; give a number with {allowed}")
    if isinstance(value, int | float):
        amount = float(value)
    else:
        match = _QUANTITY.match(value)
        if match is None:
            raise BadRequest(f"{what} is not an amount; give a number with {allowed}")
        unit = match.group(2)
        if unit not in units:
            raise BadRequest(f"{what}: unknown unit {unit!r}; use {allowed}")
        amount = float(match.group(1)) * units[unit]
    if math.isnan(amount) or amount < 0:
        raise BadRequest(f"{what} is negative or not a number; give 0 or more, with {allowed}")
    if amount > most:
        raise BadRequest(f"{what} is more than {most:g}; check the unit ({allowed})")
    return amount


def format_amount(metric: Metric, amount: float) -> str:
    """Tokens as 1.02M, 350k; times as 45s, 12.5m, 2.05h (three significant digits)."""
    if _is_tokens(metric):
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if amount >= size:
                return f"{amount / size:.3g}{unit}"
        return f"{amount:.3g}"
    if amount >= 3600:
        return f"{amount / 3600:.3g}h"
    if amount >= 60:
        return f"{amount / 60:.3g}m"
    return f"{amount:.3g}s"


def check_limits(
    period: str, limits: Mapping[str, str | float | None], gpu_model: str | None = None
) -> tuple[Period, dict[Metric, float], str | None]:
    """The period, the amount of each metric given (``limits`` maps metric names to amounts, None
    for one not given) and the GPU model of a GPU-time budget, all checked: a request with one bad
    part sets nothing."""
    try:
        per = Period(period)
    except ValueError:
        raise BadRequest(f"period {period!r} is not one of day, month; budgets are per UTC day or month") from None
    amounts: dict[Metric, float] = {}
    for name, value in limits.items():
        if value is None:
            continue
        try:
            metric = Metric(name)
        except ValueError:
            known = ", ".join(m.value for m in Metric)
            raise BadRequest(f"{name!r} is not a budget metric; use {known}") from None
        amounts[metric] = parse_limit(metric, value)
    if not amounts:
        raise BadRequest("give at least one of tokens, tokens_in, tokens_out, gpu_time, cpu_time")
    if gpu_model is not None:
        if Metric.GPU_TIME not in amounts:
            raise BadRequest("gpu_model names the GPU model of a gpu_time budget; give gpu_time too")
        gpu_model = gpu_model.strip()
        if not gpu_model or "/" in gpu_model:
            raise BadRequest("gpu_model is empty or has a '/'; name a GPU model such as 'A100', or leave it out")
    return per, amounts, gpu_model


MAX_WEIGHT = 1000.0
DEFAULT_WEIGHT = 1.0


def check_weight(value: object) -> float:
    """A fair-share weight the admin may set; anything else is refused, naming what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"weight {value!r} is not a number; give a number above 0 and at most {MAX_WEIGHT:g}")
    weight = float(value)
    if math.isnan(weight) or math.isinf(weight):
        raise BadRequest(f"weight is {weight}; give a number above 0 and at most {MAX_WEIGHT:g}")
    if weight <= 0:
        raise BadRequest(f"weight is {weight:g}; give a number above 0 (1 is an equal share, 2 twice that, 0.5 half)")
    if weight > MAX_WEIGHT:
        raise BadRequest(
            f"weight is {weight:g}, more than {MAX_WEIGHT:g}; weights are ratios between users (2 = twice "
            "the share of a user at 1), so a larger one is most likely a typo"
        )
    return weight
