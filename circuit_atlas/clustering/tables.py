"""A :class:`Partition` as the lake's ``cluster_assignments`` and ``clusters`` rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from circuit_atlas.clustering.methods import Partition
from circuit_atlas.clustering.network import Network
from circuit_atlas.lake.schemas import CLUSTER_ASSIGNMENTS, CLUSTERS

TOP_MEMBERS = 10


def assignment_table(net: Network, partition: Partition) -> pa.Table:
    paths = partition.paths
    level = [[p[i] if len(p) > i else None for p in paths] for i in range(3)]
    return pa.table({
        "layer": pa.array(net.layer, pa.int16()),
        "neuron": pa.array(net.index, pa.int32()),
        "method": pa.array([partition.method] * net.n_nodes, pa.string()),
        "cluster_path": pa.array([":".join(map(str, p)) for p in paths], pa.string()),
        "top_cluster": pa.array(level[0], pa.int32()),
        "sub_module": pa.array(level[1], pa.int32()),
        "subsub_module": pa.array(level[2], pa.int32()),
        "depth": pa.array([len(p) for p in paths], pa.int16()),
        "flow": pa.array(partition.flow, pa.float64()),
    }, schema=CLUSTER_ASSIGNMENTS.schema)


def cluster_table(assignments: pa.Table) -> pa.Table:
    """Every module at every level of the hierarchies in ``assignments``."""
    df = pl.from_arrow(assignments).with_columns(
        path=pl.col("cluster_path").str.split(":").cast(pl.List(pl.Int32)),
        member=pl.format("L{}/N{}", "layer", "neuron"))
    depth = int(df["depth"].max() or 0)
    levels = []
    for level in range(1, depth + 1):
        prefix = pl.col("path").list.head(level)
        levels.append(
            df.filter(pl.col("depth") >= level)
            .with_columns(prefix=prefix)
            .sort(["flow", "layer", "neuron"], descending=[True, False, False])
            .group_by("method", "prefix", maintain_order=True)
            .agg(size=pl.len(), layer_min=pl.col("layer").min(),
                 layer_max=pl.col("layer").max(),
                 median_layer=pl.col("layer").cast(pl.Float64).median(),
                 flow=pl.col("flow").sum(), top_members=pl.col("member").head(TOP_MEMBERS))
            .with_columns(level=pl.lit(level, pl.Int16)))
    if not levels:
        return CLUSTERS.schema.empty_table()
    out = pl.concat(levels).with_columns(
        cluster_path=pl.col("prefix").cast(pl.List(pl.String)).list.join(":"),
        top_cluster=pl.col("prefix").list.get(0, null_on_oob=True),
        sub_module=pl.col("prefix").list.get(1, null_on_oob=True),
        subsub_module=pl.col("prefix").list.get(2, null_on_oob=True),
    ).sort("method", "level", "top_cluster", "sub_module", "subsub_module", nulls_last=False)
    return out.select(CLUSTERS.schema.names).to_arrow().cast(CLUSTERS.schema)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings of the same nodes."""
    import igraph as ig

    if len(a) == 0:
        return float("nan")
    return float(ig.compare_communities(np.unique(a, return_inverse=True)[1].tolist(),
                                        np.unique(b, return_inverse=True)[1].tolist(),
                                        method="nmi"))
