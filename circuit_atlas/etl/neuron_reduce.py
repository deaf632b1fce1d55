"""The neuron reduce, as pure functions over Arrow tables (no Dask here).

Three tables, one row per node identity (layer, index) that appears in any graph
(remainder nodes left out; embeddings at layer -1 and logits at layer n_layers
included, so token frequencies come for free):

* ``neurons``: ``graph_count`` (distinct graphs), ``position_count`` (node rows),
  activation and score sums, sums of squares, max, and means;
* ``neuron_corpora``: graph_count per corpus when several corpora are reduced
  together (the input of domain specificity);
* ``neuron_tokens``: the original atlas's token associations, top-k with counts: ``input``,
  the input token at the neuron's positions; ``output``, the top predicted token
  of the graphs it appears in.

Each has a partial form that :func:`fold.fold` merges (see there for why the
result does not depend on how the shards were split between runs).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from circuit_atlas.etl.fold import Merge, segments
from circuit_atlas.lake.schemas import NEURON_CORPORA, NEURON_STATS, NEURON_TOKENS

STATS_PARTIAL = pa.schema([
    ("key", pa.int64()), ("graph_count", pa.int64()), ("position_count", pa.int64()),
    ("activation_sum", pa.float64()), ("activation_sq_sum", pa.float64()),
    ("activation_max", pa.float32()), ("score_sum", pa.float64()),
    ("score_abs_sum", pa.float64()), ("score_sq_sum", pa.float64()), ("score_max", pa.float32()),
])
STATS_MERGE = Merge(STATS_PARTIAL,
                    float_sums=("activation_sum", "activation_sq_sum", "score_sum",
                                "score_abs_sum", "score_sq_sum"),
                    int_sums=("graph_count", "position_count"),
                    maxs=("activation_max", "score_max"))
# key = neuron key << 23 | kind << 22 | token, for token counts (kind 0 input, 1 output)
COUNT_PARTIAL = pa.schema([("key", pa.int64()), ("count", pa.int64())])
COUNT_MERGE = Merge(COUNT_PARTIAL, int_sums=("count",))
TOKEN_KINDS = ("input", "output")


# how far each neuron table's partial key is shifted left of the neuron key
KEY_SHIFT = {"neurons": 0, "neuron_tokens": 23, "neuron_corpora": 8}


def neuron_key(layer, index) -> np.ndarray:
    return ((np.asarray(layer, np.int64) + 1) << 22) | (np.asarray(index, np.int64) + 1)


def unpack_neuron(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ((key >> 22) - 1).astype(np.int16), ((key & ((1 << 22) - 1)) - 1).astype(np.int32)


def shard_partials(nodes: pa.Table, graphs: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(stats partial, token-count partial) of one shard's nodes and graphs."""
    col = {n: nodes.column(n).to_numpy() for n in (
        "graph_id", "layer", "neuron", "position", "activation", "score")}
    keep = col["neuron"] != -1
    col = {n: c[keep] for n, c in col.items()}
    key = neuron_key(col["layer"], col["neuron"])
    order = np.lexsort((col["graph_id"], key))
    key, graph = key[order], col["graph_id"][order]
    if not len(key):
        return STATS_PARTIAL.empty_table(), COUNT_PARTIAL.empty_table()
    starts = segments(key)
    new_graph = np.r_[True, (key[1:] != key[:-1]) | (graph[1:] != graph[:-1])]
    act32, score32 = col["activation"][order], col["score"][order]
    act, score = act32.astype(np.float64), score32.astype(np.float64)
    stats = pa.table({
        "key": key[starts],
        "graph_count": np.add.reduceat(new_graph.astype(np.int64), starts),
        "position_count": np.diff(np.r_[starts, len(key)]),
        "activation_sum": np.add.reduceat(act, starts),
        "activation_sq_sum": np.add.reduceat(act * act, starts),
        "activation_max": np.maximum.reduceat(act32, starts),
        "score_sum": np.add.reduceat(score, starts),
        "score_abs_sum": np.add.reduceat(np.abs(score), starts),
        "score_sq_sum": np.add.reduceat(score * score, starts),
        "score_max": np.maximum.reduceat(score32, starts),
    }, schema=STATS_PARTIAL)

    # token associations: the input token at each node row, the graph's top output token
    gids = graphs.column("graph_id").to_numpy()
    row_of = np.argsort(gids)
    g_idx = row_of[np.searchsorted(gids, graph, sorter=row_of)]
    inputs = graphs.column("input_tokens").combine_chunks()
    offsets = inputs.offsets.to_numpy()
    flat = inputs.values.to_numpy()
    pos = col["position"][order]
    in_tok = flat[offsets[g_idx] + np.minimum(pos, np.diff(offsets)[g_idx] - 1)]
    top_out = pc.list_element(graphs.column("target_tokens").combine_chunks().fill_null([]),
                              0) if graphs.num_rows else pa.array([], pa.int32())
    out_tok = top_out.to_numpy(zero_copy_only=False)[g_idx[new_graph]]
    token_keys = np.concatenate([(key << 23) | in_tok.astype(np.int64),
                                 (key[new_graph] << 23) | (1 << 22) | out_tok.astype(np.int64)])
    uniq, counts = np.unique(token_keys, return_counts=True)
    return stats, pa.table({"key": uniq, "count": counts.astype(np.int64)}, schema=COUNT_PARTIAL)


def corpus_partial(stats: pa.Table, corpus_id: int) -> pa.Table:
    """Per-corpus graph counts of a stats partial, keyed by neuron key << 8 | corpus."""
    key = stats.column("key").to_numpy()
    return pa.table({"key": (key << 8) | corpus_id, "count": stats.column("graph_count")},
                    schema=COUNT_PARTIAL)


def finalize_neurons(stats: pa.Table) -> pa.Table:
    layer, index = unpack_neuron(stats.column("key").to_numpy())
    n = stats.column("position_count").to_numpy().astype(np.float64)
    c = {name: stats.column(name).to_numpy() for name in STATS_PARTIAL.names}
    return pa.table({
        "layer": layer, "neuron": index, "graph_count": c["graph_count"],
        "position_count": c["position_count"], "activation_mean": c["activation_sum"] / n,
        "activation_max": c["activation_max"], "activation_sq_sum": c["activation_sq_sum"],
        "score_mean": c["score_sum"] / n, "score_abs_mean": c["score_abs_sum"] / n,
        "score_max": c["score_max"], "score_sq_sum": c["score_sq_sum"],
    }, schema=NEURON_STATS.schema)


def finalize_corpora(counts: pa.Table, corpora: list[str]) -> pa.Table:
    key = counts.column("key").to_numpy()
    layer, index = unpack_neuron(key >> 8)
    names = pa.array(corpora, pa.string()).take(pa.array(key & 0xFF))
    return pa.table({"layer": layer, "neuron": index, "corpus_name": names,
                     "graph_count": counts.column("count")}, schema=NEURON_CORPORA.schema)


def finalize_tokens(counts: pa.Table, top_k: int) -> pa.Table:
    """The top_k tokens per (neuron, kind) by count (ties: lower token id first)."""
    key = counts.column("key").to_numpy()
    count = counts.column("count").to_numpy()
    if len(key) and (key[1:] < key[:-1]).any():  # a fold's state is sorted already
        order = np.argsort(key, kind="stable")
        key, count = key[order], count[order]
    group = key >> 22  # neuron key << 1 | kind; within a group, tokens ascending
    starts = segments(group)
    seg = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(group)]))
    top = int(count.max()) if len(count) else 0
    if len(starts) * (top + 1) < 2**62:
        # one stable sort: groups in order, counts descending, ties keep token order
        order = np.argsort(seg * (top + 1) + (top - count), kind="stable")
    else:
        order = np.lexsort((key & ((1 << 22) - 1), -count, group))
    group, key, count = group[order], key[order], count[order]
    rank = np.arange(len(group)) - starts[seg]
    top = rank < top_k
    layer, index = unpack_neuron(group[top] >> 1)
    kinds = pa.array(TOKEN_KINDS, pa.string()).take(pa.array(group[top] & 1))
    return pa.table({"layer": layer, "neuron": index, "kind": kinds,
                     "rank": rank[top].astype(np.int16),
                     "token_id": (key[top] & ((1 << 22) - 1)).astype(np.int32),
                     "count": count[top]}, schema=NEURON_TOKENS.schema)
