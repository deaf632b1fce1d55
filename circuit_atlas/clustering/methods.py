"""Clustering methods over a :class:`Network`: Infomap (multi-level) and Leiden.

Both return a :class:`Partition`: for every node its module path from the top level
down (1-based ids, ``(4466, 2)`` = sub-module 2 of top module 4466) and its flow.
Module ids are ranked by flow, largest first, at every level, as Infomap numbers them.

**Infomap flow model.** Attribution links run from early layers to late ones, so the
network is close to a DAG, and a directed random walk drains into the last layers;
only teleportation brings it back. We compared the flow models (``python
bench/cluster.py --flow-models``; figures in bench/RESULTS.md):

* on planted modules laid out as a layered DAG (8 modules of 40 neurons),
  ``undirected`` recovered them (NMI >= 0.99) in 12 of 12 networks, ``directed`` in
  6 of 12, merging modules down to NMI 0.29 on sparse ones even with 10 trials;
* on the demo atlas, ``directed`` separated the neurons of the medical corpus from
  those of the general one slightly better in three of four settings, ``undirected``
  came close; ``rawdir``/``outdirdir``/``undirdir`` once collapsed to three modules.

A circuit is a set of neurons that exchange much weight, upstream or downstream, and
the undirected flow (proportional to a node's total link weight) finds exactly that
without depending on teleportation. Hence ``undirected`` is the default (the original atlas
used ``directed``, still selectable with the other models).

**Leiden** (python-igraph) optimises directed modularity or CPM at a resolution and
is applied recursively, ``levels`` deep, to give sub-modules. Its flow is the node's
share of total link weight (in + out), the stationary flow of the undirected walk.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from circuit_atlas.clustering.network import Network
from circuit_atlas.errors import CircuitAtlasError

METHODS = ("infomap", "leiden")
FLOW_MODELS = ("undirected", "directed", "undirdir", "outdirdir", "rawdir")
DEFAULT_FLOW_MODEL = "undirected"
OBJECTIVES = ("modularity", "CPM")
DEFAULT_SEED = 42
MIN_SPLIT = 3  # Leiden does not split modules smaller than this


@dataclass
class Partition:
    """The result of one clustering: module paths and flows by dense node id."""

    method: str
    paths: list[tuple[int, ...]]
    flow: np.ndarray
    params: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> np.ndarray:
        return np.array([p[0] for p in self.paths], dtype=np.int64)


def method_params(method: str, *, seed: int = DEFAULT_SEED, two_level: bool = False,
                  trials: int = 1, markov_time: float = 1.0,
                  flow_model: str = DEFAULT_FLOW_MODEL, objective: str = "modularity",
                  resolution: float = 1.0, levels: int = 2) -> dict[str, Any]:
    """The parameters of ``method``, checked (only those that method uses)."""
    _one_of("clustering method", method, METHODS)
    if method == "infomap":
        _one_of("flow model", flow_model, FLOW_MODELS)
        if trials < 1 or markov_time <= 0:
            raise CircuitAtlasError("trials must be >= 1 and the Markov time > 0")
        return {"seed": seed, "two_level": two_level, "trials": trials,
                "markov_time": markov_time, "flow_model": flow_model}
    _one_of("Leiden objective", objective, OBJECTIVES)
    if levels < 1 or resolution <= 0:
        raise CircuitAtlasError("levels must be >= 1 and the resolution > 0")
    return {"seed": seed, "objective": objective, "resolution": resolution,
            "levels": 1 if two_level else levels}


def _one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CircuitAtlasError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def cluster(net: Network, method: str, params: dict[str, Any],
            on_phase: Callable[[str], None] | None = None) -> Partition:
    """Cluster ``net`` with ``method`` (params from :func:`method_params`)."""
    if net.n_nodes == 0:
        raise CircuitAtlasError("the network is empty: no edge passes the filters "
                                f"({net.params}); lower the min count")
    t0 = time.perf_counter()
    run = _infomap if method == "infomap" else _leiden
    partition = run(net, params, on_phase or (lambda _: None))
    partition.stats.update(partition_stats(net, partition))
    partition.stats["seconds"] = round(time.perf_counter() - t0, 3)
    return partition


def _infomap(net: Network, params: dict[str, Any], phase: Callable[[str], None]) -> Partition:
    import infomap

    phase(f"infomap: adding {net.n_links:,} links")
    network = infomap.Network()
    if net.n_links:
        network.add_links(np.column_stack([net.src, net.tgt, net.weight]))
    linked = np.zeros(net.n_nodes, bool)
    linked[net.src] = linked[net.tgt] = True
    if not linked.all():
        network.add_nodes(np.flatnonzero(~linked).tolist())
    phase(f"infomap: optimising ({params['trials']} trial(s), {params['flow_model']} flow)")
    result = infomap.run(network, options=infomap.Options(flow_model=params["flow_model"],
                                                          silent=True),
                         seed=params["seed"], num_trials=params["trials"],
                         two_level=params["two_level"], markov_time=params["markov_time"])
    paths: list[tuple[int, ...]] = [()] * net.n_nodes
    flow = np.zeros(net.n_nodes)
    for node in result.tree():
        if node.is_leaf:
            paths[node.node_id] = tuple(node.path[:-1])
            flow[node.node_id] = node.flow
    stats = {"codelength": result.codelength, "one_level_codelength": result.one_level_codelength,
             "codelength_savings": result.relative_codelength_savings}
    return Partition("infomap", paths, flow, params, stats)


def _ranked(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Relabel communities 1.. by decreasing flow (ties: smallest member first)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    total = np.bincount(inverse, weights=flow, minlength=len(uniq))
    first = np.full(len(uniq), len(labels))
    np.minimum.at(first, inverse, np.arange(len(labels)))
    order = np.lexsort((first, -total))
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(1, len(uniq) + 1)
    return rank[inverse]


def _leiden(net: Network, params: dict[str, Any], phase: Callable[[str], None]) -> Partition:
    import igraph as ig

    strength = (np.bincount(net.src, net.weight, net.n_nodes)
                + np.bincount(net.tgt, net.weight, net.n_nodes))
    flow = strength / strength.sum() if strength.sum() > 0 else np.full(net.n_nodes,
                                                                        1 / net.n_nodes)
    graph = net.igraph
    ig.set_random_number_generator(random.Random(params["seed"]))
    try:
        def split(members: np.ndarray) -> np.ndarray:
            sub = graph.induced_subgraph(members.tolist()) if len(members) < net.n_nodes \
                else graph
            found = sub.community_leiden(objective_function=params["objective"],
                                         weights="weight", resolution=params["resolution"],
                                         n_iterations=-1)
            return _ranked(np.asarray(found.membership), flow[members])

        phase(f"leiden: {net.n_links:,} links, {params['objective']}")
        paths: list[tuple[int, ...]] = [(int(m),) for m in split(np.arange(net.n_nodes))]
        for level in range(1, params["levels"]):
            phase(f"leiden: level {level + 1}")
            groups: dict[tuple[int, ...], list[int]] = {}
            for node, path in enumerate(paths):
                if len(path) == level:
                    groups.setdefault(path, []).append(node)
            for path, members in groups.items():
                if len(members) >= MIN_SPLIT:
                    sub = split(np.array(members))
                    if sub.max() > 1:
                        for node, m in zip(members, sub, strict=True):
                            paths[node] = (*path, int(m))
    finally:
        ig.set_random_number_generator(random)
    return Partition("leiden", paths, flow, params, {})


def partition_stats(net: Network, partition: Partition) -> dict[str, Any]:
    """What the comparison report shows for every method."""
    top = partition.top
    sizes = np.bincount(top)
    modularity = net.igraph.modularity((top - 1).tolist(), weights="weight",
                                       directed=True) if net.n_links else 0.0
    return {
        "nodes": net.n_nodes, "links": net.n_links,
        "top_modules": int((sizes > 0).sum()),
        "non_trivial_top_modules": int((sizes >= 3).sum()),
        "largest_share": float(sizes.max() / net.n_nodes),
        "levels": max(len(p) for p in partition.paths),
        "modularity": float(modularity),
    }
