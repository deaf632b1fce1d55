"""Influence and pruning of an attribution graph, as circuit-tracer does it.

1. Normalise the adjacency: each target's incoming |weights| sum to 1.
2. A node's influence is the total weight of all paths from it to the logits,
   weighted by the logits' probabilities: ``w @ (A + A^2 + ...)`` (the graph is
   acyclic, so the series ends).
3. Keep the nodes that carry ``node_threshold`` of the influence (embeddings and
   logits always stay), then, on the graph of kept nodes, the edges that carry
   ``edge_threshold`` of the edge influence; drop nodes left without edges.
"""

from __future__ import annotations

import numpy as np

from circuit_atlas.compute.attribution import RawGraph


def normalise(adjacency: np.ndarray) -> np.ndarray:
    a = np.abs(adjacency)
    return a / np.maximum(a.sum(1, keepdims=True), 1e-12)


def influence(norm_adj: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = np.zeros_like(weights)
    current = weights @ norm_adj
    for _ in range(norm_adj.shape[0] + 1):
        if not current.any():
            break
        total += current
        current = current @ norm_adj
    return total


def threshold_value(scores: np.ndarray, share: float) -> float:
    """The smallest score among the top scores that together reach ``share`` of the sum."""
    s = np.sort(scores.ravel())[::-1]
    if s.sum() <= 0:
        return np.inf
    i = int(np.searchsorted(np.cumsum(s) / s.sum(), share))
    return float(s[min(i, len(s) - 1)])


def logit_weights(graph: RawGraph) -> np.ndarray:
    """The logits' probabilities on the logit nodes, zero elsewhere."""
    weights = np.zeros(graph.n_nodes)
    weights[graph.n_nodes - graph.n_logits:] = graph.targets.probs
    return weights


def node_influence(graph: RawGraph) -> np.ndarray:
    """Each node's influence on the logits in the complete graph (phase 2)."""
    return influence(normalise(graph.adjacency), logit_weights(graph))


def prune(graph: RawGraph, node_threshold: float, edge_threshold: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node_mask, edge_mask, node_influence) of the pruned graph."""
    first_input = graph.first_input
    weights = logit_weights(graph)
    node_inf = node_influence(graph)
    keep = node_inf >= threshold_value(node_inf, node_threshold)
    keep[first_input:] = True  # embeddings, constants and logits
    pruned = graph.adjacency * keep[:, None] * keep[None, :]
    norm = normalise(pruned)
    edge_scores = norm * (influence(norm, weights) + weights)[:, None]
    edges = (edge_scores >= threshold_value(edge_scores, edge_threshold)) & (pruned != 0)
    while True:
        before = keep.copy()
        has_out = edges.any(0)
        has_in = edges.any(1)
        keep[:first_input] &= has_out[:first_input]  # sources must feed something
        keep[: graph.n_candidates] &= has_in[: graph.n_candidates]  # neurons must be fed
        edges &= keep[:, None] & keep[None, :]
        if (keep == before).all():
            break
    return keep, edges, node_inf
