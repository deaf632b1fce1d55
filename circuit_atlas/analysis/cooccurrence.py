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

Memory: each shard's pairs are split into buckets by the first neuron and written to
scratch; one task per bucket sums its pairs and keeps each neuron's top k, so no task
holds more than a bucket.
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
PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("joint", pa.int64())])


def key(layer: pl.Expr | np.ndarray, neuron: pl.Expr | np.ndarray):
    """One int64 per neuron (see ``lake.neurons.pack``)."""
    return pack(layer, neuron)


def graph_neurons(nodes: pl.DataFrame, n_layers: int, skip: list[int] = ()) -> pl.DataFrame:
    """(graph_id, key) once per neuron and graph: MLP neurons only (no embeddings,
    logits or remainders), graphs in ``skip`` (counted from another shard) dropped."""
    return (nodes.filter((pl.col("layer") >= 0) & (pl.col("layer") < n_layers)
                         & (pl.col("neuron") >= 0) & ~pl.col("graph_id").is_in(list(skip)))
            .select("graph_id", key=key(pl.col("layer"), pl.col("neuron"))).unique())


def pair_counts(members: pl.DataFrame, hubs: np.ndarray) -> pl.DataFrame:
    """(a, b, joint) for every ordered pair a != b of non-hub neurons sharing a graph."""
    from scipy import sparse

    members = members.filter(~pl.col("key").is_in(hubs.tolist()))
    if members.is_empty():
        return pl.from_arrow(PAIR_SCHEMA.empty_table())
    graphs, g = np.unique(members["graph_id"].to_numpy(), return_inverse=True)
    keys, n = np.unique(members["key"].to_numpy(), return_inverse=True)
    x = sparse.csr_matrix((np.ones(len(g), np.int64), (g, n)), shape=(len(graphs), len(keys)))
    c = (x.T @ x).tocoo()
    off = c.row != c.col
    return pl.DataFrame({"a": keys[c.row[off]], "b": keys[c.col[off]],
                         "joint": c.data[off].astype(np.int64)})


def top_pairs(pairs: pl.DataFrame, counts: pl.DataFrame, n_graphs: int, k: int,
              min_count: int, rank_by: str) -> pl.DataFrame:
    """Sum ``pairs`` (a, b, joint), add the metrics, keep each a's top ``k`` by
    ``rank_by`` (ties: larger joint count, then smaller other neuron)."""
    summed = pairs.group_by("a", "b").agg(pl.col("joint").sum()).filter(
        pl.col("joint") >= min_count)
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


def _shard_task(lake, shard, n_layers: int, skip: list[int], hubs: np.ndarray,
                buckets: int, path: str, version) -> list[list[int]]:
    """One shard's pairs, split into buckets, written to one scratch file; returns each
    bucket's record batches there."""
    from circuit_atlas.lake import GRAPH_NODES
    from circuit_atlas.lake.validate import read_parquet

    nodes = pl.from_arrow(read_parquet(shard.file("graph_nodes"), GRAPH_NODES, lake.fs,
                                       ["graph_id", "layer", "neuron"]))
    pairs = pair_counts(graph_neurons(nodes, n_layers, skip), hubs).with_columns(
        bucket=((layer_of(pl.col("a")) * 1_000_003 + neuron_of(pl.col("a"))) % buckets)
        .cast(pl.Int32)).sort("bucket")
    parts = [pairs.filter(pl.col("bucket") == b).drop("bucket").to_arrow().cast(PAIR_SCHEMA)
             for b in range(buckets)]
    return version.write_scratch(path, parts, PAIR_SCHEMA)


def _bucket_task(paths: list[str], bucket: int, counts: pl.DataFrame, n_graphs: int,
                 k: int, min_count: int, rank_by: str, version,
                 batches: list[list[list[int]]]) -> tuple[str, int]:
    """One bucket's pairs from every shard's scratch file, to its top pairs."""
    from circuit_atlas.lake.schemas import COOCCURRENCE

    frames = [pl.from_arrow(version.read_scratch(p, b[bucket]))
              for p, b in zip(paths, batches, strict=True)]
    table = top_pairs(pl.concat(frames), counts, n_graphs, k, min_count, rank_by).sort(
        ["layer", "neuron", rank_by, "joint_count", "other_layer", "other_neuron"],
        descending=[False, False, True, True, False, False])
    name = version.write(f"bucket-{bucket:04d}.parquet", table.to_arrow(), COOCCURRENCE)
    return name, len(table)


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
    counts = neurons.filter(~pl.col("key").is_in(hubs.tolist()))
    workers = len(client.scheduler_info(n_workers=-1)["workers"]) or 1
    buckets = buckets or max(1, min(256, 4 * workers, len(counts) // 1000 + 1))
    version = lake.new_table_version(model, ck, "cooccurrence")
    scratch = [version.scratch(f"shard-{i:06d}.arrow") for i in range(len(shards))]
    skips = repeated_graphs(lake, shards)
    parts = [client.submit(_shard_task, lake, s, n_layers, skip, hubs, buckets, path,
                           version, pure=False)
             for s, skip, path in zip(shards, skips, scratch, strict=True)]
    counts_f = client.scatter(counts, broadcast=True)
    finals = [client.submit(_bucket_task, scratch, b, counts_f, n_graphs, k, min_count,
                            rank_by, version, parts, pure=False) for b in range(buckets)]
    total = len(parts) + len(finals)
    for done, _ in enumerate(as_completed([*parts, *finals]), start=1):
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
