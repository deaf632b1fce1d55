"""Independent recomputations of a RelP graph's edges, shared by the test suite (tiny
float64 models on the CPU) and bench/gpu.py (the same checks on a GPU, in float32):
autograd through the linearised, MLP-frozen model evaluated forward. Written for any
device; every result comes back as numpy."""

from __future__ import annotations

import numpy as np
import torch

from circuit_atlas.compute.attribution import (
    AttributionParams,
    logit_read_vectors,
    neuron_read_vectors,
    relevance,
)
from circuit_atlas.compute.trace import forward


def target_rows(graph) -> np.ndarray:
    """The graph's rows that have incoming edges: candidates, then logits."""
    return np.concatenate([np.arange(graph.n_candidates),
                           np.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])


def write_vector(adapter, tr, layer, pos, n) -> torch.Tensor:
    """What neuron n adds to the residual at pos: a post-MLP norm (OLMo) scales it."""
    blk = adapter.blocks[layer]
    write = tr.act[layer][0, pos, n] * blk.down[:, n]
    if blk.mlp_post_norm is not None:
        write = write * tr.mlp_post_scale[layer][0, pos] * blk.mlp_post_norm
    return write


def linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec, emb, overrides
                 ) -> torch.Tensor:
    """Target reads of the linearised, MLP-frozen model, evaluated forward."""
    out = forward(adapter, ids, relp=True, embeddings=emb, frozen=tr, mlp_override=overrides)
    resid = [*out.resid_mid, out.final_resid]
    return torch.stack([rows_vec[r] @ resid[rows_layer[r]][0, rows_pos[r]]
                        for r in range(len(rows_layer))])


def setup_rows(adapter, ids, g, params: AttributionParams):
    """The frozen trace of prompt ``ids`` and, per target row of ``g``, its layer,
    position and read vector."""
    r = relevance(adapter, [ids], params)[0]
    tr, targets = r.trace, r.targets
    cand = np.stack([g.layer[:g.n_candidates], g.position[:g.n_candidates],
                     g.index[:g.n_candidates]], 1)
    L, T = adapter.n_layers, ids.shape[1]
    rows_layer = np.concatenate([cand[:, 0], np.full(g.n_logits, L)])
    rows_pos = np.concatenate([cand[:, 1], np.full(g.n_logits, T - 1)])
    final = tr.final_resid[0, -1] * tr.final_scale[0, -1] * adapter.final_norm
    rows_vec = torch.cat([neuron_read_vectors(adapter, tr, cand),
                          logit_read_vectors(adapter, targets.tokens, final)
                          * tr.final_scale[0, -1] * adapter.final_norm])
    return tr, cand, rows_layer, rows_pos, rows_vec


def numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def autograd_edges(adapter, ids, g, params: AttributionParams, rows=None):
    """The edges into target rows ``rows`` (indices into ``target_rows(g)``; default
    all) recomputed by autograd: (reads of every target, evaluated forward; expected
    adjacency rows; what the targets read at zero input, the constants' share)."""
    tr, cand, rows_layer, rows_pos, rows_vec = setup_rows(adapter, ids, g, params)
    targets = target_rows(g)
    rows = range(len(targets)) if rows is None else rows
    emb = adapter.embed_tokens(ids).clone().requires_grad_(True)
    overrides = [m.clone().requires_grad_(True) for m in tr.mlp_out]
    L, T, C = adapter.n_layers, ids.shape[1], g.n_candidates
    writes = torch.stack([write_vector(adapter, tr, layer, pos, n) for layer, pos, n in cand]
                         ) if C else None
    expected = np.zeros((len(rows), g.n_nodes))
    with torch.enable_grad():
        reads = linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec, emb, overrides)
        for i, r in enumerate(rows):
            grads = torch.autograd.grad(reads[r], [*overrides, emb], retain_graph=True)
            if C:
                at = torch.stack([grads[layer][0, pos] for layer, pos, _ in cand])
                expected[i, :C] = numpy((at * writes).sum(-1))
            total = numpy(torch.stack([(grads[layer][0] * tr.mlp_out[layer][0]).sum(-1)
                                       for layer in range(L)]))
            np.subtract.at(total, (cand[:, 0], cand[:, 1]), expected[i, :C])
            expected[i, C:C + L * T] = total.ravel()
            expected[i, g.embeddings] = numpy((grads[-1][0] * emb[0]).sum(-1))
            # the linearised model is affine: what is left at zero input is the constants'
            expected[i, g.constants] = g.adjacency[targets[r], g.constants]
        zero = [torch.zeros_like(m) for m in tr.mlp_out]
        at_zero = linear_reads(adapter, ids, tr, rows_layer, rows_pos, rows_vec,
                               torch.zeros_like(emb), zero)
    return numpy(reads), expected, numpy(at_zero)
