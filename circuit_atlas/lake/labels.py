"""The ``labels`` table: labels of neurons, appended batch by batch.

Each batch is one file; publishing a batch lists the earlier batches' files again
(nothing is copied), so a run killed between batches loses nothing published. Every
stage that shows labels reads them here: the newest ok label per neuron and pass, or
one label per neuron (output, else prior, else input), with the headline scores of
the label_scores table beside them.
"""

from __future__ import annotations

import uuid

import polars as pl

from circuit_atlas.lake.derived import add_part
from circuit_atlas.lake.lake import Lake
from circuit_atlas.lake.schemas import LABELS

# output: what a neuron does; input: what drives its activation up; negative: what
# drives it most negative (an input label of polarity -1); prior: imported
PASSES = ("output", "input", "negative", "prior")
SCORERS = ("detection", "fuzzing", "simulation", "intervention")
ACTIVATION_PASSES = ("input", "negative", "prior")  # labels scored on contexts


def polarity(pass_: str) -> int:
    """The sign of the activations a label of ``pass_`` speaks of: -1 for the negative
    pass, else 1."""
    return -1 if pass_ == "negative" else 1


def append_labels(lake: Lake, model: str, corpus: str, rows: pl.DataFrame) -> int:
    """Publish ``rows`` (LABELS columns) as one more batch of the labels table."""
    if rows.is_empty():
        return 0
    add_part(lake, model, corpus, "labels", f"batch-{uuid.uuid4().hex[:12]}.parquet",
             rows.select(LABELS.schema.names).to_arrow(), {"model": model})
    return len(rows)


def known_labels(lake: Lake, model: str, corpus: str) -> pl.DataFrame | None:
    """Every row of the labels table, or None when there is none."""
    if lake.table_manifest(model, corpus, "labels") is None:
        return None
    return lake.table("labels", model, corpus).drop("model", "corpus").collect()


def latest_ok(labels: pl.DataFrame | None) -> pl.DataFrame | None:
    """The newest ok label per (layer, neuron, pass): what prompts show."""
    if labels is None:
        return None
    return (labels.filter(pl.col("status") == "ok").sort("created_at", descending=True)
            .unique(["layer", "neuron", "pass"], keep="first"))


def current_labels(lake: Lake, model: str, corpus: str) -> pl.DataFrame | None:
    """One label per neuron, the newest ok one of the output pass, else prior, else input,
    with its headline scores; None when the lake has no labels."""
    latest = latest_ok(known_labels(lake, model, corpus))
    if latest is None:
        return None
    order = {"output": 0, "prior": 1, "input": 2, "negative": 3}
    return with_scores(lake, model, corpus, (
        latest.with_columns(rank=pl.col("pass").replace_strict(order, default=4))
        .sort("layer", "neuron", "rank")
        .unique(["layer", "neuron"], keep="first", maintain_order=True)
        .select("layer", "neuron", "pass", "label", "description")))


def cluster_names(lake: Lake, model: str, corpus: str, method: str) -> pl.DataFrame | None:
    """The newest ok name of each ``method`` cluster (cluster_path, label, coherence);
    None when no cluster is named."""
    if lake.table_manifest(model, corpus, "cluster_labels") is None:
        return None
    return (lake.table("cluster_labels", model, corpus)
            .filter((pl.col("status") == "ok") & (pl.col("method") == method)).collect()
            .sort("created_at").unique("cluster_path", keep="last")
            .select("cluster_path", "label", "coherence"))


def latest_scores(lake: Lake, model: str, corpus: str) -> pl.DataFrame | None:
    """The newest ok row of ``label_scores`` per (layer, neuron, pass, label, scorer);
    None when nothing is scored yet."""
    if lake.table_manifest(model, corpus, "label_scores") is None:
        return None
    rows = (lake.table("label_scores", model, corpus).filter(pl.col("status") == "ok")
            .drop("model", "corpus").collect().sort("created_at", descending=True)
            .unique(["layer", "neuron", "pass", "label", "scorer"], keep="first"))
    return None if rows.is_empty() else rows


def headline_scores(lake: Lake, model: str, corpus: str) -> pl.DataFrame | None:
    """Per (layer, neuron, pass, label): the newest ok score of each scorer as a column
    (detection, fuzzing, simulation, intervention; null where not scored), with the
    scorer model;
    None when nothing is scored yet."""
    rows = latest_scores(lake, model, corpus)
    if rows is None:
        return None
    keys = ["layer", "neuron", "pass", "label"]
    wide = rows.pivot("scorer", index=keys, values="score")
    for name in SCORERS:
        if name not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(name))
    models = rows.group_by(keys).agg(scorer_model=pl.col("scorer_model").first())
    return wide.select(*keys, *SCORERS).join(models, on=keys)


def with_scores(lake: Lake, model: str, corpus: str, labels: pl.DataFrame) -> pl.DataFrame:
    """``labels`` (layer, neuron, pass, label, ...) with each label's headline scores."""
    scores = headline_scores(lake, model, corpus)
    if scores is None:
        return labels.with_columns(*(pl.lit(None, pl.Float64).alias(s) for s in SCORERS),
                                   scorer_model=pl.lit(None, pl.String))
    return labels.join(scores, on=["layer", "neuron", "pass", "label"], how="left")
