"""Clustering a lake's ``edges`` table: memory check, one task, two tables published.

The network is built and clustered in one process: this one (no cluster), or one
Dask worker with enough memory (a SLURM job with ``--mem`` set), never the client.
Before anything starts, the links are counted lazily and the method's memory need
is estimated (:func:`estimate_memory`); a run that cannot fit is refused with the
remedies. Each method's result is one file of ``cluster_assignments`` and one of
``clusters``; a run replaces its method's files and carries the others over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from circuit_atlas.clustering.methods import cluster
from circuit_atlas.clustering.network import build_network, link_frame
from circuit_atlas.clustering.params import ClusteringParams
from circuit_atlas.clustering.tables import assignment_table, cluster_table, nmi
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.derived import TableVersion
from circuit_atlas.lake.schemas import CLUSTER_ASSIGNMENTS, CLUSTERS
from circuit_atlas.stage import Progress, Report, as_corpora, connect, open_lake

# Bytes per link and per node, measured by bench/cluster.py (see bench/RESULTS.md):
# the network arrays, the method's own structures and the modularity check.
BYTES_PER_LINK = {"infomap": 300, "leiden": 300}
BYTES_PER_NODE = {"infomap": 600, "leiden": 600}
MEMORY_SHARE = 0.9  # of the available memory (or a worker's limit) a run may plan on


@dataclass
class ClusterReport(Report):
    method: str
    nodes: int
    links: int
    estimate_bytes: int
    stats: dict[str, Any]
    phases: dict[str, float]
    where: str

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        s = self.stats
        return (f"cluster {self.method} on {self.where}: {self.nodes:,} nodes, "
                f"{self.links:,} links (estimated {self.estimate_bytes / 2**20:,.0f} MiB); "
                f"{s['top_modules']:,} top modules, {s['levels']} level(s); {phases}")


@dataclass
class ClusteringReport(Report):
    corpus: str
    runs: list[ClusterReport]
    comparison: dict[str, Any]

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.runs)


def estimate_memory(method: str, n_nodes: int, n_links: int) -> int:
    """Peak bytes one clustering of a network this size is expected to need."""
    return BYTES_PER_LINK[method] * n_links + BYTES_PER_NODE[method] * n_nodes + 200 * 2**20


def _edges(lake: Lake, model: str, corpus: str) -> tuple[pl.LazyFrame, int | None]:
    manifest = lake.table_manifest(model, corpus, "edges")
    if manifest is None:
        raise CircuitAtlasError(f"no edges table for model {model!r} and corpus {corpus!r} in "
                                f"{lake.url}; build it with: circuit-atlas reduce")
    shape = manifest["inputs"].get("model_shape") or {}
    return lake.table("edges", model, corpus), shape.get("n_layers")


def network_size(lake: Lake, model: str, corpus: str, net_params: dict[str, Any]
                 ) -> tuple[int, int]:
    """(nodes, links) of the network, counted without building it."""
    edges, n_layers = _edges(lake, model, corpus)
    links = link_frame(edges, net_params, n_layers)
    n_links = links.select(pl.len()).collect().item()
    nodes = pl.concat([links.select(layer="src_layer", index="src_neuron"),
                       links.select(layer="tgt_layer", index="tgt_neuron")]).unique()
    return nodes.select(pl.len()).collect().item(), n_links


def cluster_task(lake: Lake, model: str, corpus: str, method: str, net_params: dict[str, Any],
                 params: dict[str, Any], versions: dict[str, TableVersion],
                 on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build, cluster and write one method's parts; runs where the memory is."""
    phases: dict[str, float] = {}
    t = time.perf_counter()
    edges, n_layers = _edges(lake, model, corpus)
    if on_phase:
        on_phase("building the network")
    net = build_network(link_frame(edges, net_params, n_layers).collect(), net_params)
    phases["network"] = time.perf_counter() - t
    t = time.perf_counter()
    partition = cluster(net, method, params, on_phase)
    phases["cluster"] = time.perf_counter() - t
    t = time.perf_counter()
    assignments = assignment_table(net, partition)
    versions["cluster_assignments"].write(f"{method}.parquet", assignments, CLUSTER_ASSIGNMENTS)
    versions["clusters"].write(f"{method}.parquet", cluster_table(assignments), CLUSTERS)
    phases["write"] = time.perf_counter() - t
    return {"stats": partition.stats, "phases": phases}


def _placement(client: Any, need: int) -> tuple[str | None, int, str]:
    """Where a run needing ``need`` bytes goes: (worker address or None, budget, label)."""
    if client is None:
        import psutil

        return None, int(psutil.virtual_memory().available * MEMORY_SHARE), "this process"
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise CircuitAtlasError("the Dask cluster has no workers")
    addr, info = max(workers.items(), key=lambda kv: kv[1].get("memory_limit") or 0)
    return addr, int((info.get("memory_limit") or 0) * MEMORY_SHARE), f"worker {addr}"


def cluster_lake(lake: Lake, model: str, corpus: str, method: str, net_params: dict[str, Any],
                 params: dict[str, Any], client: Any = None,
                 on_phase: Callable[[str], None] | None = None) -> ClusterReport:
    """Cluster the ``edges`` table of (model, corpus) with ``method``; publish the result."""
    n_nodes, n_links = network_size(lake, model, corpus, net_params)
    need = estimate_memory(method, n_nodes, n_links)
    addr, budget, where = _placement(client, need)
    if need > budget:
        raise CircuitAtlasError(
            f"{method} on {n_links:,} links and {n_nodes:,} nodes needs about "
            f"{need / 2**30:.1f} GiB, but {where} has {budget / 2**30:.1f} GiB to give: raise "
            f"--min-count (now {net_params['min_count']}), set --top-k, or run on a bigger "
            "worker (--cluster slurm --memory ...)")
    versions = {t: lake.new_table_version(model, corpus, t) for t in ("cluster_assignments",
                                                                      "clusters")}
    args = (lake, model, corpus, method, net_params, params, versions)
    if client is None:
        result = cluster_task(*args, on_phase=on_phase)
    else:
        if on_phase:
            on_phase(f"clustering on {where}")
        result = client.submit(cluster_task, *args, workers=[addr], allow_other_workers=False,
                               pure=False).result()
    record = {"network": net_params, "params": params, "stats": result["stats"],
              "estimate_bytes": need}
    for table, version in versions.items():
        current = lake.table_manifest(model, corpus, table)
        others = sorted(m for m in (current or {}).get("inputs", {}).get("methods", {})
                        if m != method)
        files = version.carry(current, [f"{m}.parquet" for m in others]) + [
            f"{version.version}/{method}.parquet"]
        methods = {m: current["inputs"]["methods"][m] for m in others}
        version.publish(files, {"methods": {**methods, method: record}, "model": model})
    return ClusterReport(method, n_nodes, n_links, need, result["stats"], result["phases"],
                         where)


def compare_methods(lake: Lake, model: str, corpus: str) -> dict[str, Any]:
    """The comparison report: each method's stats and the NMI between methods (top
    modules and full paths, over the nodes both clustered)."""
    manifest = lake.table_manifest(model, corpus, "cluster_assignments")
    if manifest is None:
        raise CircuitAtlasError(f"no clustering for model {model!r} and corpus {corpus!r}; "
                                "run: circuit-atlas cluster")
    methods = manifest["inputs"]["methods"]
    rows = {m: {**r["stats"], "params": r["params"], "network": r["network"]}
            for m, r in sorted(methods.items())}
    names = sorted(methods)
    pairs = []
    if len(names) > 1:
        df = lake.table("cluster_assignments", model, corpus).select(
            "layer", "neuron", "method", "top_cluster", "cluster_path").collect()
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = df.filter(pl.col("method") == a).join(
                    df.filter(pl.col("method") == b), on=["layer", "neuron"])
                pairs.append({"a": a, "b": b, "nodes": len(both),
                              "nmi_top": nmi(both["top_cluster"].to_numpy(),
                                             both["top_cluster_right"].to_numpy()),
                              "nmi_path": nmi(both["cluster_path"].to_numpy(),
                                              both["cluster_path_right"].to_numpy())})
    return {"methods": rows, "nmi": pairs}


def run_clustering(lake, *, model, corpora=None, params: ClusteringParams | None = None,
                   cluster=None, progress: Progress | None = None) -> ClusteringReport:
    """Cluster the edges table of a reduce (``corpora``: default the only one) into
    circuits with each of ``params.methods`` (Infomap multi-level, Leiden); writes
    the cluster_assignments and clusters tables and returns the comparison of every
    method the lake holds for them. In this process by default; with a ``cluster``,
    on the worker with the most memory."""
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or ClusteringParams()
    progress = progress or Progress()
    model = model_name(model)
    corpus = lake.reduced_corpus(model, as_corpora(corpora))
    net = params.network()
    methods = list(dict.fromkeys(params.methods))
    checked = {m: params.method(m) for m in methods}
    runs = []
    with connect(cluster, default="none", progress=progress) as client:
        for method in methods:
            runs.append(cluster_lake(lake, model, corpus, method, net, checked[method], client,
                                     on_phase=lambda p, m=method: progress.update(
                                         f"{m}: {p}", 0, None)))
    return ClusteringReport(corpus, runs, compare_methods(lake, model, corpus))
