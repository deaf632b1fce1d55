"""Label scoring throughput and cost: the three scorers' requests for ``--neurons``
labels through the real openai client.

    .venv/bin/python bench/scoring.py [--neurons 200] [--concurrency 16] [--embedded 4]

Contexts are 32-token spans of the demo corpora (10 activating and 10 silent per
neuron, as ``labeling.contexts`` picks them). Against the deterministic loopback
scorer (tests/llm_server.py) it measures what our side costs: scored neurons per
minute at ``--concurrency`` and the prompt and completion tokens per neuron and
scorer (SmolLM2's tokenizer; OpenAI's counts differ by some percent). From those it
prints the cost on paper of scoring 458,752 neurons (Llama-3.1-8B) at gpt-4.1-mini
prices, with and without the Batch API. ``--embedded N`` also scores N neurons
through the embedded server (circuit-atlas serve, SmolLM2-135M on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from circuit_atlas.machine import describe  # noqa: E402

ATLAS_NEURONS = 458_752
PRICE_IN, PRICE_OUT = 0.40, 1.60  # gpt-4.1-mini, USD per million tokens


def contexts(tokenizer, n_neurons: int, rng: np.random.Generator):
    from circuit_atlas.demo import DEMO_CORPORA, demo_corpus_file
    from circuit_atlas.labeling.contexts import SPAN, Context
    from circuit_atlas.lake import read_prompt_file

    text = " ".join(r["text"] if isinstance(r, dict) else r for c in DEMO_CORPORA
                    for r in read_prompt_file(demo_corpus_file(c)))
    ids = tokenizer(text).input_ids
    out = []
    for _ in range(n_neurons):
        mine = []
        for kind in ["top"] * 10 + ["random"] * 10:
            start = int(rng.integers(0, len(ids) - SPAN))
            acts = np.zeros(SPAN, np.float32)
            if kind == "top":
                acts[int(rng.integers(0, SPAN))] = 1.0
            mine.append(Context(kind, start, ids[start:start + SPAN], acts))
        out.append(mine)
    return out


def run(url: str, model: str, items, concurrency: int, timeout: float = 600):
    from circuit_atlas.labeling.client import LLMSettings, fan_out

    class Usage:
        prompt_tokens = completion_tokens = 0

    usage, answers = Usage(), []
    settings = LLMSettings(model=model, base_url=url, concurrency=concurrency,
                           timeout=timeout, max_retries=0)
    t0 = time.perf_counter()
    asyncio.run(fan_out(settings, [(t, t.request()) for t in items],
                        lambda key, a, e: answers.append((key, a, e)), usage))
    return time.perf_counter() - t0, answers, usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--embedded", type=int, default=0)
    args = ap.parse_args()

    from circuit_atlas.compute.models import load_tokenizer
    from circuit_atlas.labeling.scorers import SCORERS, trials
    from circuit_atlas.names import DEFAULT_MODEL
    from tests.llm_server import LLMServer

    print(describe())
    tok = load_tokenizer(DEFAULT_MODEL)
    cache: dict[int, str] = {}

    def decode(ids):
        return [cache.setdefault(t, tok.decode([t])) for t in ids]

    rng = np.random.default_rng(0)
    ctx = contexts(tok, args.neurons, rng)
    items = [t for i, c in enumerate(ctx)
             for t in trials('fires on "the"', c, decode, 1.0, SCORERS, (0, i, "input"))]
    with LLMServer() as server:
        seconds, answers, _ = run(server.url, "loopback", items, args.concurrency)
    failed = sum(a is None for _, a, _ in answers)
    print(f"loopback scorer, concurrency {args.concurrency}: {len(items)} requests for "
          f"{args.neurons} neurons in {seconds:.2f} s = {args.neurons / seconds * 60:,.0f} "
          f"neurons/min (3 scorers each; {failed} failed)")
    from tests.llm_server import score_answer

    total_in = total_out = 0.0
    for name in SCORERS:
        mine = [t for t in items if t.scorer == name]
        n_in = np.mean([len(tok.apply_chat_template(t.messages, tokenize=True,
                                                    return_dict=False)) for t in mine])
        n_out = np.mean([len(tok(json.dumps(score_answer(name, t.messages[-1]["content"]),
                                            separators=(",", ":"))).input_ids) for t in mine])
        total_in, total_out = total_in + n_in, total_out + n_out
        print(f"  {name:<10} {n_in:7.0f} prompt + {n_out:5.0f} completion tokens per neuron")
    cost = ATLAS_NEURONS * (total_in * PRICE_IN + total_out * PRICE_OUT) / 1e6
    print(f"on paper, {ATLAS_NEURONS:,} neurons x 3 scorers at gpt-4.1-mini "
          f"(${PRICE_IN}/M in, ${PRICE_OUT}/M out): ${cost:,.0f}; Batch API ${cost / 2:,.0f}")
    if args.embedded:
        from circuit_atlas.labeling.serve import Server, load_engine

        with Server(load_engine(DEFAULT_MODEL, dtype="float32"), port=0) as server:
            some = items[:3 * args.embedded]
            seconds, answers, usage = run(server.url, DEFAULT_MODEL, some, 8)
        ok = sum(a is not None for _, a, _ in answers)
        print(f"embedded server (SmolLM2-135M, float32, batches of 8): {args.embedded} "
              f"neurons x 3 scorers in {seconds:.1f} s = {args.embedded / seconds * 60:.1f} "
              f"neurons/min; {ok}/{len(some)} replies valid; {usage.prompt_tokens:,} prompt "
              f"+ {usage.completion_tokens:,} completion tokens")


if __name__ == "__main__":
    main()
