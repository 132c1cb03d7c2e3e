"""A process and every process it started, so a launcher can end them all.

Executor processes run in sessions of their own (the worker kills one by its group), so neither a
signal to the launcher's process group nor one to the direct children reaches them. The tree is
read before anything is signalled: a process whose parent has exited is re-parented, and its link
to the tree is gone.
"""

from __future__ import annotations

import contextlib
import signal

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants, parents before children (none once ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def kill(procs: list[psutil.Process], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each of ``procs`` that still runs. A psutil.Process remembers its start time,
    so a pid reused after the process ended is never signalled."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.send_signal(sig)
