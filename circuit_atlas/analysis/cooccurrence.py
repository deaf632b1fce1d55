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
~150M rows for 20,000 graphs of ~100 neurons). Each shard's task writes its graphs'
neuron sets as an incidence list (graph, neuron index) to scratch. The neurons are
split into buckets, contiguous ranges of the sorted neuron keys of about equal
expected work; a bucket's task reads the incidence of a few shards at a time, as a
sparse graph x neuron matrix X, and adds up ``X[:, bucket]^T X`` (scipy's sparse
product: joint counts of the bucket's neurons with every neuron). Its memory is
bounded by the bucket's distinct pairs and one chunk's product; joint counts are
integers, so the sums are exact in any order.
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
INCIDENCE_SCHEMA = pa.schema([("graph", pa.int32()), ("neuron", pa.int32())])


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
    """(graph, neuron) of ``members`` as int32 indices: graphs numbered 0.. in id order,
    neurons by their position in the sorted ``keys`` (members not in it, hubs, left out)."""
    k = members["key"].to_numpy()
    at = np.searchsorted(keys, k)
    known = at < len(keys)
    known[known] = keys[at[known]] == k[known]
    _, graph = np.unique(members["graph_id"].to_numpy()[known], return_inverse=True)
    return pa.table({"graph": graph.astype(np.int32), "neuron": at[known].astype(np.int32)},
                    schema=INCIDENCE_SCHEMA)


def joint_counts(parts: list[pa.Table], n_neurons: int, lo: int, hi: int):
    """Joint graph counts of neurons ``lo:hi`` with every neuron, over incidence
    ``parts`` (each its own graphs): a (hi - lo) x n_neurons sparse int matrix."""
    from scipy import sparse

    offsets = np.cumsum([0] + [_graphs(p) for p in parts])
    graph = np.concatenate([p.column("graph").to_numpy() + o
                            for p, o in zip(parts, offsets, strict=False)] or [np.zeros(0, int)])
    neuron = np.concatenate([p.column("neuron").to_numpy() for p in parts]
                            or [np.zeros(0, int)])
    x = sparse.csc_matrix((np.ones(len(graph), np.int32), (graph, neuron)),
                          shape=(int(offsets[-1]), n_neurons))
    return (x[:, lo:hi].T.tocsr() @ x.tocsr()).tocsr()


def _graphs(part: pa.Table) -> int:
    graph = part.column("graph").to_numpy()
    return int(graph.max()) + 1 if len(graph) else 0


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


def _shard_task(lake, shard, n_layers: int, skip: list[int], keys: np.ndarray, path: str,
                version) -> int:
    """One shard's incidence to a scratch file; returns its pair count (sum of its
    graphs' squared sizes), which sizes the buckets and chunks."""
    from circuit_atlas.lake import GRAPH_NODES
    from circuit_atlas.lake.validate import read_parquet

    nodes = pl.from_arrow(read_parquet(shard.file("graph_nodes"), GRAPH_NODES, lake.fs,
                                       ["graph_id", "layer", "neuron"]))
    table = incidence(graph_neurons(nodes, n_layers, skip), keys)
    version.write_scratch(path, [table], INCIDENCE_SCHEMA)
    sizes = np.bincount(table.column("graph").to_numpy())
    return int((sizes.astype(np.int64) ** 2).sum())


def _bucket_task(paths: list[list[str]], lo: int, hi: int, counts: pl.DataFrame,
                 n_graphs: int, k: int, min_count: int, rank_by: str, version
                 ) -> tuple[str, int]:
    """Neurons ``lo:hi``: their joint counts with every neuron, summed over chunks of
    shards, to their top pairs (submitted once every shard task has written its file:
    no futures as arguments, which cost the reduce 11-24 s at 1,000 shards)."""
    from circuit_atlas.lake.schemas import COOCCURRENCE

    keys = counts["key"].to_numpy()
    total = None
    for chunk in paths:
        part = joint_counts([version.read_scratch(p) for p in chunk], len(keys), lo, hi)
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


def cooccurrence_lake(lake, model: str, corpora: list[str], client: Any, k: int = 20,
                      min_count: int = 2, max_share: float = 0.5, rank_by: str = "jaccard",
                      buckets: int | None = None,
                      on_progress: Callable[[int, int], None] | None = None
                      ) -> CooccurrenceReport:
    """The ``cooccurrence`` table of (model, corpora) on a Dask cluster."""
    from distributed import as_completed

    from circuit_atlas.analysis.inputs import reduced
    from circuit_atlas.lake.shards import repeated_graphs

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
    keys = counts["key"].to_numpy()
    version = lake.new_table_version(model, ck, "cooccurrence")
    scratch = [version.scratch(f"shard-{i:06d}.arrow") for i in range(len(shards))]
    skips = repeated_graphs(lake, shards)
    keys_f = client.scatter(keys, broadcast=True)
    parts = [client.submit(_shard_task, lake, s, n_layers, skip, keys_f, path, version,
                           pure=False)
             for s, skip, path in zip(shards, skips, scratch, strict=True)]
    for done, _ in enumerate(as_completed(parts), start=1):
        if on_progress:
            on_progress(done, len(parts))
    pair_counts = client.gather(parts)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    memory = min((w.get("memory_limit") or 0 for w in workers), default=0) or 4 * 2**30
    budget = max(100_000, int(memory * MEMORY_SHARE / BYTES_PER_PAIR))
    # a neuron's pairs are about its graph count times a graph's size: buckets of equal
    # expected pairs, enough that one holds the budget, and chunks of shards per bucket
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
    written = client.gather(finals)
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
