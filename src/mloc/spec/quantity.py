"""Kubernetes-style resource quantities: CPU ("8", "500m", 2.5) and memory ("32Gi", "512M", 1024)."""

from __future__ import annotations

import math
import re
import sys

_CPU = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m?)\s*$")
_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P|B)?\s*$")
_MEM_FACTORS = {
    None: 1,
    "B": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
}

MAX_CPU_MILLI = 100_000 * 1000  # 100k cores: anything above is a typo
MAX_MEMORY_BYTES = 1024**5  # 1 PiB


def _magnitude(value: int | float, name: str, forms: str) -> float:
    """A number given as a YAML or JSON number, as a float; ValueError for infinity and NaN, which
    YAML (.inf, .nan) and Python's JSON (1e999, NaN) both let through and no size can be."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} {value!r} is not a finite quantity; write {forms}")
    try:
        return float(value)
    except OverflowError:  # an int past any float, and so past every limit the callers check
        return sys.float_info.max


_CPU_FORMS = "cores such as '8', '0.5' or '500m'"
_MEMORY_FORMS = "bytes with a unit such as '32Gi', '512Mi' or '8G'"


def parse_cpu(value: object) -> int:
    """CPU quantity to millicores; raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("cpu must be a number of cores such as 8, 0.5 or '500m'")
    if isinstance(value, int | float):
        milli = _magnitude(value, "cpu", _CPU_FORMS) * 1000
    elif isinstance(value, str) and (m := _CPU.match(value)):
        number = float(m.group(1))
        milli = number if m.group(2) else number * 1000
    else:
        raise ValueError(f"cpu {value!r} is not a quantity; write {_CPU_FORMS}")
    # Checked as a float, before rounding: a huge number overflows to infinity, which round() refuses.
    if milli < 0:
        raise ValueError("cpu must not be negative")
    if milli > MAX_CPU_MILLI:
        raise ValueError(f"cpu {value!r} is more than {MAX_CPU_MILLI // 1000} cores; check the unit")
    return round(milli)


def parse_memory(value: object) -> int:
    """Memory quantity to bytes; raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("memory must be a quantity such as '32Gi' or '512Mi'")
    if isinstance(value, int | float):
        number, factor = _magnitude(value, "memory", _MEMORY_FORMS), 1
    elif isinstance(value, str) and (m := _MEM.match(value)):
        number, factor = float(m.group(1)), _MEM_FACTORS[m.group(2)]
    else:
        raise ValueError(f"memory {value!r} is not a quantity; write {_MEMORY_FORMS}")
    total = number * factor
    if total < 0:
        raise ValueError("memory must not be negative")
    if total > MAX_MEMORY_BYTES:
        raise ValueError(f"memory {value!r} is more than 1Pi; check the unit")
    return round(total)


def parse_gpu_list(text: str) -> list[dict[str, object]]:
    """'NVIDIA A100-SXM4-80GB:2:81920,NVIDIA L4:1:23034' -> one entry per GPU (model:count:MiB).

    Raises ValueError naming the entry and the expected form."""
    gpus: list[dict[str, object]] = []
    if text.strip().lower() in ("", "none", "0"):
        return gpus
    for part in text.split(","):
        fields = part.strip().rsplit(":", 2)
        shape = "write model:count:memory_MiB, e.g. 'NVIDIA L4:1:23034' (several joined by commas)"
        if len(fields) != 3 or not fields[0].strip():
            raise ValueError(f"GPU entry {part.strip()!r} is not model:count:memory_MiB; {shape}")
        name, count, mib = (field.strip() for field in fields)
        if not (count.isdigit() and mib.isdigit()):
            raise ValueError(f"GPU entry {part.strip()!r}: count and memory must be whole numbers; {shape}")
        for _ in range(int(count)):
            gpus.append({"index": len(gpus), "name": name, "memory_bytes": int(mib) * 1024 * 1024})
    return gpus


def format_cpu(milli: int) -> str:
    return f"{milli // 1000}" if milli % 1000 == 0 else f"{milli}m"


def readable_memory(num_bytes: int) -> str:
    """An amount of memory for a person: the largest unit it fills, to one decimal (24683784Ki reads
    23.5Gi). :func:`format_memory` is the exact form a spec takes back."""
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.1f}".removesuffix(".0") + unit
    return f"{num_bytes}B"


def format_memory(num_bytes: int) -> str:
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if num_bytes >= factor and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.1f}{unit}"
    return str(num_bytes)
