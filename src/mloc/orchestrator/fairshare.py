"""Fair share that remembers: each user's finished work, decayed with a half-life, and their weight.

When a task ends, the transition script adds its cost to its owner's standing after decaying the
standing to that moment: ``cost * 2**(-dt / half_life) + task cost`` (see
:func:`mloc.transition.fair_share_cost`: GPU-seconds, or wall-seconds times a small CPU weight).
It decays a count of finished tasks the same way, so the pass knows what a typical recent task cost.

The scheduling pass orders users of equal priority by ``(decayed cost + held) / weight``, smallest
first, where ``held`` is the tasks the user has assigned or running now (counting the pass's own
placements) times that typical cost: a user who ran little lately goes first however much they
queue, a placement moves its user back by one typical task, and with both users busy the work each
gets tends to their weights' ratio.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from mloc import keys
from mloc.budgetunits import DEFAULT_WEIGHT, MAX_WEIGHT, check_weight
from mloc.errors import NotFound
from mloc.records import ADMIN

# What a held task counts as before anyone's tasks have finished: any positive amount orders users
# by the tasks they hold, which is all there is to go by.
FIRST_UNIT = 1.0


def decayed(value: float, at: float, now: float, half_life_sec: float) -> float:
    """``value`` recorded at ``at``, decayed to ``now``."""
    return value * 2.0 ** (-(now - at) / half_life_sec) if now > at else value


def typical_cost(standings: Iterable[tuple[float, float]]) -> float:
    """The mean cost of a recent task over the given (decayed cost, decayed count) pairs."""
    cost = count = 0.0
    for one_cost, one_count in standings:
        cost, count = cost + one_cost, count + one_count
    return cost / count if count > 0 and cost > 0 else FIRST_UNIT


def share_key(cost: float, held: int, unit: float, weight: float) -> float:
    """A user's place in the fair-share order: smaller goes first."""
    return (cost + held * unit) / weight


async def set_weight(redis: aioredis.Redis, name: str, weight: float) -> float:
    """Set a user's fair-share weight and wake the schedulers, so the next pass orders by it."""
    weight = check_weight(weight)
    if name != ADMIN and not await redis.hexists(keys.USERS, name):
        raise NotFound(f"user {name!r} not found; add it first with `mloc users add {name}`")
    pipe = redis.pipeline(transaction=True)
    if weight == DEFAULT_WEIGHT:
        pipe.hdel(keys.user_fair_share(name), "weight")
    else:
        pipe.hset(keys.user_fair_share(name), "weight", repr(weight))
    pipe.publish(keys.SCHEDULER_WAKE, "weight")
    await pipe.execute()
    return weight


def weight_of(text: str | None) -> float:
    """A stored weight (missing or unreadable: the default)."""
    try:
        weight = float(text) if text else DEFAULT_WEIGHT
    except ValueError:
        return DEFAULT_WEIGHT
    return weight if 0 < weight <= MAX_WEIGHT else DEFAULT_WEIGHT
