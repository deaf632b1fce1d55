"""The edge reduce, as pure functions over Arrow tables (no Dask here).

From per-graph edge rows to one row per (src_layer, src_neuron, tgt_layer, tgt_neuron)
with the original atlas's aggregator semantics: ``count`` = edge rows (position-level
observations), ``graph_count`` = distinct graphs, ``weight_sum``,
``weight_abs_sum``, ``weight_sq_sum``, ``weight_min``, ``weight_max`` over those
rows, ``mean_weight = weight_sum / count``, ``mean_abs_weight = weight_abs_sum / count``.
Remainder sources (index -1) are left out: they are a different set of neurons in
every graph, so their sum across graphs means nothing.

Phases:

1. :func:`shard_partials`: one shard's rows, the four key columns packed into one
   int64, aggregated per key (a shard holds whole graphs, so its distinct-graph
   counts add across shards without a shuffle) and split by source layer.
2. :func:`fold_layer`: many shards' partials of some layers merged with
   :data:`EDGE_MERGE`: each key's float sums added in shard order, so a reduce that
   folds new shards onto a stored state equals a reduce from scratch bit for bit.
3. :func:`finalize`: the state to the published table (min-count filter, means,
   unpacked keys), sorted by key.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.etl.fold import Merge, fold
from circuit_atlas.lake.schemas import EDGE_STATS

# key = (src_layer+1) << 52 | (src_neuron+1) << 30 | (tgt_layer+1) << 22 | (tgt_neuron+1)
_INDEX_BITS, _LAYER_BITS = 22, 8
_MAX_INDEX, _MAX_LAYER = (1 << _INDEX_BITS) - 2, (1 << _LAYER_BITS) - 2

PARTIAL_SCHEMA = pa.schema([
    ("key", pa.int64()), ("count", pa.int64()), ("graph_count", pa.int64()),
    ("weight_sum", pa.float64()), ("weight_abs_sum", pa.float64()),
    ("weight_sq_sum", pa.float64()), ("weight_min", pa.float32()), ("weight_max", pa.float32()),
])
def pack(src_layer, src_neuron, tgt_layer, tgt_neuron) -> np.ndarray:
    """Four node-id columns to one sortable int64 (sorts like the four columns)."""
    sl, si, tl, ti = (np.asarray(c, np.int64) + 1 for c in (src_layer, src_neuron, tgt_layer,
                                                              tgt_neuron))
    for name, c, top in (("layer", sl, _MAX_LAYER), ("neuron", si, _MAX_INDEX),
                         ("layer", tl, _MAX_LAYER), ("neuron", ti, _MAX_INDEX)):
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


def shard_partials(edges: pa.Table) -> dict[int, pa.Table]:
    """One shard's edge rows aggregated per key, split by source layer (each sorted by key).

    A shard holds whole graphs, so its distinct-graph counts add across shards. One
    stable sort by the packed key orders the shard by source layer and key at once
    and keeps a key's rows in their order; each key's float sums therefore add the
    same rows in the same order whichever shards a run folds together. A shard whose
    graphs are not in runs is put in graph order first (graph_count relies on each
    graph's rows being together).
    """
    col = {n: edges.column(n).to_numpy() for n in (
        "graph_id", "src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "weight")}
    keep = col["src_neuron"] != -1
    if not keep.all():
        col = {n: c[keep] for n, c in col.items()}
    if not len(col["graph_id"]):
        return {}
    graph = col["graph_id"]
    runs = np.flatnonzero(np.r_[True, graph[1:] != graph[:-1]])
    if len(np.unique(graph[runs])) != len(runs):
        order = np.argsort(graph, kind="stable")
        col = {n: c[order] for n, c in col.items()}
    key = pack(col["src_layer"], col["src_neuron"], col["tgt_layer"], col["tgt_neuron"])
    order = np.argsort(key, kind="stable")
    key, graph, w32 = key[order], col["graph_id"][order], col["weight"][order]
    new_key = np.r_[True, key[1:] != key[:-1]]
    starts = np.flatnonzero(new_key)
    new_graph = new_key | np.r_[True, graph[1:] != graph[:-1]]
    w = w32.astype(np.float64)
    keys = key[starts]
    partial = pa.table({
        "key": keys,
        "count": np.diff(np.r_[starts, len(key)]),
        "graph_count": np.add.reduceat(new_graph.astype(np.int64), starts),
        "weight_sum": np.add.reduceat(w, starts),
        "weight_abs_sum": np.add.reduceat(np.abs(w), starts),
        "weight_sq_sum": np.add.reduceat(w * w, starts),
        "weight_min": np.minimum.reduceat(w32, starts),
        "weight_max": np.maximum.reduceat(w32, starts),
    }, schema=PARTIAL_SCHEMA)
    layer = src_layer_of(keys)
    bounds = [0, *(np.flatnonzero(layer[1:] != layer[:-1]) + 1), len(layer)]
    return {int(layer[a]): partial.slice(a, b - a) for a, b in zip(bounds, bounds[1:],
                                                                   strict=False)}


def fold_layer(state: pa.Table | None, partials: list[pa.Table]) -> pa.Table:
    """Fold shards' partials of some source layers (in shard order) onto a state (or
    start one)."""
    return fold([state, *partials] if state is not None else partials, EDGE_MERGE)


EDGE_MERGE = Merge(PARTIAL_SCHEMA, float_sums=("weight_sum", "weight_abs_sum", "weight_sq_sum"),
                   int_sums=("count", "graph_count"), mins=("weight_min",),
                   maxs=("weight_max",))


def finalize(state: pa.Table, min_count: int = 1) -> pa.Table:
    """The published edge rows of a state: count >= min_count, means, unpacked keys."""
    count = state.column("count").to_numpy()
    keep = count >= min_count
    key = state.column("key").to_numpy()[keep]
    sl, si, tl, ti = unpack(key)
    cols = {n: state.column(n).to_numpy()[keep] for n in PARTIAL_SCHEMA.names[1:]}
    n = cols["count"].astype(np.float64)
    return pa.table({
        "src_layer": sl, "src_neuron": si, "tgt_layer": tl, "tgt_neuron": ti, **cols,
        "mean_weight": cols["weight_sum"] / n, "mean_abs_weight": cols["weight_abs_sum"] / n,
    }, schema=EDGE_STATS.schema)
