"""What the causal battery's tables say: its thresholds, the tokens a neuron's boost
raised (the intervention check of output labels reads them), and its per-unit rows
(the neuron_causal table) in words, for people."""

from __future__ import annotations

import polars as pl

HURT = 0.1  # an ablation "hurts" a prompt when it costs the target this share of its probability
# a boost that moves the distribution less than this (nats) says nothing either way: a
# boost of a silent neuron (x k of 0) changes nothing
MOVED_KL = 1e-6
BOOSTS = ("boost", "set")
RAISED = 5  # the leading entries of moved_tokens: the tokens raised most


def boost_tokens(lake, model: str, corpus: str, top: int = RAISED) -> pl.DataFrame | None:
    """Per single neuron of the battery, the ``top`` tokens its boost raised most over
    the prompts it moved (each prompt's raised tokens weighted by their centred logit
    change, summed): (layer, neuron, tokens, prompts); None without a battery."""
    rows = lake.optional_table("interventions", model, corpus)
    if rows is None:
        return None
    raised = (rows.filter((pl.col("unit_kind") == "neuron")
                          & pl.col("intervention").is_in(list(BOOSTS))
                          & (pl.col("kl") > MOVED_KL))
              .select("layer", "neuron", "prompt_id",
                      pl.col("moved_tokens").list.head(RAISED).alias("token"),
                      pl.col("moved_deltas").list.head(RAISED).alias("delta"))
              .explode("token", "delta").collect())
    if raised.is_empty():
        return None
    weights = raised.group_by("layer", "neuron", "token").agg(pl.col("delta").sum())
    prompts = raised.group_by("layer", "neuron").agg(prompts=pl.col("prompt_id").n_unique())
    return (weights.sort(["layer", "neuron", "delta", "token"],
                         descending=[False, False, True, False])
            .group_by("layer", "neuron", maintain_order=True)
            .agg(tokens=pl.col("token").head(top))
            .join(prompts, on=["layer", "neuron"]))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def causal_table(summary: pl.DataFrame) -> list[str]:
    """Per unit necessity (with how often ablation hurts and flips the answer),
    sufficiency and specificity, as aligned lines for people."""
    if summary.is_empty():
        return []
    first = summary.row(0, named=True)
    how = ", ".join(x for x in (first["ablation"] and f"{first['ablation']} ablation",
                                first["boost"]) if x)
    lines = [f"{'unit':<14} {'necessity':>9} {'hurts':>6} {'flips':>6} {'sufficiency':>11} "
             f"{'specificity':>11}  ({how})"]
    for r in summary.iter_rows(named=True):
        nec = "-" if r["necessity"] is None else f"{r['necessity']:+.2f}"
        lines.append(f"{r['unit']:<14} {nec:>9} {_pct(r['necessity_rate']):>6} "
                     f"{_pct(r['flip_rate']):>6} {_pct(r['sufficiency']):>11} "
                     f"{_pct(r['specificity']):>11}")
    return lines


def causal_text(r: dict) -> str:
    """A neuron_causal row in words."""
    parts = []
    if r.get("ablation"):
        parts.append(f"necessity {r['necessity']:+.2f} ({r['ablation']} ablation costs the "
                     f"target a tenth or more on {_pct(r['necessity_rate'])} of prompts, "
                     f"flips the top token on {_pct(r['flip_rate'])})")
    if r.get("boost"):
        parts.append(f"sufficiency {_pct(r['sufficiency'])}, specificity "
                     f"{_pct(r['specificity'])} ({r['boost']})")
    if r.get("patch_flip_rate") is not None:
        parts.append(f"patching from the counterfactual flips {_pct(r['patch_flip_rate'])}")
    return "; ".join(parts)
