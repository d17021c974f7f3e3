"""What the benchmarks print about the machine they ran on: the CPU's flags that decide the
matmul path (AVX2, AVX-512, native bf16: AVX512-BF16 / AMX), its cores and the load average."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> str:
    """The ``FLAGS`` this CPU has, e.g. ``"avx2 avx512f"`` ("no avx2" when it has none)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    present = set(line.split(":", 1)[-1].split())
    return " ".join(flag for flag in FLAGS if flag in present) or "no avx2"


def machine_line() -> str:
    """``CPU x86_64 [avx2 avx512f], 2 cores, load average 0.56``."""
    return f"CPU {platform.machine()} [{cpu_flags()}], {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
