"""bfloat16 against float32 matrix products on this machine, and what ``auto`` picks.

The product is the projection search's: (512 x 576) @ (576 x 49,152), SmolLM2's width
and vocabulary, on one thread and on all. ``--avx2`` runs the same in a child process
with oneDNN and torch's kernels capped at AVX2, which is what an AVX2-only CPU (no
AVX512-BF16, no AMX) gives torch: the slow path the ``auto`` probe must detect.

    .venv/bin/python bench/precision.py [--avx2] [--reps 3]

(--avx2 takes ~5 minutes on 2 cores: the capped bf16 product alone runs ~70 s.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
SHAPE = (512, 576, 49152)


def measure(reps: int) -> dict:
    import torch

    from circuit_atlas.compute.precision import STAGES, auto_dtype, probe_bf16
    from circuit_atlas.machine import describe

    m, k, n = SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = {"machine": describe(), "torch": torch.__version__,
           "capped": any(os.environ.get(v) for v in CAP)}
    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # warm-up
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                x @ y
                best = min(best, time.perf_counter() - t0)
            out[f"{str(dtype).removeprefix('torch.')}_{t}t_s"] = round(best, 4)
    torch.set_num_threads(threads)
    probe = probe_bf16("cpu")
    out.update(probe=probe.describe(), auto={s: auto_dtype("cpu", s) for s in STAGES})
    return out


def table(rows: list[dict]) -> None:
    print(f"{rows[0]['machine']}, torch {rows[0]['torch']}, {time.strftime('%Y-%m-%d')}")
    print(f"({SHAPE[0]} x {SHAPE[1]}) @ ({SHAPE[1]} x {SHAPE[2]}), best of the runs")
    print("| kernels | threads | float32 | bfloat16 | bf16 / f32 | probe | auto: graphs, "
          "projections, effects |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for key in sorted(k for k in r if k.startswith("float32_")):
            t = key.split("_")[1]
            f32, bf16 = r[key], r[f"bfloat16_{t}_s"]
            print(f"| {'AVX2 cap' if r['capped'] else 'native'} | {t.removesuffix('t')} | "
                  f"{f32:.3f} s | {bf16:.3f} s | {bf16 / f32:.1f}x | {r['probe']} | "
                  f"{', '.join(r['auto'].values())} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avx2", action="store_true", help="also measure with kernels capped "
                                                        "at AVX2 (a child process)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.reps)))
        return
    rows = [measure(args.reps)]
    if args.avx2:
        child = subprocess.run([sys.executable, __file__, "--child", "--reps", "1"],
                               env={**os.environ, **CAP}, capture_output=True, text=True,
                               check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    table(rows)


if __name__ == "__main__":
    main()
