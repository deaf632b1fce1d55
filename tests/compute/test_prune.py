"""Influence and pruning on hand-built graphs with known answers."""

import numpy as np

from circuit_atlas.compute.attribution import RawGraph, Targets
from circuit_atlas.compute.prune import influence, normalise, prune, threshold_value


def raw_graph(adjacency, n_candidates, n_tokens, probs):
    n = adjacency.shape[0]
    k = len(probs)
    return RawGraph(
        tokens=np.arange(n_tokens), targets=Targets(np.arange(k), np.asarray(probs, float)),
        layer=np.zeros(n, int), index=np.arange(n), position=np.zeros(n, int),
        activation=np.ones(n), relevance=np.zeros(n), adjacency=np.asarray(adjacency, float),
        read_values=np.zeros(n), n_candidates=n_candidates, n_remainders=0)


def test_influence_is_the_path_sum():
    rng = np.random.default_rng(0)
    n = 12
    a = np.tril(rng.normal(size=(n, n)), k=-1)  # a DAG: targets only read earlier nodes
    norm = normalise(a)
    w = np.zeros(n)
    w[-2:] = [0.7, 0.3]
    expected = w @ np.linalg.inv(np.eye(n) - norm) - w
    np.testing.assert_allclose(influence(norm, w), expected, rtol=1e-12, atol=1e-14)


def test_threshold_value():
    scores = np.array([0.1, 0.5, 0.3, 0.1])
    assert threshold_value(scores, 0.5) == 0.5
    assert threshold_value(scores, 0.8) == 0.3
    assert threshold_value(scores, 1.0) == 0.1
    assert threshold_value(np.zeros(3), 0.8) == np.inf


def test_weak_branch_is_pruned_strong_chain_kept():
    # nodes: n1, n2 (candidates), emb, logit; emb feeds both, the logit reads n1 strongly
    adj = np.zeros((4, 4))
    adj[0, 2] = 1.0  # emb -> n1
    adj[1, 2] = 1.0  # emb -> n2
    adj[3, 0] = 1.0  # n1 -> logit
    adj[3, 1] = 0.01  # n2 -> logit
    keep, edges, inf = prune(raw_graph(adj, 2, 1, [1.0]), 0.8, 0.98)
    assert keep.tolist() == [True, False, True, True]
    assert inf[0] > 0.98 and inf[1] < 0.01
    assert edges[3, 0] and edges[0, 2] and not edges[3, 1] and not edges[1, 2]


def test_no_pruning_at_full_thresholds():
    rng = np.random.default_rng(1)
    adj = np.zeros((7, 7))
    adj[:4, 4:6] = rng.normal(size=(4, 2))  # candidates read the two embeddings
    adj[6, :4] = rng.normal(size=4)  # the logit reads every candidate
    keep, edges, _ = prune(raw_graph(adj, 4, 2, [1.0]), 1.0, 1.0)
    assert keep.all() and (edges == (adj != 0)).all()


def test_neuron_without_a_path_to_the_logits_is_dropped():
    adj = np.zeros((4, 4))
    adj[0, 2] = 1.0  # emb -> n1 -> logit
    adj[3, 0] = 1.0
    adj[1, 2] = 5.0  # emb -> n2, which feeds nothing
    keep, _, inf = prune(raw_graph(adj, 2, 1, [1.0]), 1.0, 1.0)
    assert inf[1] == 0 and not keep[1] and keep[0]
