"""The causal battery's per-unit rows (the neuron_causal table) in words, for people."""

from __future__ import annotations

import polars as pl


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
