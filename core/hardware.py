"""What the machine can compute fast, read once from the OS (no torch import)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 matmuls on x86


@cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively. Without it (AVX2-only machines) bf16 is
    emulated and slower than fp32: measured on a 2-core AVX2 CPU, vLLM serving SmolLM2 in
    bf16 made 10-25 tokens/s with 16 requests running."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


def core_shares(n: int) -> list[str] | None:
    """This process's CPU cores split into `n` disjoint lists ("0-3", "4-7", … as vLLM's
    VLLM_CPU_OMP_THREADS_BIND takes them), one per engine on this machine; None when there are
    fewer cores than engines."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < n:
        return None
    size = len(cores) // n
    return [",".join(str(c) for c in cores[i * size:(i + 1) * size]) for i in range(n)]
