"""Attribution graph speed: graphs per minute on SmolLM2 (CPU) for the demo corpus, with
the time per phase, and a Llama-3.1-8B-shaped model with random weights on a GPU.

    .venv/bin/python bench/graphs.py                       # SmolLM2, CPU, demo corpus
    .venv/bin/python bench/graphs.py --limit 10 --candidates 500
    .venv/bin/python bench/graphs.py --prompt-batch 1,4,8   # prompts sharing phases 1-3
    .venv/bin/python bench/graphs.py --model gemma3-270m    # after setup --model gemma3
    python bench/graphs.py --model llama8b --device cuda --dtype bfloat16   # on a GPU

The 8B shape is built from its config on the device (no download): 32 layers,
4096 wide, 14336 neurons per layer, 32 heads / 8 KV heads, vocab 128256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from circuit_atlas.compute.adapters import adapter_for  # noqa: E402
from circuit_atlas.compute.attribution import (  # noqa: E402
    AttributionParams,
    attribute_batch,
    logit_targets,
)
from circuit_atlas.compute.prune import prune  # noqa: E402
from circuit_atlas.machine import describe

LLAMA8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}


def llama8b(device: str, dtype: torch.dtype, **shape):
    """A Llama-3.1-8B-shaped model with random weights, built on ``device``; ``shape``
    overrides config fields (``num_hidden_layers=2``: two layers at full width)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA8B, **shape}, max_position_embeddings=8192,
                         rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (embedded), llama8b or tiny (its shape, small)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--limit", type=int, default=20, help="prompts of the demo corpus")
    ap.add_argument("--tokens", type=int, default=64, help="prompt length for llama8b")
    ap.add_argument("--batch-rows", type=int, default=256)
    ap.add_argument("--prompt-batch", default="1,8",
                    help="comma-separated: prompts sharing the forward and relevance backward")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    params = AttributionParams(candidates=args.candidates)

    if args.model in ("llama8b", "tiny"):
        shape = {} if args.model == "llama8b" else TINY
        adapter = adapter_for(llama8b(args.device, dtype, **shape))
        gen = torch.Generator().manual_seed(0)
        vocab = adapter.embed.shape[0]
        prompts = [torch.randint(0, vocab, (1, args.tokens), generator=gen).to(args.device)
                   for _ in range(args.limit)]
    else:
        from circuit_atlas.compute.models import load_model
        from circuit_atlas.demo import demo_corpus_file
        from circuit_atlas.lake import read_prompt_file

        model = load_model(args.model, device=args.device, dtype=args.dtype)
        adapter = model.adapter
        texts = [r["text"] for r in read_prompt_file(demo_corpus_file("medical"))][:args.limit]
        prompts = [model.tokenizer(t, return_tensors="pt").input_ids.to(args.device)
                   for t in texts]

    attribute_batch(adapter, prompts[:1], params, args.batch_rows)  # warm-up
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    prompts = sorted(prompts, key=lambda p: p.shape[1])  # as the graph job groups them
    print(f"machine: {describe()}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model {args.model} ({adapter.n_layers} layers x {adapter.n_neurons} neurons), "
          f"{args.dtype}, {args.candidates} candidates, {len(prompts)} prompts "
          f"(mean {statistics.mean(p.shape[1] for p in prompts):.1f} tokens)")
    for batch in (int(b) for b in args.prompt_batch.split(",")):
        phases: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for start in range(0, len(prompts), batch):
            sync()
            graphs = attribute_batch(adapter, prompts[start:start + batch], params,
                                     args.batch_rows)
            sync()
            for g in graphs:
                t = time.perf_counter()
                prune(g, params.node_threshold, params.edge_threshold)
                g.timings["prune"] = time.perf_counter() - t
                for k, v in g.timings.items():
                    phases.setdefault(k, []).append(v)
        total = time.perf_counter() - t0
        n = len(prompts)
        print(f"prompts per batch {batch}:")
        for k, v in phases.items():
            print(f"  {k:>18}: {statistics.mean(v):.3f} s per graph")
        print(f"  total {total / n:.3f} s per graph = {n / total:.2f} graphs/s "
              f"= {60 * n / total:.1f} graphs per minute")
        head = head_seconds(adapter, params, sync)
        print(f"  vocabulary head ({adapter.unembed.shape[0]:,} tokens: logits, softmax, "
              f"logit targets): {head:.3f} s per graph = {head * n / total:.0%} of it")


@torch.no_grad()
def head_seconds(adapter, params: AttributionParams, sync, reps: int = 10) -> float:
    """What one graph spends on the vocabulary alone: the last position's logits, their
    softmax and the choice of the logit targets."""
    x = torch.randn(adapter.d_model, dtype=adapter.dtype, device=adapter.device)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        probs = adapter.cap_logits(x @ adapter.unembed.T).softmax(-1)
        logit_targets(probs, params.max_logits, params.logit_prob)
    sync()
    return (time.perf_counter() - t) / reps


if __name__ == "__main__":
    main()
