"""The ``labels`` table: labels of neurons, appended batch by batch.

Each batch is one file; publishing a batch lists the earlier batches' files again
(nothing is copied), so a run killed between batches loses nothing published. Every
stage that shows labels reads them here: the newest ok label per neuron and pass, or
one label per neuron (output, else prior, else input).
"""

from __future__ import annotations

import uuid

import polars as pl

from circuit_atlas.lake.derived import add_part
from circuit_atlas.lake.lake import Lake
from circuit_atlas.lake.schemas import LABELS

PASSES = ("output", "input", "prior")


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
    """One label per neuron, the newest ok one of the output pass, else prior, else input;
    None when the lake has no labels."""
    latest = latest_ok(known_labels(lake, model, corpus))
    if latest is None:
        return None
    order = {"output": 0, "prior": 1, "input": 2}
    return (latest.with_columns(rank=pl.col("pass").replace_strict(order, default=3))
            .sort("layer", "neuron", "rank")
            .unique(["layer", "neuron"], keep="first", maintain_order=True)
            .select("layer", "neuron", "pass", "label", "description"))
