"""Static projections of every neuron: ours against a naive chunked torch version.

    .venv/bin/python bench/projections.py                         # SmolLM2, CPU, all 46,080
    python bench/projections.py --model llama8b --device cuda     # Llama-3.1-8B-shaped, GPU

The naive peer is the obvious float32 version: per layer, the full vocab x neurons
matrices (output: W_U @ W_down; input: SiLU(E @ W_gate^T) * (E @ W_up^T)) in chunks of
neurons, then top-k of each sign. Ours searches candidates in bfloat16 and re-scores
them in float32. Both run the same formulas (norm weights off), so the parent checks
that their top-k token sets agree. The 8B-shaped model gets random weights from the
Llama-3.1-8B config on the device (no download).
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

from circuit_atlas.compute.adapters import Adapter, Block  # noqa: E402
from circuit_atlas.compute.projections import ProjectionParams, Projector  # noqa: E402
from circuit_atlas.machine import describe  # noqa: E402

LLAMA8B = {"n_layers": 32, "d_model": 4096, "n_neurons": 14336, "vocab": 128256}
TINY = {"n_layers": 4, "d_model": 64, "n_neurons": 256, "vocab": 100}


def shaped_adapter(device: str, dtype: torch.dtype, n_layers: int, d_model: int,
                   n_neurons: int, vocab: int) -> Adapter:
    """Random MLP and embedding weights of the given shape (attention left empty)."""
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
                * 0.02).to(dtype)

    empty = torch.empty(0, device=device, dtype=dtype)
    ones = torch.ones(d_model, device=device, dtype=dtype)
    blocks = [Block(attn_norm=ones, q=empty, k=empty, v=empty, o=empty, q_norm=None,
                    k_norm=None, mlp_norm=ones, gate=w(n_neurons, d_model),
                    up=w(n_neurons, d_model), down=w(d_model, n_neurons))
              for _ in range(n_layers)]
    return Adapter(model=None, family="llama", n_layers=n_layers, n_heads=1, n_kv_heads=1,
                   head_dim=d_model, d_model=d_model, n_neurons=n_neurons, eps=1e-5,
                   blocks=blocks, embed=w(vocab, d_model), final_norm=ones,
                   unembed=w(vocab, d_model))


@torch.no_grad()
def naive_layer(a: Adapter, layer: int, k: int, chunk: int) -> list[torch.Tensor]:
    blk = a.blocks[layer]
    unembed, embed = a.unembed.float(), a.embed.float()
    out = []
    for lo in range(0, a.n_neurons, chunk):
        sl = slice(lo, lo + chunk)
        o = unembed @ blk.down[:, sl].float()  # (V, C)
        i = torch.nn.functional.silu(embed @ blk.gate[sl].float().T) * (
            embed @ blk.up[sl].float().T)
        for m in (o, i):
            out.append(torch.cat([m.topk(k, dim=0).indices,
                                  m.topk(k, dim=0, largest=False).indices]).T)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b", "tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--naive-layers", type=int, default=3,
                    help="Layers the naive version runs (its time is scaled to all).")
    args = ap.parse_args()
    if args.model == "smollm2":
        from circuit_atlas.compute.models import load_model

        adapter = load_model("smollm2", device=args.device, dtype="float32").adapter
    else:
        adapter = shaped_adapter(args.device, torch.bfloat16,
                                 **(LLAMA8B if args.model == "llama8b" else TINY))
    n = adapter.n_layers * adapter.n_neurons
    print(f"{describe()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"model {args.model}: {adapter.n_layers} layers x {adapter.n_neurons} neurons = {n:,},"
          f" vocab {adapter.unembed.shape[0]:,}, d {adapter.d_model}, k {args.k}")
    projector = Projector(adapter, ProjectionParams(k=args.k, norm=False))
    projector.layer(0)  # warm-up
    sync(args.device)
    t = time.perf_counter()
    ours = [projector.layer(layer) for layer in range(adapter.n_layers)]
    sync(args.device)
    total = time.perf_counter() - t
    naive_chunk = projector.chunk
    layers = list(range(min(args.naive_layers, adapter.n_layers)))
    naive_layer(adapter, 0, args.k, naive_chunk)
    sync(args.device)
    t = time.perf_counter()
    naive = [naive_layer(adapter, layer, args.k, naive_chunk) for layer in layers]
    sync(args.device)
    naive_per_layer = (time.perf_counter() - t) / len(layers)
    agree = []
    for layer in layers:
        cols = ours[layer]
        order = np.lexsort((cols["rank"], -cols["sign"], cols["neuron"], cols["kind"]))
        got = torch.as_tensor(cols["token_id"][order]).view(2, adapter.n_neurons, 2 * args.k)
        chunks = naive[layer]
        want = [torch.cat(chunks[kind::2]) for kind in (0, 1)]
        for kind in (0, 1):
            for sign in (0, 1):
                a = got[kind, :, sign * args.k:(sign + 1) * args.k].sort(1).values
                b = want[kind][:, sign * args.k:(sign + 1) * args.k].cpu().sort(1).values
                agree.append((a == b).all(1).float().mean().item())
    print(f"| version | per layer | all {adapter.n_layers} layers | neurons/s |")
    print("|---|---|---|---|")
    print(f"| ours (bf16 search, fp32 re-score) | {total / adapter.n_layers:.3f} s | "
          f"{total:.1f} s | {n / total:,.0f} |")
    print(f"| naive float32 (measured on {len(layers)} layers) | {naive_per_layer:.3f} s | "
          f"{naive_per_layer * adapter.n_layers:.1f} s | "
          f"{n / (naive_per_layer * adapter.n_layers):,.0f} |")
    print(f"ratio ours / naive: {total / (naive_per_layer * adapter.n_layers):.2f}; "
          f"identical top-{args.k} token sets (per neuron, kind, sign): "
          f"{min(agree):.4%} (worst of {len(agree)} layer/kind/sign groups)")


if __name__ == "__main__":
    main()
