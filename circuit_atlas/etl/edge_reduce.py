"""The edge reduce, as pure functions over Arrow tables (no Dask here).

From per-graph edge rows to one row per (src_layer, src_index, tgt_layer, tgt_index)
with the seeds' aggregator semantics: ``count`` = edge rows (position-level
observations), ``graph_count`` = distinct graphs, ``weight_sum``,
``weight_abs_sum``, ``weight_sq_sum``, ``weight_min``, ``weight_max`` over those
rows, ``mean_weight = weight_sum / count``, ``mean_abs_weight = weight_abs_sum / count``.
Remainder sources (index -1) are left out: they are a different set of neurons in
every graph, so their sum across graphs means nothing.

Phases:

1. :func:`shard_partial`: one shard's rows to partial aggregates. A shard holds
   whole graphs, so its distinct-graph counts are final for it and add across
   shards without a shuffle. The four key columns are packed into one int64.
2. :func:`fold.fold` with :data:`EDGE_MERGE`: partials of many shards to one
   state, each key's float sums added in shard order, so a reduce that folds new
   shards onto a stored state equals a reduce from scratch bit for bit.
3. :func:`finalize`: the state to the published table (min-count filter, means,
   unpacked keys), sorted by key.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.etl.fold import Merge, segments
from circuit_atlas.lake.schemas import EDGE_STATS

# key = (src_layer+1) << 52 | (src_index+1) << 30 | (tgt_layer+1) << 22 | (tgt_index+1)
_INDEX_BITS, _LAYER_BITS = 22, 8
_MAX_INDEX, _MAX_LAYER = (1 << _INDEX_BITS) - 2, (1 << _LAYER_BITS) - 2

PARTIAL_SCHEMA = pa.schema([
    ("key", pa.int64()), ("count", pa.int64()), ("graph_count", pa.int64()),
    ("weight_sum", pa.float64()), ("weight_abs_sum", pa.float64()),
    ("weight_sq_sum", pa.float64()), ("weight_min", pa.float32()), ("weight_max", pa.float32()),
])
def pack(src_layer, src_index, tgt_layer, tgt_index) -> np.ndarray:
    """Four node-id columns to one sortable int64 (sorts like the four columns)."""
    sl, si, tl, ti = (np.asarray(c, np.int64) + 1 for c in (src_layer, src_index, tgt_layer,
                                                              tgt_index))
    for name, c, top in (("layer", sl, _MAX_LAYER), ("index", si, _MAX_INDEX),
                         ("layer", tl, _MAX_LAYER), ("index", ti, _MAX_INDEX)):
        if len(c) and (c.min() < 0 or c.max() > top + 1):
            raise CircuitAtlasError(
                f"edge {name} out of range for the reduce: {c.min() - 1}..{c.max() - 1} "
                f"(supported -1..{top})")
    return (sl << 52) | (si << 30) | (tl << 22) | ti


def unpack(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m_idx, m_lay = (1 << _INDEX_BITS) - 1, (1 << _LAYER_BITS) - 1
    return (((key >> 52) & m_lay) - 1).astype(np.int16), (((key >> 30) & m_idx) - 1).astype(
        np.int32), (((key >> 22) & m_lay) - 1).astype(np.int16), ((key & m_idx) - 1).astype(
        np.int32)


def src_layer_of(key: np.ndarray) -> np.ndarray:
    return ((key >> 52) & ((1 << _LAYER_BITS) - 1)) - 1


def shard_partial(edges: pa.Table) -> pa.Table:
    """Partial aggregates of one shard's edge rows (whole graphs), sorted by key."""
    col = {n: edges.column(n).to_numpy() for n in (
        "graph_id", "src_layer", "src_index", "tgt_layer", "tgt_index", "weight")}
    keep = col["src_index"] != -1
    if not keep.all():
        col = {n: c[keep] for n, c in col.items()}
    key = pack(col["src_layer"], col["src_index"], col["tgt_layer"], col["tgt_index"])
    graph = col["graph_id"]
    # graph_count needs each graph's rows together within a key: a stable sort by key
    # keeps them so when the shard lists its graphs in runs (as writers do)
    runs = np.flatnonzero(np.r_[True, graph[1:] != graph[:-1]]) if len(graph) else []
    if len(np.unique(graph[runs])) == len(runs):
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((graph, key))
    key, graph, w32 = key[order], graph[order], col["weight"][order]
    starts = segments(key)
    new_graph = np.r_[True, (key[1:] != key[:-1]) | (graph[1:] != graph[:-1])] if len(key) \
        else np.zeros(0, bool)
    w = w32.astype(np.float64)
    if not len(key):
        return PARTIAL_SCHEMA.empty_table()
    return pa.table({
        "key": key[starts],
        "count": np.diff(np.r_[starts, len(key)]),
        "graph_count": np.add.reduceat(new_graph.astype(np.int64), starts),
        "weight_sum": np.add.reduceat(w, starts),
        "weight_abs_sum": np.add.reduceat(np.abs(w), starts),
        "weight_sq_sum": np.add.reduceat(w * w, starts),
        "weight_min": np.minimum.reduceat(w32, starts),
        "weight_max": np.maximum.reduceat(w32, starts),
    }, schema=PARTIAL_SCHEMA)


EDGE_MERGE = Merge(PARTIAL_SCHEMA, float_sums=("weight_sum", "weight_abs_sum", "weight_sq_sum"),
                   int_sums=("count", "graph_count"), mins=("weight_min",),
                   maxs=("weight_max",))


EDGE_TABLE_SCHEMA = EDGE_STATS.schema


def finalize(state: pa.Table, min_count: int = 1) -> pa.Table:
    """The published edge rows of a state: count >= min_count, means, unpacked keys."""
    count = state.column("count").to_numpy()
    keep = count >= min_count
    key = state.column("key").to_numpy()[keep]
    sl, si, tl, ti = unpack(key)
    cols = {n: state.column(n).to_numpy()[keep] for n in PARTIAL_SCHEMA.names[1:]}
    n = cols["count"].astype(np.float64)
    return pa.table({
        "src_layer": sl, "src_index": si, "tgt_layer": tl, "tgt_index": ti, **cols,
        "mean_weight": cols["weight_sum"] / n, "mean_abs_weight": cols["weight_abs_sum"] / n,
    }, schema=EDGE_TABLE_SCHEMA)
