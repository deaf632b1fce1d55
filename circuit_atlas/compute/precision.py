"""Precision by what the device does fast, measured once per process.

bfloat16 is the fast path on GPUs and on CPUs with native bf16 instructions
(AVX512-BF16, AMX). Elsewhere torch falls back to a scalar path: on an AVX2-only
x86-64 CPU a bf16 matrix product runs ~100-230x slower than float32
(``bench/precision.py``). So ``auto`` never assumes; it decides per device:

1. CUDA: bfloat16 where ``torch.cuda.is_bf16_supported()``, else float32;
2. any other device: a small timed product in both precisions (a warm-up, then the
   best of a few); bfloat16 only if it is at least as fast as float32. What torch
   reports of the CPU (its vector capability, oneDNN's bf16 support) is recorded
   beside the timing, for ``circuit-atlas doctor``, but does not decide: a capability
   flag is a promise, the timing is what happens.

The probe costs a few milliseconds where bf16 is fast and ~0.1 s where it is not
(it stops after the first slow product past the warm-up), and runs once per process
and device.

Not every stage may take the fast path. Graphs and the projection search do: on
SmolLM2 bf16 graphs keep 96-98% of the float32 candidates and their edge weights
correlate at 1.000, and the projection search re-scores its candidates in float32.
Effects do not: a direct effect is a difference of logits, and bf16 rounds away a
write vector below ~0.4% of the residual (bf16 direct-effect ratios correlate with
float32's at 0.1-0.2 on the demo prompts), so their ``auto`` is float32 everywhere.
The interventions and the self-report datasets (regression targets) run in float32
too.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from circuit_atlas.errors import CircuitAtlasError

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
PROBE_SHAPE = (64, 512, 512)  # (m, k, n): ~34 MFLOP, ~50 ms on a scalar bf16 path
SLOW = 4.0  # a bf16 product this many times slower than float32 ends the probe
ROUNDS = 6
# stage -> whether its results survive bfloat16 (see the module docstring)
STAGES = {"graphs": True, "projections": True, "effects": False, "activations": True,
          "interventions": False, "wiring": True, "selfreport": False}


@dataclass(frozen=True)
class Bf16Probe:
    """What one device does with bfloat16 matrix products."""

    device: str
    fast: bool  # what ``auto`` acts on
    how: str  # "cuda capability" or "timed"
    float32_s: float | None = None  # best time of the probe product
    bfloat16_s: float | None = None
    cpu_capability: str | None = None  # torch's vector ISA for CPU kernels
    onednn_bf16: bool | None = None  # oneDNN reports native bf16 support

    @property
    def slowdown(self) -> float | None:
        """bf16 time / float32 time of the probe (None where not timed)."""
        if self.float32_s and self.bfloat16_s:
            return self.bfloat16_s / self.float32_s
        return None

    def describe(self) -> str:
        if self.how == "cuda capability":
            return f"{self.device}: bf16 {'supported' if self.fast else 'not supported'}"
        ratio = self.slowdown
        return (f"{self.device}: bf16 product {ratio:.2g}x the float32 time "
                f"({'fast' if self.fast else 'slow'} path)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _best(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    device = a.device
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_facts() -> tuple[str | None, bool | None]:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch: not reported
        capability = None
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        onednn = None
    return capability, onednn


@functools.cache
def probe_bf16(device: str = "cpu") -> Bf16Probe:
    """Measure (once per process) whether ``device`` runs bf16 matrix products fast."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return Bf16Probe(device, bool(torch.cuda.is_bf16_supported()), "cuda capability")
    capability, onednn = _cpu_facts() if dev.type == "cpu" else (None, None)
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dev)
    b = torch.randn(k, n, generator=gen).to(dev)
    with torch.no_grad():
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        _best(a, b, 1)  # warm-up: thread pools, first-call dispatch
        f32 = _best(a, b, 3)
        _best(a16, b16, 1)  # warm-up: oneDNN compiles its kernels on the first call
        bf16 = _best(a16, b16, 1)
        # in turn, so that a burst of load on a shared machine slows both alike
        for _ in range(ROUNDS):
            if bf16 > SLOW * f32:
                break
            f32 = min(f32, _best(a, b, 1))
            bf16 = min(bf16, _best(a16, b16, 1))
    probe = Bf16Probe(device, bf16 <= f32, "timed", f32, bf16, capability, onednn)
    log.debug("bf16 probe: %s", probe)
    return probe


def auto_dtype(device: str = "cpu", stage: str = "graphs") -> str:
    """The dtype ``auto`` picks for ``stage`` on ``device``: bfloat16 where the stage
    allows it and the device runs it fast, else float32."""
    if stage not in STAGES:
        raise CircuitAtlasError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return "bfloat16" if STAGES[stage] and probe_bf16(device).fast else "float32"


_warned: set[str] = set()


def resolve_dtype(requested: str, device: str = "cpu", stage: str = "graphs",
                  warn=None) -> str:
    """The dtype to run ``stage`` in for a ``--dtype`` value: ``auto`` resolved for
    ``device``; an explicit bfloat16 where the device has no fast path runs as asked,
    with one warning line per process (``warn``, default: the log) saying how much
    slower it is."""
    if requested == AUTO:
        return auto_dtype(device, stage)
    if requested not in DTYPES:
        raise CircuitAtlasError(
            f"unknown dtype {requested!r}; use auto or one of {', '.join(DTYPES)}")
    if requested == "bfloat16" and device not in _warned and not probe_bf16(device).fast:
        _warned.add(device)
        ratio = probe_bf16(device).slowdown
        how = f"~{ratio:.0f}x slower than float32" if ratio else "slower than float32"
        (warn or log.warning)(
            f"warning: bfloat16 on {device} runs matrix products {how} here (no native "
            f"bf16 path); --dtype auto picks float32")
    return requested
