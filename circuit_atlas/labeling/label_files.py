"""Labels a user already has, from CSV, JSON or JSONL files (``circuit-atlas labels
import``): they come into the labels table as pass "prior"."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import PASSES, append_labels


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


