"""The contexts a label is scored on, all from texts the labeler never saw
(``lake.splits.held_out``): positives (the neuron's held-out top exemplars, then its
quantile samples from the top deciles) and negatives (the negatives table of
``compute.negatives``: random held-out windows and hard ones, which activate its
partners but not it; and quantile samples where it is near zero).

Every context is shown as the same span of its window: ``SPAN`` counted tokens
ending ``AFTER`` tokens past the neuron's highest activation in it, so a scorer cannot
tell positives from negatives by length or by where the excerpt is cut. A negative
whose span reaches ``NOT_ACTIVE`` of the neuron's largest activation is no negative and
is left out.

A label of the negative pass (polarity -1) speaks of the neuron's most negative
activations: its contexts are read with the sign turned, so that "activating" means
most negative (its bottom exemplars are the positives, and a negative is a context
where it stays above a tenth of its most negative activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from circuit_atlas.lake import Lake
from circuit_atlas.lake.splits import NOT_ACTIVE, held_out

SPAN, AFTER = 32, 8
POSITIVES, RANDOM, HARD = 10, 5, 5  # at most, per neuron
TOP_BINS = 7  # quantile samples from this decile up are positives
KINDS = ("top", "quantile", "random", "hard")


@dataclass
class Context:
    kind: str  # one of KINDS
    window_id: int
    token_ids: list[int]  # the span shown
    acts: np.ndarray  # the neuron's activation at each token of the span, times the sign

    @property
    def positive(self) -> bool:
        return self.kind in ("top", "quantile")


def span(n_tokens: int, skip: int, peak: int, width: int = SPAN, after: int = AFTER
         ) -> tuple[int, int]:
    """[lo, hi) of the counted tokens shown: ``width`` of them (fewer in a short window)
    ending ``after`` past ``peak``."""
    hi = min(n_tokens, max(peak + after + 1, skip + width))
    return max(skip, hi - width), hi


def _context(kind: str, window_id: int, token_ids: list[int], acts: list[float], skip: int,
             sign: int = 1) -> Context:
    a = sign * np.asarray(acts, np.float32)
    skip = min(skip, max(len(a) - 1, 0))
    peak = skip + int(np.argmax(a[skip:])) if len(a) else 0
    lo, hi = span(len(a), skip, peak)
    return Context(kind, window_id, list(token_ids[lo:hi]), a[lo:hi])


def neuron_contexts(lake: Lake, model: str, corpus: str, layer: int, neurons: list[int],
                    sign: int = 1) -> tuple[dict[int, list[Context]], dict[int, float]]:
    """Per neuron of ``layer``, its held-out scoring contexts (positives first), over the
    corpora of ``corpus``; and each neuron's largest activation (the scale the
    simulation scorer normalises by). ``sign`` -1: for a label of the neuron's most
    negative activations, every activation read times -1."""
    from circuit_atlas.analysis.exemplars import corpora_of

    rows, maxima = [], {}
    mine = (pl.col("layer") == layer) & pl.col("neuron").is_in(neurons) & held_out(
        pl.col("prompt_id"))
    cols = ["neuron", "window_id", "acts"]
    for c in corpora_of(corpus):
        windows = lake.optional_table("exemplar_windows", model, c)
        stats = lake.optional_table("activation_stats", model, c)
        if windows is None or stats is None:
            continue
        extreme = pl.col("max") if sign > 0 else -pl.col("min")
        for n, m in stats.filter((pl.col("layer") == layer) & pl.col("neuron").is_in(neurons)
                                 ).select("neuron", extreme).collect().iter_rows():
            maxima[n] = max(maxima.get(n, 0.0), float(m))
        parts = []
        ex = lake.optional_table("exemplars", model, c)
        if ex is not None:
            parts.append(ex.filter(mine & (pl.col("sign") == sign)).select(
                *cols, kind=pl.lit("top"), order=-pl.col("activation") * sign))
        samples = lake.optional_table("activation_samples", model, c)
        if samples is not None:  # deciles of the positive side only; bin -1 is near zero
            upper = pl.col("bin") >= TOP_BINS if sign > 0 else pl.lit(False)
            s = samples.filter(mine & (upper | (pl.col("bin") == -1)))
            parts.append(s.select(*cols, kind=pl.when(pl.col("bin") == -1).then(
                pl.lit("random")).otherwise(pl.lit("quantile")),
                order=-pl.col("bin").cast(pl.Float32) * 1e9 + pl.col("rank")))
        negatives = lake.optional_table("negatives", model, c)
        if negatives is not None:
            parts.append(negatives.filter(mine).select(
                *cols, kind=pl.when(pl.col("source") == "random").then(pl.lit("random"))
                .otherwise(pl.lit("hard")), order=pl.int_range(pl.len()).cast(pl.Float32)))
        if parts:
            got = pl.concat([p.with_columns(pl.col("order").cast(pl.Float64)) for p in parts]
                            ).collect()
            rows.append(got.join(windows.select("window_id", "skip", "token_ids").filter(
                pl.col("window_id").is_in(got["window_id"].unique().implode())).collect(),
                on="window_id"))
    out: dict[int, list[Context]] = {n: [] for n in neurons}
    if not rows:
        return out, maxima
    kind_rank = pl.col("kind").replace_strict({k: i for i, k in enumerate(KINDS)},
                                              return_dtype=pl.Int8)
    table = pl.concat(rows).sort(["neuron", kind_rank, "order"]).unique(
        ["neuron", "window_id"], keep="first", maintain_order=True)
    quota = {"top": POSITIVES, "quantile": POSITIVES, "random": RANDOM, "hard": HARD}
    for r in table.iter_rows(named=True):
        n, kind = r["neuron"], r["kind"]
        ctx = _context(kind, r["window_id"], r["token_ids"], r["acts"], r["skip"] or 0, sign)
        mine_ = out[n]
        if ctx.positive:
            if float(ctx.acts.max(initial=0.0)) <= 0 or sum(
                    c.positive for c in mine_) >= quota[kind]:
                continue  # not activating (a neuron that is never above 0), or enough
        else:
            if float(ctx.acts.max(initial=0.0)) >= NOT_ACTIVE * maxima.get(n, 0.0):
                continue  # the span activates it: not a negative
            if sum(c.kind == kind for c in mine_) >= quota[kind]:
                continue
        mine_.append(ctx)
    return out, maxima
