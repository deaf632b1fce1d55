"""The network that clustering sees, built from the lake's ``edges`` table.

Nodes are ``(layer, index)`` identities mapped to the dense range ``0..n-1`` (sorted
by layer, then index) so that Infomap and igraph get small integer ids; the arrays
``layer`` and ``index`` map them back. Links are directed, early layer to late.

By default only neuron -> neuron edges are kept: embedding nodes (layer -1) and
logit nodes (layer = n_layers) are hubs that every prompt touches and would pull
unrelated neurons into one module. ``include_embeddings``/``include_logits`` add them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.neurons import layer_of, neuron_label, neuron_of, pack
from circuit_atlas.lake.schemas import EMBEDDING_LAYER

# Link weight choices, as polars expressions over the edges table.
WEIGHTS: dict[str, pl.Expr] = {
    "mean_abs_weight_sq": pl.col("mean_abs_weight") ** 2,
    "mean_abs_weight": pl.col("mean_abs_weight"),
    "weight_abs_sum": pl.col("weight_abs_sum"),
    "count": pl.col("count").cast(pl.Float64),
    "graph_count": pl.col("graph_count").cast(pl.Float64),
}
DEFAULT_WEIGHT = "mean_abs_weight_sq"
DEFAULT_MIN_COUNT = 5


@dataclass
class Network:
    """A directed weighted network over dense node ids."""

    layer: np.ndarray  # (n_nodes,) int16
    index: np.ndarray  # (n_nodes,) int32
    src: np.ndarray  # (n_links,) int64 dense ids
    tgt: np.ndarray
    weight: np.ndarray  # (n_links,) float64, > 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.layer)

    @property
    def n_links(self) -> int:
        return len(self.src)

    @functools.cached_property
    def igraph(self) -> Any:
        """The network as a directed python-igraph Graph with a "weight" edge attribute,
        built once for Leiden and the modularity of every method."""
        import igraph as ig

        graph = ig.Graph(n=self.n_nodes, edges=np.column_stack([self.src, self.tgt]),
                         directed=True)
        graph.es["weight"] = self.weight
        return graph

    def node_ids(self, dense: np.ndarray) -> list[str]:
        """Display ids ``L12/N345`` of dense node ids."""
        return [neuron_label(self.layer[i], self.index[i]) for i in dense]


def network_params(min_count: int = DEFAULT_MIN_COUNT, top_k: int | None = None,
                   weight: str = DEFAULT_WEIGHT, include_embeddings: bool = False,
                   include_logits: bool = False) -> dict[str, Any]:
    """The network parameters, checked; recorded with every clustering."""
    if weight not in WEIGHTS:
        raise CircuitAtlasError(f"unknown weight {weight!r}; choose one of {', '.join(WEIGHTS)}")
    if min_count < 1:
        raise CircuitAtlasError(f"min count must be at least 1, got {min_count}")
    if top_k is not None and top_k < 1:
        raise CircuitAtlasError(f"top-k must be at least 1, got {top_k}")
    return {"min_count": min_count, "top_k": top_k, "weight": weight,
            "include_embeddings": include_embeddings, "include_logits": include_logits}


def link_frame(edges: pl.LazyFrame, params: dict[str, Any], n_layers: int | None
               ) -> pl.LazyFrame:
    """The filtered links (src_layer, src_neuron, tgt_layer, tgt_neuron, w), lazily: the
    client counts them to estimate memory without building the network."""
    lf = edges.filter(pl.col("count") >= params["min_count"])
    if not params["include_embeddings"]:
        lf = lf.filter(pl.col("src_layer") != EMBEDDING_LAYER)
    if not params["include_logits"]:
        if n_layers is None:
            raise CircuitAtlasError(
                "the edges table does not record the model's layer count (it was reduced "
                "from shards written before circuit-atlas recorded it), so logit nodes "
                "cannot be told from neurons: pass include_logits=True or reduce again")
        lf = lf.filter(pl.col("tgt_layer") < n_layers)
    lf = lf.select("src_layer", "src_neuron", "tgt_layer", "tgt_neuron",
                   WEIGHTS[params["weight"]].alias("w")).filter(pl.col("w") > 0)
    if params["top_k"] is not None:
        # the original atlas's "top-k downstream edges per neuron": strongest outgoing links;
        # ties broken by target so that the network is deterministic
        lf = lf.sort(["src_layer", "src_neuron", "w", "tgt_layer", "tgt_neuron"],
                     descending=[False, False, True, False, False]).filter(
            pl.int_range(pl.len()).over("src_layer", "src_neuron") < params["top_k"])
    return lf


def build_network(links: pl.DataFrame, params: dict[str, Any],
                  nodes: pl.DataFrame | None = None) -> Network:
    """The dense network of ``links`` (from :func:`link_frame`). ``nodes`` (layer, index)
    adds nodes that may have no link: they end up in modules of their own."""
    keys = [pack(links[f"{e}_layer"].to_numpy(), links[f"{e}_neuron"].to_numpy())
            for e in ("src", "tgt")]
    if nodes is not None and len(nodes):
        keys.append(pack(nodes["layer"].to_numpy(), nodes["neuron"].to_numpy()))
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    n = len(links)
    return Network(
        layer=layer_of(unique).astype(np.int16),
        index=neuron_of(unique).astype(np.int32),
        src=inverse[:n].astype(np.int64), tgt=inverse[n:2 * n].astype(np.int64),
        weight=links["w"].to_numpy().astype(np.float64), params=params)
