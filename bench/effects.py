"""Direct/indirect effects: neuron-prompt pairs per second, ours against the original atlas's plan.

    .venv/bin/python bench/effects.py                  # SmolLM2 on the CPU
    python bench/effects.py --device cuda              # on a GPU

Pairs: for each of the first --prompts prompts of the demo medical corpus, the
--neurons neurons with the largest activation at its last position, the same number
in every layer (a graph's neurons spread over all layers). Ours: one clean forward per
prompt, the direct effect with no forward, the total effect by rerunning the later
layers for the last position only, all neurons of the prompt in one batch. The
original atlas's plan: one full forward of the prompt with V added at the neuron's
layer (a forward hook), per neuron,
plus the clean one. Both give the same total effect (checked); the parent prints
pairs per second, the ratio, and the work per pair in layer x position passes.
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

from circuit_atlas.compute.effects import clean_run, prompt_effects  # noqa: E402
from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize  # noqa: E402
from circuit_atlas.compute.models import load_model  # noqa: E402
from circuit_atlas.demo import demo_corpus_file  # noqa: E402
from circuit_atlas.machine import describe  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pick_neurons(model, tokens, n: int) -> dict[int, np.ndarray]:
    run = clean_run(model.adapter, tokens)
    per_layer = max(1, n // len(run.act))
    return {li: np.sort(a.abs().topk(per_layer).indices.cpu().numpy())
            for li, a in enumerate(run.act)}


@torch.no_grad()
def original_plan(model, tokens, pairs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The original atlas's plan for one prompt: a clean forward (recording every layer's
    activations), then one whole forward per neuron with V added at its layer."""
    hf = model.model
    acts = {}
    handles = [layer.mlp.down_proj.register_forward_hook(
        lambda m, args, out, i=i: acts.__setitem__(i, args[0][0, -1].clone()))
        for i, layer in enumerate(hf.model.layers)]
    clean = hf(tokens).logits[0, -1]
    for h in handles:
        h.remove()
    out = []
    for layer, neuron in pairs:
        write = acts[layer][neuron] * model.adapter.blocks[layer].down[:, neuron]

        def add(m, args, o, write=write):
            o = o.clone()
            o[0, -1] += write
            return o

        handle = hf.model.layers[layer].mlp.register_forward_hook(add)
        out.append(hf(tokens).logits[0, -1] - clean)
        handle.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--neurons", type=int, default=150)
    ap.add_argument("--original-pairs", type=int, default=300,
                    help="Pairs the original plan runs (its rate is measured on these).")
    args = ap.parse_args()
    model = load_model("smollm2", device=args.device, dtype="float32")
    texts = [json.loads(line)["prompt"]
             for line in demo_corpus_file("medical").read_text().splitlines()][:args.prompts]
    work = [(tokenize(model, t, MAX_TOKENS), None) for t in texts]
    work = [(tok, pick_neurons(model, tok, args.neurons)) for tok, _ in work]
    L = model.adapter.n_layers
    prompt_effects(model.adapter, work[0][0], work[0][1])  # warm-up
    sync(args.device)
    t = time.perf_counter()
    results = [prompt_effects(model.adapter, tok, neurons) for tok, neurons in work]
    sync(args.device)
    ours = time.perf_counter() - t
    pairs = sum(len(r["layer"]) for r in results)
    passes = sum(((L - 1 - r["layer"]).sum() + L * tok.shape[1])
                 for r, (tok, _) in zip(results, work, strict=True))
    original_passes = sum((1 + len(r["layer"])) * L * tok.shape[1]
                       for r, (tok, _) in zip(results, work, strict=True))
    # the original atlas's plan on the first prompts' pairs, checked against ours
    t = time.perf_counter()
    worst, done = 0.0, 0
    for r, (tok, _) in zip(results, work, strict=True):
        todo = list(zip(r["layer"].tolist(), r["neuron"].tolist(), strict=True))
        todo = todo[:args.original_pairs - done]
        target = int(r["target_token"][0])
        for row, total in enumerate(original_plan(model, tok, todo)):
            worst = max(worst, abs(total[target].item() - r["total"][row]))
        done += len(todo)
        if done >= args.original_pairs:
            break
    sync(args.device)
    original = (time.perf_counter() - t) / done
    tokens = np.mean([tok.shape[1] for tok, _ in work])
    print(f"{describe()}, torch {torch.__version__}, "
          f"{args.device}, {time.strftime('%Y-%m-%d')}")
    print(f"SmolLM2-135M, {len(work)} prompts of {tokens:.1f} tokens on average, "
          f"{pairs:,} neuron-prompt pairs")
    print("| plan | pairs/s | layer x position passes per pair |")
    print("|---|---|---|")
    print(f"| ours: cached residual, last position only, batched | {pairs / ours:,.0f} | "
          f"{passes / pairs:.1f} |")
    print(f"| original plan: one full forward per neuron (+1 clean) | {1 / original:,.1f} | "
          f"{original_passes / pairs:.1f} |")
    print(f"speed-up {original * pairs / ours:,.0f}x; work per pair "
          f"{original_passes / passes:.0f}x "
          f"less; largest |total effect| difference on the target over {done} pairs: "
          f"{worst:.2e}")


if __name__ == "__main__":
    main()
