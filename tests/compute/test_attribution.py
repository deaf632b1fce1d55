"""RelP graphs are checked against independent computations on tiny float64 models of
every supported family (pre- and post-norm, q/k norms, attention biases, sliding
windows): the model's own forward, autograd through the linearised model, and
interventions."""

import dataclasses

import numpy as np
import pytest
import torch

from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.attribution import (
    AttributionParams,
    attribute,
    attribute_batch,
    logit_read_vectors,
    relevance,
)
from circuit_atlas.compute.trace import forward
from tests.factories import tiny_llama
from tests.oracles import autograd_edges, linear_reads, setup_rows, target_rows, write_vector

PARAMS = AttributionParams(candidates=40, max_logits=4, logit_prob=0.9, prune=False)


FAMILIES = ["llama", "qwen3", "qwen2", "mistral", "olmo2", "olmo3", "gemma2", "gemma3_text"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return adapter_for(tiny_llama(seed=1, family=request.param))


def tokens(seed=0, T=7, vocab=64):
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def test_forward_matches_the_model(adapter):
    ids = tokens()
    ref = adapter.model(ids).logits
    for relp in (False, True):
        tr = forward(adapter, ids, relp=relp)
        # HF's RMSNorm computes in float32 even for a float64 model, hence not 1e-12
        torch.testing.assert_close(tr.logits(adapter, slice(None)), ref, atol=1e-6, rtol=1e-6)


def _without_offset(blk):
    """A Gemma block whose norms apply w instead of 1 + w."""
    return dataclasses.replace(blk, **{k: getattr(blk, k) - 1 for k in (
        "attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")})


GEMMA_MUTATIONS = {
    "no post-feedforward norm": lambda a: dataclasses.replace(
        a, blocks=[dataclasses.replace(b, mlp_post_norm=None) for b in a.blocks]),
    "norm weights w, not 1 + w": lambda a: dataclasses.replace(
        a, blocks=[_without_offset(b) for b in a.blocks], final_norm=a.final_norm - 1),
    "no embedding scale": lambda a: dataclasses.replace(a, embed_scale=1.0),
    "queries scaled by 1/sqrt(head_dim)": lambda a: dataclasses.replace(a, attn_scale=None),
    "no attention soft-cap": lambda a: dataclasses.replace(a, attn_softcap=None),
    "no final soft-cap": lambda a: dataclasses.replace(a, final_softcap=None),
}


@pytest.mark.parametrize(("family", "mutation"), [
    (f, m) for f in ("gemma2", "gemma3_text") for m in sorted(GEMMA_MUTATIONS)
    if f == "gemma2" or not m.endswith("soft-cap")])  # Gemma-3 has no soft-caps
def test_each_gemma_part_is_needed_for_the_logits(family, mutation):
    """Leaving out any one of Gemma's parts breaks the forward = HF logits check that
    the whole adapter passes."""
    model = tiny_llama(seed=1, family=family)
    adapter = adapter_for(model)
    ids = tokens()
    ref = model(ids).logits
    torch.testing.assert_close(forward(adapter, ids).logits(adapter, slice(None)), ref,
                               atol=1e-6, rtol=1e-6)
    broken = GEMMA_MUTATIONS[mutation](adapter)
    wrong = forward(broken, ids).logits(broken, slice(None))
    assert float((wrong - ref).abs().max()) > 1e-2 * float(ref.abs().max()), mutation


def test_completeness(adapter):
    g = attribute(adapter, tokens(), PARAMS)
    assert g.n_candidates == 40 and g.n_logits >= 1
    rows = target_rows(g)
    incoming = g.adjacency[rows].sum(1)
    np.testing.assert_allclose(incoming, g.read_values[rows], rtol=1e-6, atol=1e-9)
    # sources only: remainders and embeddings have no incoming edges; no edge goes upward
    assert not g.adjacency[g.n_candidates:g.n_nodes - g.n_logits].any()
    src, tgt = np.nonzero(g.adjacency.T)
    assert (g.layer[src] < g.layer[tgt]).all()
    assert (g.position[src] <= g.position[tgt]).all()  # causal


def test_edges_equal_the_jacobian_of_the_linearised_model(adapter):
    """All edges of all targets against autograd through the forward evaluation."""
    ids = tokens(seed=3)
    g = attribute(adapter, ids, PARAMS)
    reads, expected, at_zero = autograd_edges(adapter, ids, g, PARAMS)
    rows = target_rows(g)
    np.testing.assert_allclose(reads, g.read_values[rows], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g.adjacency[rows], expected, rtol=1e-7, atol=1e-10)
    constant = g.adjacency[rows][:, g.constants].sum(1)
    np.testing.assert_allclose(constant, at_zero, rtol=1e-7, atol=1e-10)
    assert (g.n_constants > 0) == (adapter.family == "qwen2")


def test_edges_are_effects_of_interventions(adapter):
    """Removing a source's write (patterns, norm scales, other MLPs frozen) changes the
    target's read by exactly the edge weight."""
    ids = tokens(seed=5)
    g = attribute(adapter, ids, PARAMS)
    tr, cand, rows_layer, rows_pos, rows_vec = setup_rows(adapter, ids, g, PARAMS)
    rows = target_rows(g)
    base = linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec, None, tr.mlp_out)
    rng = np.random.default_rng(0)
    checked = 0
    for c in rng.permutation(g.n_candidates)[:10]:
        layer, pos, n = cand[c]
        overrides = [m.clone() for m in tr.mlp_out]
        overrides[layer][0, pos] -= write_vector(adapter, tr, layer, pos, n)
        after = linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec, None, overrides)
        np.testing.assert_allclose((base - after).numpy(), g.adjacency[rows, c],
                                   rtol=1e-7, atol=1e-10)
        checked += int((np.abs(g.adjacency[rows, c]) > 1e-6).sum())
    assert checked > 0, "the sampled sources had no nonzero edges"
    # zeroing one token's embedding removes exactly that embedding's edges
    e = g.embeddings.start + 2
    emb = adapter.embed_tokens(ids).clone()
    emb[0, 2] = 0
    after = linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec, emb, tr.mlp_out)
    np.testing.assert_allclose((base - after).numpy(), g.adjacency[rows, e], rtol=1e-7,
                               atol=1e-10)


def test_relevance_is_conserved_and_matches_closed_form(adapter):
    ids = tokens(seed=7)
    r = relevance(adapter, [ids], PARAMS)[0]
    tr, targets, rel = r.trace, r.targets, r.neurons
    final = tr.final_resid[0, -1] * tr.final_scale[0, -1] * adapter.final_norm
    reads = logit_read_vectors(adapter, targets.tokens, final) @ final
    objective = float((torch.as_tensor(targets.probs, dtype=reads.dtype) * reads).sum())
    # the linearised model is linear in the embeddings and constants: their relevance
    # sums to the objective
    inputs = float(r.embeddings.sum()) + (0 if r.constants is None else float(r.constants.sum()))
    assert inputs == pytest.approx(objective, rel=1e-9)
    # last-layer neurons reach the logits only through the frozen final norm
    last = adapter.n_layers - 1
    direction = (torch.as_tensor(targets.probs)
                 @ logit_read_vectors(adapter, targets.tokens, final))
    direction = direction * tr.final_scale[0, -1] * adapter.final_norm
    blk = adapter.blocks[last]
    if blk.mlp_post_norm is not None:
        direction = direction * tr.mlp_post_scale[last][0, -1] * blk.mlp_post_norm
    grad_h = direction @ blk.down  # (N,)
    expected = tr.act[last][0, -1] * grad_h
    torch.testing.assert_close(rel[last][-1], expected, rtol=1e-9, atol=1e-12)


def test_batching_and_determinism(adapter):
    ids = tokens(seed=9)
    a = attribute(adapter, ids, PARAMS, batch_rows=256)
    b = attribute(adapter, ids, PARAMS, batch_rows=7)
    c = attribute(adapter, ids, PARAMS, batch_rows=256)
    np.testing.assert_allclose(a.adjacency, b.adjacency, rtol=1e-10, atol=1e-13)
    assert np.array_equal(a.adjacency, c.adjacency) and np.array_equal(a.index, c.index)


def test_prompts_sharing_a_batch_give_the_graphs_of_one_at_a_time(adapter):
    prompts = [tokens(seed=20, T=7), tokens(seed=21, T=4), tokens(seed=22, T=9)]
    together = attribute_batch(adapter, prompts, PARAMS)
    for ids, g in zip(prompts, together, strict=True):
        alone = attribute(adapter, ids, PARAMS)
        assert np.array_equal(g.index, alone.index) and np.array_equal(g.tokens, ids[0])
        np.testing.assert_allclose(g.adjacency, alone.adjacency, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g.relevance, alone.relevance, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g.targets.probs, alone.targets.probs, rtol=1e-12)


def test_last_positions_restricts_candidates(adapter):
    ids = tokens(seed=2, T=9)
    params = AttributionParams(candidates=30, max_logits=3, last_positions=2, prune=False)
    g = attribute(adapter, ids, params)
    assert (g.position[:g.n_candidates] >= 7).all()


def test_relevance_obeys_the_chain_rule_over_the_graph(adapter):
    """With every neuron a candidate, relevance (autograd through the linearised model,
    MLPs included) must equal the top-down chain rule over the graph's direct edges:
    R_t = sum_u A[u, t] * g_u, with g_u = R_u / h_u for neurons and p_k for logits.
    The edges carry the half-rule read vectors, so dropping the half rule from the
    relevance pass breaks this."""
    ids = tokens(seed=11, T=5)
    n_all = adapter.n_layers * ids.shape[1] * adapter.n_neurons
    g = attribute(adapter, ids, AttributionParams(candidates=n_all, max_logits=3,
                                                  prune=False))
    # all neurons but the last layer's before the last position (no path to the logits;
    # sliding windows cut more paths)
    if all(b.window is None for b in adapter.blocks):
        assert g.n_candidates == n_all - (ids.shape[1] - 1) * adapter.n_neurons
    C, K = g.n_candidates, g.n_logits
    grad = np.zeros(g.n_nodes)
    grad[g.n_nodes - K:] = g.targets.probs
    expected = np.zeros(g.n_nodes)
    for layer in range(adapter.n_layers - 1, -1, -1):
        nodes = np.flatnonzero(g.layer[:C] == layer)
        expected[nodes] = g.adjacency[:, nodes].T @ grad
        grad[nodes] = expected[nodes] / g.activation[nodes]
    emb = np.arange(g.first_input, g.n_nodes - K)  # embeddings and constants
    expected[emb] = g.adjacency[:, emb].T @ grad
    np.testing.assert_allclose(g.relevance[:C], expected[:C], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(g.relevance[emb], expected[emb], rtol=1e-6, atol=1e-10)
