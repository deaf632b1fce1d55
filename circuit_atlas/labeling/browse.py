"""``circuit-atlas browse``: page through labelled neurons in the terminal, no LLM calls.

Keys (one per line): ``n`` or Enter next, ``b`` back, ``r`` random, ``g`` go to a
neuron (asked for, e.g. L18/N6721), ``l`` jump to a layer (asked for), ``q`` quit.
Each page shows the neuron's labels and the evidence they were made from.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.evidence import Atlas, layer_evidence
from circuit_atlas.labeling.templates import messages
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import SCORERS, known_labels, latest_ok, with_scores
from circuit_atlas.lake.neurons import neuron_label, parse_neuron

HELP = "n/Enter next, b back, r random, g go to neuron, l jump to layer, q quit"


class Browser:
    def __init__(self, lake: Lake, model: str, corpus: str, pass_: str | None = None,
                 tokenizer: Any = None, seed: int = 0) -> None:
        self.atlas = Atlas.open(lake, model, corpus, tokenizer)
        labels = known_labels(lake, model, corpus)
        if labels is None or labels.filter(pl.col("status") == "ok").is_empty():
            raise CircuitAtlasError("no labels yet: run circuit-atlas label (or labels import)")
        self.labels = with_scores(lake, model, corpus, latest_ok(labels))
        passes = [pass_] if pass_ else ["output", "input", "negative", "prior"]
        self.order = (self.labels.filter(pl.col("pass").is_in(passes))
                      .select("layer", "neuron").unique().sort("layer", "neuron").rows())
        if not self.order:
            raise CircuitAtlasError(f"no {pass_} labels yet")
        self.pass_, self.pos, self.rng = pass_, 0, random.Random(seed)

    def page(self) -> str:
        layer, neuron = self.order[self.pos]
        mine = self.labels.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron))
        lines = [f"[{self.pos + 1}/{len(self.order)}] {neuron_label(layer, neuron)}"]
        for r in mine.sort("pass").iter_rows(named=True):
            lines.append(f"  {r['pass'].upper()}: {r['label']}"
                         + (f" ({r['type']}, {r['interpretability']})" if r["type"] else ""))
            if r["description"]:
                lines.append(f"    {r['description']}")
            scored = [f"{s} {r[s]:.2f}" for s in SCORERS if r.get(s) is not None]
            if scored:
                lines.append(f"    scores ({r['scorer_model']}): {', '.join(scored)}")
        for pass_ in ("output", "input", "negative"):
            shown = pass_ != "negative" or "negative" in set(mine["pass"])
            if self.pass_ in (None, pass_) and shown:
                ev = layer_evidence(self.atlas, pass_, layer, self.labels, [neuron])
                if neuron in ev:
                    lines.append(f"  evidence ({pass_} pass):")
                    body = messages(pass_, ev[neuron])[1]["content"]
                    lines += ["    " + x for x in body.splitlines()[1:]]
        return "\n".join(lines)

    def go(self, text: str) -> bool:
        try:
            target = parse_neuron(text)
        except CircuitAtlasError:
            return False
        if target not in self.order:
            return False
        self.pos = self.order.index(target)
        return True

    def layer(self, text: str) -> bool:
        if not text.strip().lstrip("L").isdigit():
            return False
        layer = int(text.strip().lstrip("L"))
        for i, (la, _) in enumerate(self.order):
            if la >= layer:
                self.pos = i
                return True
        return False


def browse(lake: Lake, model: str, corpus: str, pass_: str | None, read: Callable[[str], str],
           write: Callable[[str], None], tokenizer: Any = None) -> None:
    b = Browser(lake, model, corpus, pass_, tokenizer)
    write(HELP)
    write(b.page())
    while True:
        try:
            key = read("> ").strip().lower()
        except EOFError:
            return
        if key == "q":
            return
        if key in ("", "n"):
            b.pos = min(b.pos + 1, len(b.order) - 1)
        elif key == "b":
            b.pos = max(b.pos - 1, 0)
        elif key == "r":
            b.pos = b.rng.randrange(len(b.order))
        elif key == "g":
            if not b.go(read("neuron (L12/N345): ")):
                write("no labelled neuron by that id")
                continue
        elif key == "l":
            if not b.layer(read("layer: ")):
                write("no labelled neuron in or after that layer")
                continue
        else:
            write(HELP)
            continue
        write(b.page())
