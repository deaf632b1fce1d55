"""Co-occurrence: which neurons appear in the same graphs, top-k per neuron.

A graph's neuron set is local to its shard, so pairs are counted per shard (a sparse
``X^T X`` of the shard's graph x neuron incidence) and merged. Output is one row per
neuron and co-occurring neuron, both directions: ``joint_count`` (graphs holding
both), ``count`` and ``other_count`` (graphs holding each), ``jaccard`` and the
normalised PMI ``npmi = log(p_ab / (p_a p_b)) / -log(p_ab)`` (1: always together, 0:
independent), with ``p = graphs / all graphs``.

**Hub neurons.** A neuron in nearly every graph (the original atlas's L1/N2427 was in 200 of
200) co-occurs with everything: it adds a full row of pairs to every graph's square,
and its npmi with anyone is ~0. Neurons in more than ``max_share`` (default 0.5) of
the graphs are therefore left out of pair counting; they keep their counts in the
``neurons`` table and are listed in the table's manifest (``inputs.hubs``). With hubs
out, a graph of m neurons adds at most m(m-1) pairs, and the total is bounded by the
graphs' sizes, not by the hubs.

**How.** Pairs are never listed per graph (a graph of m neurons has m(m-1) of them,
~150M rows for 20,000 graphs of ~100 neurons). Tasks over groups of shards write their
graphs' neuron sets to scratch as an incidence list (graph, neuron index), twice: in
graph order and in neuron order. The neurons are split into buckets, contiguous
ranges of the sorted neuron keys of about equal expected work. A bucket's task finds,
in each group's neuron-ordered list, the graphs that hold one of its neurons, takes
those graphs' whole neuron sets from the graph-ordered list as a sparse graph x neuron
matrix X, and adds up ``X[:, bucket]^T X`` (scipy's sparse product: joint counts of
the bucket's neurons with every neuron). So a bucket reads and builds only the graphs
it touches, and the work of all buckets together stays within a small factor of the
pairs themselves, however many buckets memory asks for. Its memory is bounded by the
bucket's distinct pairs and one chunk's product; joint counts are integers, so the
sums are exact in any order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from circuit_atlas.analysis.params import CooccurrenceParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.neurons import layer_of, neuron_label, neuron_of, pack, unpack
from circuit_atlas.stage import Progress, Report, atlas_corpora, connect, open_lake

RANK_BY = ("jaccard", "npmi", "joint_count")
# one file per group of shards: (graph, neuron) in graph order, and the same pairs in
# neuron order (by_neuron, by_neuron_graph); graphs numbered 0.. within the group
INCIDENCE_SCHEMA = pa.schema([("graph", pa.int32()), ("neuron", pa.int32()),
                              ("by_neuron", pa.int32()), ("by_neuron_graph", pa.int32())])
TOUCHED_SCHEMA = pa.schema([("graph", pa.int32()), ("neuron", pa.int32())])
SHARDS_PER_GROUP = 256  # at most, per incidence task and file


def key(layer: pl.Expr | np.ndarray, neuron: pl.Expr | np.ndarray):
    """One int64 per neuron (see ``lake.neurons.pack``)."""
    return pack(layer, neuron)


def graph_neurons(nodes: pl.DataFrame, n_layers: int, skip: list[int] = ()) -> pl.DataFrame:
    """(graph_id, key) once per neuron and graph: MLP neurons only (no embeddings,
    logits or remainders), graphs in ``skip`` (counted from another shard) dropped."""
    return (nodes.filter((pl.col("layer") >= 0) & (pl.col("layer") < n_layers)
                         & (pl.col("neuron") >= 0) & ~pl.col("graph_id").is_in(list(skip)))
            .select("graph_id", key=key(pl.col("layer"), pl.col("neuron"))).unique())


def incidence(members: pl.DataFrame, keys: np.ndarray) -> pa.Table:
    """(graph, neuron) of ``members`` as int32 indices, in graph order and again in neuron
    order (see ``INCIDENCE_SCHEMA``): graphs numbered 0.. in id order, neurons by their
    position in the sorted ``keys`` (members not in it, hubs, left out)."""
    k = members["key"].to_numpy()
    at = np.searchsorted(keys, k)
    known = at < len(keys)
    known[known] = keys[at[known]] == k[known]
    _, graph = np.unique(members["graph_id"].to_numpy()[known], return_inverse=True)
    graph, neuron = graph.astype(np.int32), at[known].astype(np.int32)
    by_graph, by_neuron = np.lexsort((neuron, graph)), np.lexsort((graph, neuron))
    return pa.table({"graph": graph[by_graph], "neuron": neuron[by_graph],
                     "by_neuron": neuron[by_neuron], "by_neuron_graph": graph[by_neuron]},
                    schema=INCIDENCE_SCHEMA)


def touched(table: pa.Table, lo: int, hi: int) -> pa.Table:
    """Of an ``incidence`` table, the whole neuron sets (graph, neuron, in graph order)
    of the graphs that hold a neuron in ``lo:hi``: the rows a bucket's product needs."""
    def col(name: str) -> np.ndarray:  # a view of the (mapped) file, not a copy
        c = table.column(name)
        return (c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()).to_numpy()

    i, j = np.searchsorted(col("by_neuron"), [lo, hi])
    graphs = np.unique(col("by_neuron_graph")[i:j])
    graph = col("graph")
    start = np.searchsorted(graph, graphs)
    length = np.searchsorted(graph, graphs, side="right") - start
    at = np.repeat(start - np.cumsum(length) + length, length) + np.arange(length.sum())
    return pa.table({"graph": graph[at], "neuron": col("neuron")[at]}, schema=TOUCHED_SCHEMA)


def joint_counts(parts: list[pa.Table], n_neurons: int, lo: int, hi: int):
    """Joint graph counts of neurons ``lo:hi`` with every neuron, over ``parts`` (each
    its own graphs' neuron sets, in graph order, as ``touched`` gives them): a
    (hi - lo) x n_neurons sparse int matrix."""
    from scipy import sparse

    graph, neuron, offset = [], [], 0
    for p in parts:
        g = p.column("graph").to_numpy()
        graph.append(g.astype(np.int64) + offset)
        neuron.append(p.column("neuron").to_numpy())
        offset += int(g[-1]) + 1 if len(g) else 0
    graph = np.concatenate(graph or [np.zeros(0, np.int64)])
    neuron = np.concatenate(neuron or [np.zeros(0, np.int32)])
    # rows sorted by graph, neurons sorted within each: the CSR matrix directly
    first = np.flatnonzero(np.r_[True, graph[1:] != graph[:-1]]) if len(graph) else graph
    x = sparse.csr_matrix((np.ones(len(neuron), np.int32), neuron, np.r_[first, len(graph)]),
                          shape=(len(first), n_neurons))
    return (x[:, lo:hi].T.tocsr() @ x).tocsr()


def top_pairs(pairs: pl.DataFrame, counts: pl.DataFrame, n_graphs: int, k: int,
              min_count: int, rank_by: str) -> pl.DataFrame:
    """Of summed ``pairs`` (a, b, joint), those seen ``min_count`` times, with the
    metrics; each a's top ``k`` by ``rank_by`` (ties: larger joint count, then smaller
    other neuron)."""
    summed = pairs.filter(pl.col("joint") >= min_count)
    ca = counts.rename({"key": "a", "count": "count"})
    cb = counts.rename({"key": "b", "count": "other_count"})
    n = float(n_graphs)
    p_ab = pl.col("joint_count") / n
    out = (summed.rename({"joint": "joint_count"}).join(ca, on="a").join(cb, on="b")
           .with_columns(
               jaccard=pl.col("joint_count") / (pl.col("count") + pl.col("other_count")
                                                 - pl.col("joint_count")),
               npmi=pl.when(p_ab < 1).then(
                   (p_ab / ((pl.col("count") / n) * (pl.col("other_count") / n))).log()
                   / -p_ab.log()).otherwise(1.0))
           .sort(["a", rank_by, "joint_count", "b"], descending=[False, True, True, False])
           .filter(pl.int_range(pl.len()).over("a") < k))
    return out.select(
        layer=layer_of(pl.col("a")).cast(pl.Int16), neuron=neuron_of(pl.col("a")).cast(pl.Int32),
        other_layer=layer_of(pl.col("b")).cast(pl.Int16),
        other_neuron=neuron_of(pl.col("b")).cast(pl.Int32),
        joint_count="joint_count", count="count", other_count="other_count",
        jaccard="jaccard", npmi="npmi")


# the Dask job -------------------------------------------------------------------------


@dataclass
class CooccurrenceReport(Report):
    corpus: str
    graphs: int
    hubs: int
    rows: int
    seconds: float

    def __str__(self) -> str:
        return (f"cooccurrence {self.corpus}: {self.graphs:,} graphs, {self.hubs:,} hub "
                f"neuron(s) left out, {self.rows:,} rows, {self.seconds:.1f} s")


def _incidence_task(lake, group: list[tuple[Any, list[int]]], n_layers: int,
                    keys: np.ndarray, path: str, version) -> int:
    """A group of (shard, graphs to skip)'s incidence to one scratch file; returns its
    pair count (sum of its graphs' squared sizes), which sizes the buckets and chunks."""
    from circuit_atlas.lake import GRAPH_NODES
    from circuit_atlas.lake.validate import read_parquet

    members = pl.concat([graph_neurons(pl.from_arrow(read_parquet(
        shard.file("graph_nodes"), GRAPH_NODES, lake.fs, ["graph_id", "layer", "neuron"])),
        n_layers, skip) for shard, skip in group])
    table = incidence(members, keys)
    version.write_scratch(path, [table], INCIDENCE_SCHEMA)
    sizes = np.bincount(table.column("graph").to_numpy())
    return int((sizes.astype(np.int64) ** 2).sum())


def _bucket_task(paths: list[list[str]], lo: int, hi: int, counts: pl.DataFrame,
                 n_graphs: int, k: int, min_count: int, rank_by: str, version
                 ) -> tuple[str, int]:
    """Neurons ``lo:hi``: their joint counts with every neuron, summed over chunks of
    incidence files, to their top pairs (submitted once every incidence task has written
    its file: no futures as arguments, which cost the reduce 11-24 s at 1,000 shards)."""
    from circuit_atlas.lake.schemas import COOCCURRENCE

    keys = counts["key"].to_numpy()
    total = None
    for chunk in paths:
        part = joint_counts([version.read_scratch(p, keep=lambda t: touched(t, lo, hi))
                             for p in chunk], len(keys), lo, hi)
        total = part if total is None else total + part
    c = total.tocoo()
    row, col = c.row.astype(np.int64) + lo, c.col.astype(np.int64)
    keep = (row != col) & (c.data >= min_count)
    pairs = pl.DataFrame({"a": keys[row[keep]], "b": keys[col[keep]],
                          "joint": c.data[keep].astype(np.int64)})
    table = top_pairs(pairs, counts, n_graphs, k, min_count, rank_by).sort(
        ["layer", "neuron", rank_by, "joint_count", "other_layer", "other_neuron"],
        descending=[False, False, True, True, False, False])
    name = version.write(f"bucket-{lo:09d}.parquet", table.to_arrow(), COOCCURRENCE)
    return name, len(table)


def shard_groups(n_shards: int, threads: int) -> list[range]:
    """Consecutive shards in groups for the incidence tasks: a few tasks per thread, at
    most ``SHARDS_PER_GROUP`` shards each. Every bucket reads every group's file, so
    fewer, larger groups keep those reads (groups x buckets) small."""
    n = min(n_shards, max(4 * threads, -(-n_shards // SHARDS_PER_GROUP)))
    bounds = np.linspace(0, n_shards, n + 1).round().astype(int) if n else [0]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# Peak bytes per distinct pair in a bucket task (sparse product and sum, COO, the
# pairs frame with metrics, its sort): kept loose.
BYTES_PER_PAIR = 200
MEMORY_SHARE = 0.25  # of a worker's memory limit, for one bucket task


def plan_buckets(weights: np.ndarray, n_buckets: int) -> list[tuple[int, int]]:
    """Contiguous ranges of neuron indices, about equal in summed ``weights``."""
    if not len(weights):
        return []
    edges = np.searchsorted(np.cumsum(weights, dtype=np.float64),
                            np.linspace(0, float(np.sum(weights)), n_buckets + 1)[1:-1])
    bounds = np.unique(np.r_[0, np.minimum(edges + 1, len(weights)), len(weights)])
    return [(int(a), int(b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def _pairs_on_cluster(client: Any, lake, shards: list, n_layers: int, counts: pl.DataFrame,
                      n_graphs: int, k: int, min_count: int, rank_by: str,
                      buckets: int | None, version,
                      on_progress: Callable[[int, int], None] | None) -> list[tuple[str, int]]:
    """The incidence tasks, then the bucket tasks: each bucket's file and row count."""
    from distributed import as_completed

    from circuit_atlas.lake.shards import repeated_graphs

    keys = counts["key"].to_numpy()
    skips = repeated_graphs(lake, shards)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    groups = shard_groups(len(shards), sum(w.get("nthreads", 1) for w in workers))
    scratch = [version.scratch(f"incidence-{i:06d}.arrow") for i in range(len(groups))]
    keys_f = client.scatter(keys, broadcast=True)
    parts = [client.submit(_incidence_task, lake, [(shards[i], skips[i]) for i in group],
                           n_layers, keys_f, path, version, pure=False)
             for group, path in zip(groups, scratch, strict=True)]
    for done, _ in enumerate(as_completed(parts), start=1):
        if on_progress:
            on_progress(done, len(parts))
    pair_counts = client.gather(parts)
    memory = min((w.get("memory_limit") or 0 for w in workers), default=0) or 4 * 2**30
    budget = max(100_000, int(memory * MEMORY_SHARE / BYTES_PER_PAIR))
    # a neuron's pairs are about its graph count times a graph's size: buckets of equal
    # expected pairs, enough that one holds the budget, and chunks of incidence files per bucket
    n_buckets = buckets or max(4 * len(workers), -(-sum(pair_counts) // budget))
    ranges = plan_buckets(counts["count"].to_numpy(), min(n_buckets, max(1, len(keys))))
    per_bucket = [n / max(1, len(ranges)) for n in pair_counts]
    chunks, current, rows = [], [], 0.0
    for path, n in zip(scratch, per_bucket, strict=True):
        if current and rows + n > budget:
            chunks.append(current)
            current, rows = [], 0.0
        current.append(path)
        rows += n
    chunks += [current] if current else []
    counts_f = client.scatter(counts, broadcast=True)
    finals = [client.submit(_bucket_task, chunks, lo, hi, counts_f, n_graphs, k, min_count,
                            rank_by, version, pure=False) for lo, hi in ranges]
    del parts  # gathered: nothing of theirs stays on the workers
    total = len(pair_counts) + len(finals)
    for done, _ in enumerate(as_completed(finals), start=len(pair_counts) + 1):
        if on_progress:
            on_progress(done, total)
    return client.gather(finals)


def cooccurrence_lake(lake, model: str, corpora: list[str], client: Any, k: int = 20,
                      min_count: int = 2, max_share: float = 0.5, rank_by: str = "jaccard",
                      buckets: int | None = None,
                      on_progress: Callable[[int, int], None] | None = None
                      ) -> CooccurrenceReport:
    """The ``cooccurrence`` table of (model, corpora) on a Dask cluster."""
    from circuit_atlas.analysis.inputs import reduced

    t0 = time.perf_counter()
    if rank_by not in RANK_BY:
        raise CircuitAtlasError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANK_BY)}")
    if k < 1 or min_count < 1 or not 0 < max_share <= 1:
        raise CircuitAtlasError("k and min count must be >= 1 and max share in (0, 1]")
    inputs = reduced(lake, model, corpora)
    ck, n_layers, shards, n_graphs = (inputs.corpus, inputs.n_layers, inputs.shards,
                                      inputs.n_graphs)
    held = [f"{s.corpus}/{s.shard}" for s in shards]
    neurons = lake.table("neurons", model, ck).filter(
        (pl.col("layer") >= 0) & (pl.col("layer") < n_layers)).select(
        key=key(pl.col("layer"), pl.col("neuron")), count="graph_count").collect()
    hubs = neurons.filter(pl.col("count") > max_share * n_graphs)["key"].to_numpy()
    counts = neurons.filter(~pl.col("key").is_in(hubs.tolist())).sort("key")
    version = lake.new_table_version(model, ck, "cooccurrence")
    try:
        written = _pairs_on_cluster(client, lake, shards, n_layers, counts, n_graphs, k,
                                    min_count, rank_by, buckets, version, on_progress)
    finally:  # a failed run leaves no scratch behind
        version.drop_scratch()
    hub_ids = [neuron_label(a, b) for a, b in zip(*unpack(hubs), strict=True)]
    version.publish([w[0] for w in written], {
        "shards": held, "graphs": n_graphs, "hubs": hub_ids, "model": model,
        "params": {"k": k, "min_count": min_count, "max_share": max_share,
                   "rank_by": rank_by}})
    return CooccurrenceReport(ck, n_graphs, len(hubs), sum(w[1] for w in written),
                              time.perf_counter() - t0)


def run_cooccurrence(lake, *, model, corpora=None, params: CooccurrenceParams | None = None,
                     cluster=None, progress: Progress | None = None) -> CooccurrenceReport:
    """The ``cooccurrence`` table: for each neuron the neurons found in the same graphs
    (top k, with joint count, Jaccard and normalised PMI), on a Dask cluster (a local
    one by default). ``corpora``: those of a reduce (default: the only one)."""
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or CooccurrenceParams()
    progress = progress or Progress()
    model = model_name(model)
    corpora = atlas_corpora(lake, model, corpora)
    with connect(cluster, default="local", progress=progress) as client:
        return cooccurrence_lake(lake, model, corpora, client, k=params.k,
                                 min_count=params.min_count, max_share=params.max_share,
                                 rank_by=params.rank_by, on_progress=lambda d, t:
                                 progress.update("cooccurrence", d, t))
