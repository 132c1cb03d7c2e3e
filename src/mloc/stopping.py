"""Stopping asyncio tasks for certain.

On Python 3.11, ``asyncio.wait_for`` drops a cancel that lands just as the future it awaits finishes: it
returns that future's result instead (CPython gh-86296, fixed in 3.12). redis-py awaits each command's send
that way whenever a socket timeout is set, as MLOC's clients do, so a loop cancelled during a Redis call
goes on as if never asked to stop; measured against a local Redis, a third to a half of such cancels were
lost, and whatever awaited the loop's end waited for ever. Each stop below therefore cancels again until the task
has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

AGAIN_SEC = 1.0
"""How long a cancelled task may take to end before it is cancelled again. Longer than any loop's own
clean-up after a cancel, which a second cancel would cut short."""


async def cancel(*tasks: asyncio.Task[Any], again_sec: float = AGAIN_SEC) -> None:
    """Cancel ``tasks`` and return once each has ended, cancelling again every ``again_sec`` any that goes
    on. What a task raised is retrieved and dropped, as ``gather(..., return_exceptions=True)`` would."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_sec)
    for task in tasks:
        if not task.cancelled():
            task.exception()
