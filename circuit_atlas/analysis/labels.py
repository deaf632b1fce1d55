"""The ``labels`` table: labels of neurons, appended batch by batch.

Each batch is one file; publishing a batch lists the earlier batches' files again
(nothing is copied), so a run killed between batches loses nothing published. The
labels a user already has (``circuit-atlas labels import``) come in as pass "prior".
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.derived import add_part
from circuit_atlas.lake.schemas import LABELS

PASSES = ("output", "input", "prior")


def append_labels(lake: Lake, model: str, corpus: str, rows: pl.DataFrame) -> int:
    """Publish ``rows`` (LABELS columns) as one more batch of the labels table."""
    if rows.is_empty():
        return 0
    add_part(lake, model, corpus, "labels", f"batch-{uuid.uuid4().hex[:12]}.parquet",
             rows.select(LABELS.schema.names).to_arrow(), {"model": model})
    return len(rows)


def read_label_file(path: str | Path) -> pl.DataFrame:
    """Labels from CSV, JSON (a list of objects) or JSONL: a neuron as ``layer`` and
    ``neuron`` columns or an ``id`` like L12/N345, a ``label`` and optionally a
    ``description``. Errors name the file and what is missing."""
    from circuit_atlas.lake.neurons import parse_neuron

    path = Path(path)
    try:
        if path.suffix == ".csv":
            df = pl.read_csv(path, infer_schema_length=0)
        elif path.suffix == ".jsonl":
            df = pl.read_ndjson(path, infer_schema_length=None)
        elif path.suffix == ".json":
            df = pl.read_json(path, infer_schema_length=None)
        else:
            raise CircuitAtlasError(f"{path}: labels must be .csv, .json or .jsonl")
    except (pl.exceptions.PolarsError, OSError) as e:
        raise CircuitAtlasError(f"{path}: cannot read labels: {str(e).splitlines()[0]}") from e
    if "label" not in df.columns:
        raise CircuitAtlasError(f"{path}: no 'label' column (columns: {', '.join(df.columns)})")
    if {"layer", "neuron"} <= set(df.columns):
        try:
            ids = df.select(pl.col("layer").cast(pl.Int16), pl.col("neuron").cast(pl.Int32))
        except pl.exceptions.PolarsError as e:
            raise CircuitAtlasError(f"{path}: layer/neuron must be integers") from e
    elif "id" in df.columns:
        parsed = [parse_neuron(str(v)) for v in df["id"]]
        ids = pl.DataFrame({"layer": [p[0] for p in parsed], "neuron": [p[1] for p in parsed]},
                           schema={"layer": pl.Int16, "neuron": pl.Int32})
    else:
        raise CircuitAtlasError(f"{path}: name each neuron with layer and neuron columns, "
                                "or an id column like L12/N345")
    description = df["description"].cast(pl.String) if "description" in df.columns else None
    return ids.with_columns(label=df["label"].cast(pl.String),
                            description=description if description is not None
                            else pl.lit(None, pl.String))


def import_labels(lake: Lake, model: str, corpus: str, path: str | Path,
                  pass_: str = "prior") -> int:
    """Add the labels of a file as one batch (labeler "import:<file name>")."""
    if pass_ not in PASSES:
        raise CircuitAtlasError(f"unknown pass {pass_!r}; choose one of {', '.join(PASSES)}")
    df = read_label_file(path)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rows = df.with_columns(
        **{"pass": pl.lit(pass_)}, type=pl.lit(None, pl.String),
        interpretability=pl.lit(None, pl.String), labeler=pl.lit(f"import:{Path(path).name}"),
        prompt_hash=pl.lit(None, pl.String), status=pl.lit("ok"), error=pl.lit(None, pl.String),
        created_at=pl.lit(now))
    return append_labels(lake, model, corpus, rows)


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
