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
* ``clusters``: cluster_path, level, top_cluster, sub_module, subsub_module, size,
  layer_min, layer_max, median_layer (and flow, top_members);
* ``metadata``: key / value provenance.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import polars as pl

from circuit_atlas._version import __version__
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import neuron_label


def _optional(lake: Lake, name: str, model: str, corpus: str) -> pl.DataFrame | None:
    if lake.table_manifest(model, corpus, name) is None:
        return None
    return lake.table(name, model, corpus).drop("model", "corpus").collect()


def atlas_tables(lake: Lake, model: str, corpus: str, method: str = "infomap"
                 ) -> dict[str, pl.DataFrame]:
    """The four tables of the atlas file, as polars frames."""
    from circuit_atlas.lake.labels import current_labels

    manifest = lake.table_manifest(model, corpus, "neurons")
    if manifest is None:
        raise CircuitAtlasError(f"no reduced tables for {model!r} / {corpus!r}; "
                                "run: circuit-atlas reduce")
    shape = manifest["inputs"].get("model_shape") or {}
    n_layers, per_layer = shape.get("n_layers"), shape.get("n_neurons")
    if n_layers is None:
        raise CircuitAtlasError("the reduced tables do not record the model's shape; "
                                "recompute the graphs with this version")
    stats = lake.table("neurons", model, corpus).drop("model", "corpus").filter(
        pl.col("layer").is_between(0, n_layers - 1)).collect()
    neurons = stats.with_columns(
        feature_id=pl.col("layer").cast(pl.Int64) * per_layer + pl.col("neuron"),
        max_activation=pl.col("activation_max"), num_exemplars=pl.col("graph_count"))
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
    edges = lake.table("edges", model, corpus).drop("model", "corpus").collect()
    edge_front = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum",
                  "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max", "mean_weight",
                  "mean_abs_weight"]
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
        "graphs_reduced": len(manifest["inputs"]["shards"]), "reduce": manifest["inputs"][
            "params"], "clustering_method": method if assignments is not None else None,
        "clustering": (lake.table_manifest(model, corpus, "cluster_assignments") or {}).get(
            "inputs", {}).get("methods", {}).get(method),
        "labels": None if labels is None else len(labels),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "circuit_atlas_version": __version__, "lake": lake.url,
    }
    metadata = pl.DataFrame({"key": list(meta), "value": [
        v if isinstance(v, str) else json.dumps(v) for v in meta.values()]})
    return {"neurons": neurons, "edges": edges, "clusters": clusters, "metadata": metadata}


def export_duckdb(lake: Lake, model: str, corpus: str, path: str, method: str = "infomap"
                  ) -> dict[str, int]:
    """Write the atlas to one DuckDB file at ``path`` (replaced atomically)."""
    import duckdb

    tables = atlas_tables(lake, model, corpus, method)
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
