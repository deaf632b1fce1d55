"""Causal battery: interventions per second, ours against one full forward per intervention.

    .venv/bin/python bench/interventions.py              # SmolLM2 on the CPU
    python bench/interventions.py --device cuda          # on a GPU

Units: for each of the first --prompts prompts of the demo medical corpus, the
--neurons neurons with the largest |activation| at its last position, the same number
in every layer. Interventions: zero ablation and a x4 boost of each, at every position
of the prompt and, separately, at the last position only. Ours: the battery's own path
(compute.battery.prompt_battery: one clean pass per prompt, then batches of rows rerun
from their first edited layer and position, with every measure). The naive plan: one
whole Hugging Face forward per intervention, a pre-hook on down_proj rewriting the
neuron, on --naive interventions of each mode spread over the prompts; both give the same logits
(the largest difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from circuit_atlas.compute.battery import (  # noqa: E402
    Intervention,
    edits_of,
    prompt_battery,
    unit_edits,
)
from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize  # noqa: E402
from circuit_atlas.compute.interventions import clean_pass, rerun  # noqa: E402
from circuit_atlas.compute.models import load_model  # noqa: E402
from circuit_atlas.demo import demo_corpus_file  # noqa: E402
from circuit_atlas.lake.units import neuron_unit  # noqa: E402
from circuit_atlas.machine import describe  # noqa: E402

PLAN = [Intervention("zero"), Intervention("boost", factor=4.0)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pick_units(model, tokens, n: int) -> list:
    clean = clean_pass(model.adapter, tokens)
    per_layer = max(1, n // len(clean.act))
    return [neuron_unit(j, int(i)) for j, a in enumerate(clean.act)
            for i in np.sort(a[-1].abs().topk(per_layer).indices.cpu().numpy())]


@torch.no_grad()
def naive(model, tokens, unit, iv: Intervention, positions: str) -> torch.Tensor:
    """Last-position logits of one whole hooked forward."""
    T = tokens.shape[1]
    where = slice(None) if positions == "all" else slice(T - 1, T)
    n = unit.neurons[0]

    def pre(mod, args):
        h = args[0].clone()
        h[0, where, n] = 0.0 if iv.kind == "zero" else iv.factor * h[0, where, n]
        return (h,)

    layer = model.model.model.layers[unit.layers[0]]
    handle = layer.mlp.down_proj.register_forward_pre_hook(pre)
    try:
        return model.model(tokens).logits[0, -1]
    finally:
        handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--neurons", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--naive", type=int, default=400,
                    help="Interventions the naive plan runs per mode, spread over the "
                         "prompts (its rate is measured on these).")
    args = ap.parse_args()
    model = load_model("smollm2", device=args.device, dtype="float32")
    texts = [json.loads(line)["prompt"]
             for line in demo_corpus_file("medical").read_text().splitlines()][:args.prompts]
    work = [tokenize(model, t, MAX_TOKENS) for t in texts]
    units = [pick_units(model, tok, args.neurons) for tok in work]
    L = model.adapter.n_layers
    print(f"{describe()}, torch {torch.__version__}, {args.device}, "
          f"{time.strftime('%Y-%m-%d')}")
    tokens = np.mean([t.shape[1] for t in work])
    print(f"SmolLM2-135M, {len(work)} prompts of {tokens:.1f} tokens on average, "
          f"{sum(map(len, units))} units x {len(PLAN)} interventions (zero, boost x4)")
    print("| positions | ours: interventions/s | naive: interventions/s | speed-up | "
          "layer x position passes, ours / naive | largest logit difference |")
    print("|---|---|---|---|---|---|")
    for positions in ("all", "last"):
        prompt_battery(model.adapter, work[0], units[0][:8], PLAN, positions=positions)
        sync(args.device)
        t = time.perf_counter()
        for tok, us in zip(work, units, strict=True):
            prompt_battery(model.adapter, tok, us, PLAN, positions=positions,
                           batch=args.batch)
        sync(args.device)
        ours = time.perf_counter() - t
        count = sum(len(us) for us in units) * len(PLAN)
        ours_passes = sum(L * tok.shape[1] + len(PLAN) * sum(
            (L - u.layers[0]) * (tok.shape[1] if positions == "all" else 1) for u in us)
            for tok, us in zip(work, units, strict=True))
        naive_passes = sum(L * tok.shape[1] * len(us) * len(PLAN)
                           for tok, us in zip(work, units, strict=True))
        # the naive plan on a sample of every prompt's interventions, checked against ours
        worst, done, t_naive = 0.0, 0, 0.0
        per_prompt = max(1, args.naive // (len(PLAN) * len(work)))
        for tok, us in zip(work, units, strict=True):
            clean = clean_pass(model.adapter, tok)
            T = tok.shape[1]
            where = (torch.ones(T, dtype=torch.bool) if positions == "all"
                     else torch.arange(T) == T - 1).to(tok.device)
            for u in us[::max(1, len(us) // per_prompt)][:per_prompt]:
                for iv in PLAN:
                    sync(args.device)
                    t = time.perf_counter()
                    want = naive(model, tok, u, iv, positions)
                    sync(args.device)
                    t_naive += time.perf_counter() - t
                    ed = edits_of(unit_edits(u, iv, 0, where, None, None, torch.float32), 1,
                                  torch.float32, tok.device)
                    got = rerun(model.adapter, clean, ed)[0][0]
                    worst = max(worst, float((got - want).abs().max()))
                    done += 1
        print(f"| {positions} | {count / ours:,.0f} | {done / t_naive:,.1f} | "
              f"{(count / ours) / (done / t_naive):,.0f}x | "
              f"{ours_passes / count:.0f} / {naive_passes / count:.0f} | {worst:.1e} |")


if __name__ == "__main__":
    main()
