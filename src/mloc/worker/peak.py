"""The most memory one task takes while it runs in an executor process, measured there.

RAM: the resident set of the executor process and the processes it started (an engine's helpers, whose
own pages only are counted, as theirs are otherwise shared with the executor), sampled on a thread, and
the kernel's high-water mark of the executor process itself (reset at the task's start), which catches
a peak between samples. GPU: the memory torch's allocator reserved on the fullest of the task's GPUs, where torch runs
in this process (vLLM runs its engine here too). The figures go back with the task's outcome; the
worker records them on the task and against admission's estimate (:mod:`mloc.memoryhistory`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

SAMPLE_SEC = 0.05
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMeter:
    """Measures one task: :meth:`start` before it runs, :meth:`stop` after, for its figures."""

    def __init__(self, *, model_warm: bool, interval: float = SAMPLE_SEC) -> None:
        self.interval = interval
        self.model_warm = model_warm
        self.process = psutil.Process()
        self.start_bytes = 0
        self.peak_bytes = 0
        # Whether the heavy libraries were loaded before the task: if not, what the task added includes them.
        self.libraries_loaded = "torch" in sys.modules
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.start_bytes = self.peak_bytes = self._tree_bytes()
        # Writing 5 resets the process's peak RSS (VmHWM) to its current RSS (Linux 4.0+).
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")
        _reset_gpu_peak()
        self._thread = threading.Thread(target=self._sample, name="peak-meter", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """The task's figures: peak and starting RSS of the process tree, the GPU peak (None where torch
        did not use a GPU here), and what makes the RSS added by the task comparable with an estimate."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self.peak_bytes = max(self.peak_bytes, self._tree_bytes(), _high_water_mark())
        return {
            "rss_peak_bytes": self.peak_bytes,
            "rss_start_bytes": self.start_bytes,
            "gpu_peak_bytes": _gpu_peak(),
            "libraries_loaded": self.libraries_loaded,
            "model_warm": self.model_warm,
        }

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._tree_bytes())

    def _tree_bytes(self) -> int:
        try:
            total = int(self.process.memory_info().rss)
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_full_info().uss)
        except psutil.Error:
            return 0
        return total


def _high_water_mark() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cuda() -> Any:
    """torch.cuda, when torch is loaded here and has set up CUDA (importing it here would cost seconds)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_initialized() else None
    except Exception:
        return None


def _reset_gpu_peak() -> None:
    cuda = _cuda()
    if cuda is None:
        return
    with contextlib.suppress(Exception):
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)


def _gpu_peak() -> int | None:
    cuda = _cuda()
    if cuda is None:
        return None
    try:
        # Estimates are per GPU: the fullest GPU is the one that would run out.
        peak = max((int(cuda.max_memory_reserved(device)) for device in range(cuda.device_count())), default=0)
    except Exception:
        return None
    return peak or None
