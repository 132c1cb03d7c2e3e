"""The cyclic collector's settings for MLOC's long-running processes, the orchestrator and the worker.

Everything start-up made (modules, the app, the settings, the scripts) lives as long as the process,
so it is frozen out of the collector's passes: a full pass then walks only what was made since. A
worker that did not freeze spent 40-80 ms in each full pass, every two seconds under load, about a
tenth of its CPU, stalled all the while.

The youngest generation is collected every :data:`YOUNG_THRESHOLD` allocations of containers (net of
those freed) instead of CPython's 700. A request or a task makes and drops thousands of small dicts,
lists and frames a second, nearly all of them freed by their reference counts long before a pass would
find them; at 700 the passes ran over a hundred times a second and cost each process 5-8 % of its CPU
under load, at this threshold 0-2.5 %. Objects in reference cycles are still collected, a
little later.

Executor processes keep CPython's defaults: what they hold (models, tensors) should go as soon as it can.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once start-up is done: collect what start-up left, raise the young threshold, freeze the rest."""
    gc.collect()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    # Last, so a process seen frozen is settled whole.
    gc.freeze()
