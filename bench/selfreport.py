"""Self-report training speed: windows per second and peak memory per unfreezing
strategy, on SmolLM2.

    .venv/bin/python bench/selfreport.py              # head, last:1, last:2, lora:8 on the CPU
    python bench/selfreport.py --device cuda --strategies head,last:2,last:8

Windows of ``--context`` tokens cut from the demo corpora, split 80/10/10, the
neuron's activation read by the dataset step's own function; each strategy trains
``--epochs`` epochs (no early stop) in its own process, so that its peak RSS is its own.
Windows/s is the mean over the epochs after the first (the head alone computes the
frozen model's features once, before its first epoch: that pass is timed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _measure import measure  # noqa: E402

from circuit_atlas.machine import describe  # noqa: E402


def child(args) -> None:
    import numpy as np

    from bench._demo import demo_windows
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake.neurons import parse_neuron
    from circuit_atlas.selfreport.dataset import neuron_activations
    from circuit_atlas.selfreport.params import TrainParams
    from circuit_atlas.selfreport.trainer import Data, train

    model = load_model("smollm2", device=args.device, dtype="float32")
    windows = demo_windows(model.tokenizer, args.windows, args.context)
    acts = neuron_activations(model, windows, [parse_neuron(args.neuron)])[
        parse_neuron(args.neuron)]
    cut = [int(0.8 * len(windows)), int(0.9 * len(windows))]
    parts = {"train": windows[:cut[0]], "val": windows[cut[0]:cut[1]],
             "test": windows[cut[1]:]}
    data = {s: Data(ws, np.concatenate([acts[w.window] for w in ws])) for s, ws in
            parts.items()}
    t0 = time.perf_counter()
    _, rows = train(model, data, TrainParams(unfreeze=args.child, epochs=args.epochs,
                                             patience=args.epochs, lr=1e-3,
                                             device=args.device))
    total = time.perf_counter() - t0
    rates = [r["windows_per_s"] for r in rows[1:]] or [rows[0]["windows_per_s"]]
    print(json.dumps({"windows_per_s": float(np.mean(rates)), "seconds": total,
                      "train_windows": len(parts["train"]),
                      "epoch_seconds": [r["seconds"] for r in rows]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--neuron", default="L29/N66")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--strategies", default="head,last:1,last:2,lora:8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    print(f"{describe()}, {time.strftime('%Y-%m-%d')}; SmolLM2-135M float32 on "
          f"{args.device}, {args.windows} windows of {args.context} tokens (80% trained), "
          f"{args.epochs} epochs, neuron {args.neuron}")
    print("| unfreeze | windows/s | train s (all epochs) | peak RSS |")
    print("|---|---|---|---|")
    for strategy in args.strategies.split(","):
        argv = [*sys.argv[1:], "--child", strategy]
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"selfreport-{os.getpid()}.json")
        with open(out, "w") as f:
            _, peak = measure(os.path.abspath(__file__), argv, os.getcwd(), stdout=f)
        with open(out) as f:
            got = json.loads(f.read().strip().splitlines()[-1])
        os.remove(out)
        print(f"| {strategy} | {got['windows_per_s']:,.1f} | {got['seconds']:.1f} | "
              f"{peak:.2f} GB |")


if __name__ == "__main__":
    main()
