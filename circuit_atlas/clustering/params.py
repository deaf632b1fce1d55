"""The clustering stage's parameters (the CLI's options), importable without
infomap or igraph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal["infomap", "leiden"]


@dataclass(frozen=True)
class ClusteringParams:
    """The network built from the edges table, and the methods that cluster it."""

    methods: tuple[Method, ...] = ("infomap",)
    """Method; repeat for both."""
    min_count: int = 5
    """Keep edges seen at least this often (the count column)."""
    top_k: int | None = None
    """Keep each neuron's K strongest outgoing edges (default: all)."""
    weight: Literal["mean_abs_weight_sq", "mean_abs_weight", "weight_abs_sum", "count",
                    "graph_count"] = "mean_abs_weight_sq"
    """Link weight."""
    include_embeddings: bool = False
    """Add embedding (token) nodes."""
    include_logits: bool = False
    """Add logit (token) nodes."""
    seed: int = 42
    """Random seed (same seed, same result)."""
    two_level: bool = False
    """One level of modules, no hierarchy."""
    trials: int = 1
    """Infomap trials (best kept)."""
    markov_time: float = 1.0
    """Infomap Markov time."""
    flow_model: Literal["undirected", "directed", "undirdir", "outdirdir", "rawdir"] = (
        "undirected")
    """Infomap flow model (see circuit_atlas.clustering.methods for why)."""
    objective: Literal["modularity", "CPM"] = "modularity"
    """Leiden objective."""
    resolution: float = 1.0
    """Leiden resolution."""
    levels: int = 2
    """Leiden levels (recursive)."""

    def network(self) -> dict:
        from circuit_atlas.clustering.network import network_params

        return network_params(self.min_count, self.top_k, self.weight,
                              self.include_embeddings, self.include_logits)

    def method(self, method: str) -> dict:
        from circuit_atlas.clustering.methods import method_params

        return method_params(method, seed=self.seed, two_level=self.two_level,
                             trials=self.trials, markov_time=self.markov_time,
                             flow_model=self.flow_model, objective=self.objective,
                             resolution=self.resolution, levels=self.levels)
