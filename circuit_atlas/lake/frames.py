"""dask.dataframe over a lake snapshot: one partition per file, dask imported only here
and only when asked for (``import circuit_atlas.lake`` never imports dask).

The reduced ``edges`` table is one file per source layer, sorted by the four node-id
columns, so its frame is indexed by ``src_layer`` with known divisions: a
``.loc[12]`` reads one file, and a per-layer group-by needs no shuffle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from circuit_atlas.lake import layout
from circuit_atlas.lake.schemas import TableSpec
from circuit_atlas.lake.validate import read_parquet

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

INDEXED = {"edges": "src_layer"}  # tables with one file per value of this sorted column


def _part(part: tuple[str, list[int]], spec: TableSpec, fs, base: str,
          index: str | None = None):
    """One file as a pandas frame, with its partition columns and without the graphs
    it is to leave out."""
    path, skip = part
    table = read_parquet(path, spec, fs)
    if skip:
        table = table.filter(pc.invert(pc.is_in(table.column("graph_id"),
                                                value_set=pa.array(skip, pa.int64()))))
    values = layout.partition_values(path[len(base):])
    for p in spec.partitions:
        table = table.append_column(p, pa.array([values[p]] * table.num_rows, pa.string()))
    frame = table.to_pandas(types_mapper=_types)
    return frame.set_index(index) if index else frame


def _types(t: pa.DataType):
    """Arrow-backed strings, as dask's own readers make them (no conversion pass)."""
    import pandas as pd

    return pd.StringDtype("pyarrow") if t in (pa.string(), pa.large_string()) else None


def dask_frame(lake: Lake, spec: TableSpec, parts: list[tuple[str, list[int]]]) -> Any:
    """A dask.dataframe over ``parts`` (file, graph ids to leave out) of one table."""
    import dask.dataframe as dd

    base = lake._base(spec)
    index = INDEXED.get(spec.name) if spec.name not in ("graphs",) else None
    empty = spec.dataset_schema.empty_table().cast(pa.schema(
        [*spec.fields, *(pa.field(p, pa.string()) for p in spec.partitions)]))
    meta = empty.to_pandas(types_mapper=_types)
    if index is not None and index in meta.columns:
        meta = meta.set_index(index)
    else:
        index = None
    files = [f for f, _ in parts]
    divisions = None
    if index is not None and files:
        # the files are src_layer-NNN[.from-NEURON].parquet: one source layer or a
        # range of its neurons each, in order; divisions only where layers do not repeat
        layers = [int(f.rsplit("/", 1)[-1].removeprefix(f"{index}-").split(".")[0])
                  for f in files]
        if all(a < b for a, b in zip(layers, layers[1:], strict=False)):
            divisions = (*layers, layers[-1])
    if not files:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(_part, [(f, list(s)) for f, s in parts], args=(spec, lake.fs, base),
                       meta=meta, divisions=divisions, index=index,
                       label=f"circuit-atlas-{spec.name}", enforce_metadata=False)
