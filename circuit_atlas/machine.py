"""What this machine is: CPU model, cores and the vector extensions that decide which
precision runs fast. No torch here: the benchmarks print it with every figure and
``circuit-atlas doctor`` builds on it."""

from __future__ import annotations

import os
import platform
from functools import cache

# the flags that decide fast paths: AVX2 (float32 kernels), AVX-512, native bf16
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B13" (platform's guess where Linux does
    not say)."""
    info = _cpuinfo()
    return (info.get("model name") or info.get("Model") or platform.processor()
            or platform.machine() or "unknown CPU")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`FLAGS` the CPU reports (all False where it reports none)."""
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    return {f: f in flags for f in FLAGS}


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe() -> str:
    """One line for a benchmark's output: CPU model, cores and its fast-path flags."""
    present = [f for f, on in cpu_flags().items() if on and f != "fma"]
    return (f"{cpu_model()}, {cores()} core(s), {platform.machine()}"
            f"{', ' + ' '.join(present) if present else ''}")
