"""Exports of an atlas: one DuckDB file with the original atlas's tables and column names, and
the network for Gephi (GEXF, GraphML).

The DuckDB file has, so that the original atlas's queries keep working:

* ``neurons``: layer, neuron, feature_id (layer * neurons per layer + neuron), label,
  description (the output-pass label, else an imported one), max_activation,
  num_exemplars (graphs it is in), cluster_path, top_cluster, sub_module,
  subsub_module, hierarchy_depth, infomap_flow (of the chosen clustering method), and
  the statistics of our ``neurons`` table; MLP neurons only;
* ``edges``: src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum,
  weight_abs_sum, weight_sq_sum, weight_min, weight_max, mean_weight,
  mean_abs_weight (and graph_count); embedding (layer -1) and logit (layer = number
  of layers) nodes included, their "neuron" being a token id;
  With ``--edges wiring`` the edges are the weight-based wiring's downstream
  connections instead (src_layer, src_neuron, tgt_layer, tgt_neuron,
  effective_strength, c_gate, c_up, polarity, rank, and mean_weight /
  mean_abs_weight: the strength, so that the same queries run), and ``neurons`` holds
  every neuron of the model, as in the original OLMo-3 atlas;
* ``clusters``: cluster_path, level, top_cluster, sub_module, subsub_module, size,
  layer_min, layer_max, median_layer (and flow, top_members);
* ``metadata``: key / value provenance.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import numpy as np
import polars as pl

from circuit_atlas._version import __version__
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import neuron_label
from circuit_atlas.lake.schemas import STATIC_CORPUS


def _optional(lake: Lake, name: str, model: str, corpus: str) -> pl.DataFrame | None:
    if lake.table_manifest(model, corpus, name) is None:
        return None
    return lake.table(name, model, corpus).drop("model", "corpus").collect()


def wiring_edges(lake: Lake, model: str, corpus: str | None) -> tuple[pl.DataFrame, dict]:
    """The downstream rows of the model's weight-based wiring in the layout of an atlas's
    edges table (the OLMo-3 atlas's: effective_strength, c_gate, c_up, polarity, rank;
    mean_weight and mean_abs_weight repeat the strength so that queries written for RelP
    atlases run), and the wiring's manifest."""
    from circuit_atlas.analysis.wiring import wiring_partition

    where = wiring_partition(lake, model, corpus)
    if where is None:
        raise CircuitAtlasError(f"no wiring table for {model!r}; run: circuit-atlas wiring")
    edges = (lake.table("wiring", model, where).filter(pl.col("direction") == "downstream")
             .select("src_layer", "src_neuron", "tgt_layer", "tgt_neuron",
                     pl.col("strength").alias("effective_strength"), "c_gate", "c_up",
                     "polarity", "rank", pl.col("strength").alias("mean_weight"),
                     pl.col("strength").abs().alias("mean_abs_weight"))
             .sort("src_layer", "src_neuron", "polarity", "rank",
                   descending=[False, False, True, False]).collect())
    return edges, lake.table_manifest(model, where, "wiring")


def atlas_tables(lake: Lake, model: str, corpus: str | None, method: str = "infomap",
                 edges_from: str = "relp") -> dict[str, pl.DataFrame]:
    """The four tables of the atlas file, as polars frames. ``edges_from`` "wiring": the
    edges are the weight-based wiring's downstream connections and the neurons are
    every neuron of the model (with the reduced statistics, labels and clusters of
    ``corpus`` where it has them; ``corpus`` may be None then)."""
    from circuit_atlas.lake.labels import current_labels

    if edges_from not in ("relp", "wiring"):
        raise CircuitAtlasError(f"edges come from relp or wiring, not {edges_from!r}")
    manifest = corpus and lake.table_manifest(model, corpus, "neurons")
    wiring = None
    if edges_from == "wiring":
        wiring, wiring_manifest = wiring_edges(lake, model, corpus)
        shape = wiring_manifest["inputs"]["model_shape"]
    elif manifest is None:
        raise CircuitAtlasError(f"no reduced tables for {model!r} / {corpus!r}; "
                                "run: circuit-atlas reduce")
    else:
        shape = manifest["inputs"].get("model_shape") or {}
    n_layers, per_layer = shape.get("n_layers"), shape.get("n_neurons")
    if n_layers is None:
        raise CircuitAtlasError("the reduced tables do not record the model's shape; "
                                "recompute the graphs with this version")
    if manifest:
        stats = lake.table("neurons", model, corpus).drop("model", "corpus").filter(
            pl.col("layer").is_between(0, n_layers - 1)).collect()
    else:
        stats = pl.DataFrame(schema={"layer": pl.Int16, "neuron": pl.Int32,
                                     "activation_max": pl.Float64, "graph_count": pl.Int64})
    if wiring is not None:  # every neuron, the reduced statistics where there are some
        grid = pl.DataFrame({
            "layer": pl.Series(np.repeat(np.arange(n_layers), per_layer), dtype=pl.Int16),
            "neuron": pl.Series(np.tile(np.arange(per_layer), n_layers), dtype=pl.Int32)})
        stats = grid.join(stats, on=["layer", "neuron"], how="left")
    neurons = stats.with_columns(
        feature_id=pl.col("layer").cast(pl.Int64) * per_layer + pl.col("neuron"),
        max_activation=pl.col("activation_max"), num_exemplars=pl.col("graph_count"))
    if corpus is None:
        corpus = STATIC_CORPUS
    labels = current_labels(lake, model, corpus)
    if labels is not None:
        neurons = neurons.join(labels.select("layer", "neuron", "label", "description"),
                               on=["layer", "neuron"], how="left")
    else:
        neurons = neurons.with_columns(label=pl.lit(None, pl.String),
                                       description=pl.lit(None, pl.String))
    assignments = _optional(lake, "cluster_assignments", model, corpus)
    clusters = _optional(lake, "clusters", model, corpus)
    cluster_cols = ["cluster_path", "top_cluster", "sub_module", "subsub_module",
                    "hierarchy_depth", "infomap_flow"]
    if assignments is not None and method in set(assignments["method"]):
        mine = assignments.filter(pl.col("method") == method).rename(
            {"depth": "hierarchy_depth", "flow": "infomap_flow"}).select(
            "layer", "neuron", *cluster_cols)
        neurons = neurons.join(mine, on=["layer", "neuron"], how="left")
        clusters = clusters.filter(pl.col("method") == method)
    elif assignments is not None:
        raise CircuitAtlasError(f"no {method} clustering in the lake (it has "
                                f"{', '.join(sorted(set(assignments['method'])))})")
    else:
        neurons = neurons.with_columns(pl.lit(None, pl.Int32).alias(c) for c in cluster_cols)
        clusters = None
    front = ["layer", "neuron", "feature_id", "label", "description", "max_activation",
             "num_exemplars", *cluster_cols]
    neurons = neurons.select(*front, *[c for c in neurons.columns if c not in front]).sort(
        "layer", "neuron")
    if wiring is not None:
        edges = wiring
    else:
        edges = lake.table("edges", model, corpus).drop("model", "corpus").collect()
        edge_front = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count",
                      "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min",
                      "weight_max", "mean_weight", "mean_abs_weight"]
        edges = edges.select(*edge_front, *[c for c in edges.columns if c not in edge_front])
    if clusters is None:
        clusters = pl.DataFrame(schema={"cluster_path": pl.String, "level": pl.Int16,
                                        "top_cluster": pl.Int32, "sub_module": pl.Int32,
                                        "subsub_module": pl.Int32, "size": pl.Int64,
                                        "layer_min": pl.Int16, "layer_max": pl.Int16,
                                        "median_layer": pl.Float64})
    else:
        clusters = clusters.select("cluster_path", "level", "top_cluster", "sub_module",
                                   "subsub_module", "size", "layer_min", "layer_max",
                                   "median_layer", "flow", "top_members", "method")
        from circuit_atlas.lake.labels import cluster_names

        named = cluster_names(lake, model, corpus, method)
        if named is not None:
            clusters = clusters.join(named, on="cluster_path", how="left")
    meta = {
        "model": model, "corpus": corpus, "model_shape": shape,
        "graphs_reduced": len(manifest["inputs"]["shards"]) if manifest else 0,
        "reduce": manifest["inputs"]["params"] if manifest else None,
        "edges": "weight-based wiring, downstream" if wiring is not None else "RelP",
        "wiring": wiring_manifest["inputs"] if wiring is not None else None,
        "clustering_method": method if assignments is not None else None,
        "clustering": (lake.table_manifest(model, corpus, "cluster_assignments") or {}).get(
            "inputs", {}).get("methods", {}).get(method),
        "labels": None if labels is None else len(labels),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "circuit_atlas_version": __version__, "lake": lake.url,
    }
    metadata = pl.DataFrame({"key": list(meta), "value": [
        v if isinstance(v, str) else json.dumps(v) for v in meta.values()]})
    return {"neurons": neurons, "edges": edges, "clusters": clusters, "metadata": metadata}


def export_duckdb(lake: Lake, model: str, corpus: str | None, path: str,
                  method: str = "infomap", edges_from: str = "relp") -> dict[str, int]:
    """Write the atlas to one DuckDB file at ``path`` (replaced atomically)."""
    import duckdb

    tables = atlas_tables(lake, model, corpus, method, edges_from)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    con = duckdb.connect(tmp)
    try:
        for name, df in tables.items():
            con.register("frame", df.to_arrow())
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM frame')
            con.unregister("frame")
    finally:
        con.close()
    os.replace(tmp, path)
    return {name: len(df) for name, df in tables.items()}


def export_network(lake: Lake, model: str, corpus: str, path: str, fmt: str,
                   method: str = "infomap", min_count: int = 1) -> dict[str, Any]:
    """The neuron network (edges with count >= ``min_count``) with labels and clusters
    as node attributes, as GEXF or GraphML for Gephi."""
    import networkx as nx

    tables = atlas_tables(lake, model, corpus, method)
    neurons = tables["neurons"]
    n_layers = json.loads(tables["metadata"].filter(pl.col("key") == "model_shape")[
        "value"][0])["n_layers"]
    edges = tables["edges"].filter(
        (pl.col("count") >= min_count) & pl.col("src_layer").is_between(0, n_layers - 1)
        & pl.col("tgt_layer").is_between(0, n_layers - 1))
    graph = nx.DiGraph()
    for r in neurons.iter_rows(named=True):
        node = neuron_label(r['layer'], r['neuron'])
        # "label" is what Gephi shows: the neuron's label, else its id
        attrs = {"layer": int(r["layer"]), "neuron": int(r["neuron"]),
                 "label": r["label"] or node, "labelled": r["label"] is not None,
                 "cluster_path": r["cluster_path"] or "",
                 "top_cluster": int(r["top_cluster"] or 0),
                 "graph_count": int(r["num_exemplars"])}
        graph.add_node(node, **attrs)
    for r in edges.iter_rows(named=True):
        graph.add_edge(neuron_label(r["src_layer"], r["src_neuron"]),
                       neuron_label(r["tgt_layer"], r["tgt_neuron"]),
                       weight=float(r["mean_weight"]),
                       abs_weight=float(r["mean_abs_weight"]), count=int(r["count"]))
    if fmt == "gexf":
        nx.write_gexf(graph, path)
    elif fmt == "graphml":
        nx.write_graphml(graph, path)
    else:
        raise CircuitAtlasError(f"unknown network format {fmt!r}; use gexf or graphml")
    return {"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()}
