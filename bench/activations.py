"""The activation pass against a plain forward of the same batches, in one run.

    .venv/bin/python bench/activations.py [--windows 64] [--context 64] [--k 20]

Windows of ``--context`` tokens cut from the demo corpora (repeated until there are
``--windows`` of them) run through SmolLM2 twice in turn: the model's base forward
alone, and the activation pass (the same forward plus every neuron's top/bottom k,
statistics and histogram). Prints tokens/s of both and their ratio, best of
``--repeat``; the target is a ratio of at least 0.8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from circuit_atlas.machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from bench._demo import demo_windows
    from circuit_atlas.compute.activations import activation_pass, batches, padded
    from circuit_atlas.compute.models import load_model

    model = load_model("smollm2", device=args.device, dtype=args.dtype)
    windows = demo_windows(model.tokenizer, args.windows, args.context)
    tokens = sum(len(w.tokens) for w in windows)
    base = model.model.base_model

    @torch.no_grad()
    def plain() -> None:
        for group in batches(windows, args.batch_tokens):
            base(input_ids=padded(group, args.device), use_cache=False)

    def ours() -> None:
        activation_pass(model, windows, k=args.k, batch_tokens=args.batch_tokens)

    best = {"plain": float("inf"), "ours": float("inf")}
    plain()  # warm-up
    for _ in range(args.repeat):  # in turn: the machine's speed drifts
        for name, run in (("plain", plain), ("ours", ours)):
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{describe()}, {time.strftime('%Y-%m-%d')}; SmolLM2-135M {args.dtype} on "
          f"{args.device}, {len(windows)} windows of {args.context} tokens ({tokens:,} "
          f"tokens), k={args.k}, {args.batch_tokens} tokens per batch, best of {args.repeat}")
    print(f"plain forward: {tokens / best['plain']:,.0f} tokens/s; activation pass: "
          f"{tokens / best['ours']:,.0f} tokens/s; ratio {best['plain'] / best['ours']:.2f}")


if __name__ == "__main__":
    main()
