"""Weight-based wiring of every neuron: ours against a naive float32 version.

    .venv/bin/python bench/wiring.py                          # SmolLM2, CPU, all 46,080
    python bench/wiring.py --model llama8b --device cuda      # Llama-3.1-8B-shaped, GPU

The naive peer is the obvious float32 script: for each source layer, c_gate and c_up of
every later target as two products per layer pair, the strength, and each source's top
k of each sign (downstream); then the same again for each target layer over every
earlier source (upstream): every pair computed twice, gate and up apart. Ours combines
gate and up before one product per pair, searches in ``auto`` precision and re-scores
its candidates exactly (compute.wiring). Both read at the weight-only operating point,
and the script checks that their top-k sets agree. The 8B-shaped model gets random
weights from the Llama-3.1-8B config on the device (no download); on a CPU its time is
estimated from the FLOPs and the rate measured on SmolLM2, and said to be an estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.projections import LLAMA8B, TINY, shaped_adapter, sync  # noqa: E402
from circuit_atlas.compute.params import WiringParams  # noqa: E402
from circuit_atlas.compute.wiring import layer_reads, weight_point, wire  # noqa: E402
from circuit_atlas.machine import describe  # noqa: E402


@torch.no_grad()
def naive(adapter, point, k: int, layers: int) -> dict:
    """{(direction, layer): (hi ids, lo ids)} with ids layer * N + neuron, for the
    first ``layers`` source layers (downstream) and target layers (upstream)."""
    gates, ups, writes = layer_reads(adapter, torch.float32)
    L, N = adapter.n_layers, adapter.n_neurons
    alpha = [a.float()[:, None] for a in point.alpha]
    beta = [b.float()[:, None] for b in point.beta]

    def strength(l1, l2):
        return alpha[l2] * (gates[l2] @ writes[l1]) + beta[l2] * (ups[l2] @ writes[l1])

    out = {}
    for l1 in range(min(layers, L - 1)):  # downstream: rows of all later targets
        s = torch.cat([strength(l1, l2) for l2 in range(l1 + 1, L)])
        ids = torch.arange((l1 + 1) * N, L * N, device=s.device)
        out["downstream", l1] = (ids[s.topk(k, dim=0).indices.T],
                                 ids[s.topk(k, dim=0, largest=False).indices.T])
    for l2 in range(1, min(layers + 1, L)):  # upstream: columns of all earlier sources
        s = torch.cat([strength(l1, l2) for l1 in range(l2)], 1)
        ids = torch.arange(l2 * N, device=s.device)
        out["upstream", l2] = (ids[s.topk(k, dim=1).indices],
                               ids[s.topk(k, dim=1, largest=False).indices])
    return out


def same_sets(ours: dict, want: dict, n: int) -> list[float]:
    """Per (direction, layer, polarity), the share of neurons whose top-k sets agree
    (the naive lists keep k whatever the sign; ours only the right sign: compared on
    ours' length)."""
    shares = []
    for (direction, layer), lists in want.items():
        c = ours[layer]
        sel = c["direction"] == direction
        me = c["src_neuron" if direction == "downstream" else "tgt_neuron"][sel]
        other = (c["tgt_layer"] * n + c["tgt_neuron"] if direction == "downstream"
                 else c["src_layer"] * n + c["src_neuron"])[sel]
        pol = c["polarity"][sel]
        for polarity, ids in zip((1, -1), lists, strict=True):
            ids = ids.cpu().numpy()
            good = 0
            for neuron in range(n):
                got = other[(me == neuron) & (pol == polarity)]
                good += set(got) == set(ids[neuron, :len(got)])
            shares.append(good / n)
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b", "tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--naive-layers", type=int, default=None,
                    help="Layers the naive version runs (default all; its time is then scaled "
                         "by the layer pairs it covers).")
    args = ap.parse_args()
    if args.model == "smollm2":
        from circuit_atlas.compute.models import load_model

        adapter = load_model("smollm2", device=args.device, dtype="float32").adapter
    else:
        shape = LLAMA8B if args.model == "llama8b" else TINY
        adapter = shaped_adapter(args.device, torch.bfloat16 if args.model == "llama8b"
                                 else torch.float32, **shape)
    L, N, d = adapter.n_layers, adapter.n_neurons, adapter.d_model
    pairs = L * (L - 1) // 2
    flops = 2 * pairs * N * N * d  # one product per pair (ours)
    on_cuda = args.device.startswith("cuda")
    print(f"{describe()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if on_cuda else 'CPU'}, {time.strftime('%Y-%m-%d')}")
    print(f"model {args.model}: {L} layers x {N} neurons = {L * N:,}, d {d}, {pairs} layer "
          f"pairs, k {args.k}: {flops / 1e12:.1f} TFLOP in our search")
    if args.model == "llama8b" and not on_cuda:
        rate = 2 * 435 * 1536 * 1536 * 576 / float(os.environ.get("WIRING_SMOLLM2_S", "30"))
        print(f"estimate, not measured: ~{flops / rate / 3600:.1f} h on this CPU at the "
              f"SmolLM2 rate (set WIRING_SMOLLM2_S to its measured time); on one H100 at "
              f"~400 TFLOP/s bf16, ~{flops / 400e12:.1f} s for the products")
        return
    params = WiringParams(k=args.k, dtype=args.dtype, device=args.device).resolved(
        args.device)
    point = weight_point(adapter)
    sync(args.device)
    t = time.perf_counter()
    ours = wire(adapter, params, point)
    sync(args.device)
    total = time.perf_counter() - t
    rows = sum(len(c["rank"]) for c in ours.values())
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if on_cuda else "")
    layers = args.naive_layers or L
    sync(args.device)
    t = time.perf_counter()
    want = naive(adapter, point, args.k, layers)
    sync(args.device)
    measured = time.perf_counter() - t
    covered = sum(L - 1 - l1 for l1 in range(min(layers, L - 1))) + sum(
        range(1, min(layers + 1, L)))
    naive_total = measured * 2 * pairs / covered
    shares = same_sets(ours, want, N)
    scaled = "" if covered == 2 * pairs else f" (measured on {covered} of {2 * pairs})"
    print("| version | seconds | neurons/s | TFLOP/s |")
    print("|---|---|---|---|")
    print(f"| ours ({params.dtype} search, exact re-score; {rows:,} rows{peak}) | "
          f"{total:.1f} | {L * N / total:,.0f} | {flops / total / 1e12:.2f} |")
    print(f"| naive float32, gate and up apart, every pair twice{scaled} | "
          f"{naive_total:.1f} | {L * N / naive_total:,.0f} | "
          f"{4 * flops / naive_total / 1e12:.2f} |")
    print(f"ratio ours / naive: {total / naive_total:.2f}; identical top-{args.k} sets (per "
          f"neuron, direction, polarity): {min(shares):.2%} in the worst of {len(shares)} "
          f"layer groups, {np.mean(shares):.3%} on average")


if __name__ == "__main__":
    main()
