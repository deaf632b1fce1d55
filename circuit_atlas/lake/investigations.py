"""Reading the investigations table (circuit-atlas investigate writes it)."""

from __future__ import annotations

import json
from typing import Any

import polars as pl


def records(lake: Any, model: str, corpus: str) -> Any:
    """The investigations table (polars), or None."""
    t = lake.optional_table("investigations", model, corpus)
    return None if t is None else t.collect()


def latest_record(lake: Any, model: str, corpus: str, layer: int, neuron: int
                  ) -> dict[str, Any] | None:
    """The neuron's newest investigation record, experiments parsed."""
    rows = records(lake, model, corpus)
    if rows is None:
        return None
    rows = rows.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron)).sort(
        "created_at")
    if rows.is_empty():
        return None
    row = rows.row(-1, named=True)
    return {**row, "experiments": json.loads(row["experiments"])}
