"""``circuit-atlas report labels``: how far the labels hold, as plots and one HTML page.

From the ``label_scores`` table (the newest ok score of each label and scorer) and the
labels it scored: the distribution of each scorer's scores, their mean per layer and
per label type, and the calibration of the labeler's own "interpretability" rating
(low / medium / high) against the measured scores: a labeler whose "high" labels do
not score above its "low" ones is not to be trusted on its own word.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.replies import RATINGS
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import SCORERS, latest_scores

CHANCE = {"detection": 0.5, "fuzzing": 0.5, "simulation": 0.0}


def scored_labels(lake: Lake, model: str, corpus: str) -> pl.DataFrame:
    """One row per (label, scorer): the newest ok score, with the label's layer, pass,
    type and interpretability rating (null for imported labels)."""
    scores = latest_scores(lake, model, corpus)
    if scores is None:
        raise CircuitAtlasError(f"no label scores in {corpus!r} yet: run circuit-atlas score")
    labels = lake.table("labels", model, corpus).filter(pl.col("status") == "ok").select(
        "layer", "neuron", "pass", "label", "type", "interpretability").collect().unique(
        ["layer", "neuron", "pass", "label"], keep="last")
    return scores.join(labels, on=["layer", "neuron", "pass", "label"], how="left").select(
        "layer", "neuron", "pass", "label", "type", "interpretability", "scorer", "score",
        "scorer_model")


@dataclass
class Summary:
    """The report's numbers, each a polars frame with a row per group and scorer:
    count, mean and (where it has two values or more) the standard error."""

    overall: pl.DataFrame
    by_layer: pl.DataFrame
    by_type: pl.DataFrame
    by_rating: pl.DataFrame


def _stats(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return (df.filter(pl.col("score").is_not_null()).group_by([*by, "scorer"])
            .agg(count=pl.len(), mean=pl.col("score").mean(),
                 sem=pl.col("score").std() / pl.len().sqrt())
            .sort([*by, "scorer"], nulls_last=True))


def summarise(rows: pl.DataFrame) -> Summary:
    """Counts and means of the scores overall, per layer, per label type and per rating."""
    return Summary(_stats(rows, []), _stats(rows, ["layer"]),
                   _stats(rows.filter(pl.col("type").is_not_null()), ["type"]),
                   _stats(rows.filter(pl.col("interpretability").is_not_null()),
                          ["interpretability"]))


def _plots(rows: pl.DataFrame, s: Summary, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scorers = [x for x in SCORERS if x in set(rows["scorer"])]

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    fig, axes = plt.subplots(1, len(scorers), figsize=(4 * len(scorers), 3.2), squeeze=False)
    for ax, name in zip(axes[0], scorers, strict=True):
        got = rows.filter((pl.col("scorer") == name) & pl.col("score").is_not_null())["score"]
        lo = -1.0 if name == "simulation" else 0.0
        ax.hist(got.to_numpy(), bins=np.linspace(lo, 1, 21), color="#4c72b0")
        ax.axvline(CHANCE[name], color="#c44e52", ls="--", lw=1, label="chance")
        ax.set_title(f"{name} (n={len(got)})")
        ax.set_xlabel("balanced accuracy" if name != "simulation" else "Pearson's r")
        ax.legend(fontsize=8)
    save(fig, "scores.png", "Score distribution per scorer")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name in scorers:
        d = s.by_layer.filter(pl.col("scorer") == name).sort("layer")
        ax.errorbar(d["layer"].to_numpy(), d["mean"].to_numpy(),
                    yerr=d["sem"].fill_null(0).to_numpy(), marker="o", ms=3, capsize=2,
                    label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean score")
    ax.legend(fontsize=8)
    save(fig, "by_layer.png", "Mean score per layer (bars: standard error)")

    for frame, key, order, name, title in (
            (s.by_type, "type", None, "by_type.png", "Mean score per label type"),
            (s.by_rating, "interpretability", RATINGS, "calibration.png",
             "Calibration: the labeler's interpretability rating against the scores")):
        if frame.is_empty():
            continue
        groups = list(order) if order else sorted(set(frame[key]))
        groups = [g for g in groups if g in set(frame[key])]
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) + 2), 3.2))
        width = 0.8 / max(len(scorers), 1)
        for i, sc in enumerate(scorers):
            d = {r[key]: r for r in frame.filter(pl.col("scorer") == sc).iter_rows(named=True)}
            x = np.arange(len(groups)) + i * width
            ax.bar(x, [d[g]["mean"] if g in d else np.nan for g in groups], width,
                   yerr=[(d[g]["sem"] or 0) if g in d else 0 for g in groups], capsize=2,
                   label=sc)
        ax.set_xticks(np.arange(len(groups)) + width * (len(scorers) - 1) / 2, groups)
        ax.set_ylabel("mean score")
        ax.legend(fontsize=8)
        save(fig, name, title)
    return made


def _table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(
        f"<td>{'' if v is None else (f'{v:.3f}' if isinstance(v, float) else html.escape(str(v)))}"
        "</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(rows: pl.DataFrame, out: str | Path, title: str) -> Path:
    """The plots (PNG) and ``index.html`` in folder ``out``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rows.is_empty():
        raise CircuitAtlasError("no ok label scores to report on")
    s = summarise(rows)
    plots = _plots(rows, s, out)
    models = ", ".join(sorted(set(rows["scorer_model"])))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{rows.select('layer', 'neuron', 'pass', 'label').unique().height} labels, "
             f"{len(rows)} scores by {html.escape(models)}, on held-out contexts. Chance: "
             "0.5 for detection and fuzzing (balanced accuracy), 0 for simulation "
             "(Pearson's r).</p>", "<h2>Overall</h2>", _table(s.overall)]
    for name, caption in plots:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src='{name}' alt='{name}'>")
    for head, frame in (("Per label type", s.by_type), ("Per rating", s.by_rating),
                        ("Per layer", s.by_layer)):
        if not frame.is_empty():
            parts += [f"<h2>{head}</h2>", _table(frame)]
    page = out / "index.html"
    page.write_text(
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font:14px sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:2px 8px;text-align:right}img{max-width:100%}</style>"
        + "\n".join(parts), encoding="utf-8")
    return page
