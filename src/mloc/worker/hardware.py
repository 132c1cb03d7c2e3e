"""What this machine offers: CPU cores, memory and GPUs (NVML, else nvidia-smi), with overrides."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from mloc.settings import Settings
from mloc.spec.quantity import parse_cpu, parse_gpu_list, parse_memory

log = logging.getLogger(__name__)


def cpu_milli() -> int:
    """Usable CPU in millicores: the cgroup quota when one is set, else the cores this process may use."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return int(int(quota) * 1000 / int(period))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) * 1000


def memory_bytes() -> int:
    """Usable memory: the cgroup limit when lower than the machine's."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def _nvml_gpus() -> list[dict[str, Any]] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _smi_gpus() -> list[dict[str, Any]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return None
    gpus = []
    for line in out.strip().splitlines():
        index, name, mib = (part.strip() for part in line.split(","))
        gpus.append({"index": int(index), "name": name, "memory_bytes": int(float(mib)) * 1024 * 1024})
    return gpus


def detect(settings: Settings) -> dict[str, Any]:
    """The hardware this worker advertises."""
    if settings.worker_gpus is not None:
        gpus, gpu_source = parse_gpu_list(settings.worker_gpus), "MLOC_WORKER_GPUS"
    else:
        gpus, gpu_source = _nvml_gpus() or [], "nvml"
        if not gpus:
            gpus, gpu_source = _smi_gpus() or [], "nvidia-smi"
        if not gpus:
            gpu_source = "none found"
    cpu = parse_cpu(settings.worker_cpu) if settings.worker_cpu else cpu_milli()
    memory = parse_memory(settings.worker_memory) if settings.worker_memory else memory_bytes()
    return {
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "cpu_milli": cpu,
        "memory_bytes": memory,
        "gpus": gpus,
        "gpu_source": gpu_source,
    }
