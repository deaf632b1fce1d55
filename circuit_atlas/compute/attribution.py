"""RelP attribution graphs over MLP neurons, in circuit-tracer's batched form.

Phases, per prompt (each logged with its time):

1. **Forward** once (:func:`trace.forward` with the RelP rules), recording
   activations, norm scales and attention patterns.
2. **Logit targets**: the most likely next tokens at the last position until their
   probability reaches ``logit_prob`` (at most ``max_logits``). A logit's read
   vector is its unembedding row minus the mean row.
3. **Relevance**: one backward from the probability-weighted logit reads through
   the linearised model gives every neuron's relevance ``h * dObjective/dh``.
   The candidates are the ``candidates`` neurons of largest |relevance|.
4. **Edges**: a batched *replay* of the linearised model's transpose with every
   MLP frozen. Each batch row carries the read vector of one target (a candidate
   neuron, read at its post-norm MLP input as
   ``0.5*sigmoid(g)*u*W_gate[n] + 0.5*SiLU(g)*W_up[n]``, or a logit) down through
   the attention value/output maps (patterns and norm scales are constants) and
   is contracted, at each layer, with the write vectors ``h_s * W_down[:, s]`` of
   the candidate sources. What the other neurons of a (layer, position) write is
   one *remainder* node; embeddings get the exact Jacobian (the row's gradient at
   the input dotted with the token embedding). So a target's incoming edges sum
   to its read value exactly (completeness). Where attention has biases, what
   they add at a position is one *constant* node (layer -1, index -1), so
   completeness holds for those models too.

Several prompts share phases 1-3: they go through one forward and one backward,
right-padded to the longest (causal attention: no real position sees the padding).

Reference: RelP, arXiv 2508.21258; circuit-tracer's ``attribute`` and ``graph``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from circuit_atlas.compute.adapters import Adapter
from circuit_atlas.compute.params import AttributionParams
from circuit_atlas.compute.trace import Trace, at, forward, neuron_writes, scaled

log = logging.getLogger(__name__)


@dataclass
class Targets:
    tokens: np.ndarray  # (K,) logit token ids
    probs: np.ndarray  # (K,)


@dataclass
class RawGraph:
    """A complete (unpruned) attribution graph of one prompt.

    Node order: candidates (sorted by layer, position, neuron), then the remainder
    of each (layer, position), then embeddings by position, then the constants by
    position (models with attention biases only), then logits. The adjacency is
    ``adjacency[target, source]``; only candidates and logits have incoming edges.
    """

    tokens: np.ndarray  # (T,)
    targets: Targets
    layer: np.ndarray  # (n_nodes,) int
    index: np.ndarray  # neuron or token id; -1 for remainders
    position: np.ndarray
    activation: np.ndarray
    relevance: np.ndarray
    adjacency: np.ndarray  # (n_nodes, n_nodes)
    read_values: np.ndarray  # (n_nodes,) a target's read; 0 for pure sources
    n_candidates: int
    n_remainders: int
    n_constants: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.layer)

    @property
    def first_input(self) -> int:
        """Index of the first embedding node: inputs (embeddings, constants) and
        logits follow."""
        return self.n_candidates + self.n_remainders

    @property
    def embeddings(self) -> slice:
        start = self.first_input
        return slice(start, start + len(self.tokens))

    @property
    def constants(self) -> slice:
        start = self.embeddings.stop
        return slice(start, start + self.n_constants)

    @property
    def n_logits(self) -> int:
        return len(self.targets.tokens)


def logit_targets(probs: torch.Tensor, max_logits: int, logit_prob: float) -> Targets:
    """The most likely tokens until their probability reaches ``logit_prob``."""
    # no more than max_logits can be taken: the top ones, not a sort of the vocabulary
    p, idx = probs.topk(min(max_logits, len(probs)))
    k = int(torch.searchsorted(p.cumsum(0), torch.tensor(logit_prob, dtype=p.dtype))) + 1
    k = max(1, min(k, max_logits, len(p)))
    return Targets(idx[:k].cpu().numpy(), p[:k].detach().double().cpu().numpy())


def logit_read_vectors(a: Adapter, tokens: np.ndarray, final: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Unembedding rows minus the mean row: what a logit target reads (K, d). Under a
    final soft-cap (Gemma-2) each row v is scaled by cap(z_v) / z_v at the final normed
    residual ``final`` (d,), a constant under the identity rule, so that the read is the
    capped logit minus the mean capped logit."""
    ids = torch.as_tensor(tokens, device=a.device)
    if a.final_softcap is None:
        return a.unembed[ids] - a.unembed_mean
    if final is None:
        raise ValueError("a soft-capped model's logit reads need the final residual")
    ratio = a.cap_ratio(final.detach() @ a.unembed.T)  # (V,)
    return ratio[ids, None] * a.unembed[ids] - (ratio @ a.unembed) / len(ratio)


@dataclass
class Relevance:
    """Phases 1-3 of one prompt: its trace, logit targets and input relevances."""

    trace: Trace  # of this prompt alone, (1, T, ...)
    targets: Targets
    neurons: list[torch.Tensor]  # per layer (T, N): h * dObjective/dh
    embeddings: torch.Tensor  # (T,)
    constants: torch.Tensor | None  # (T,) what attention biases add, where there are any


def attention_constants(a: Adapter, tr: Trace, layer: int, b: int = 0) -> torch.Tensor | None:
    """What layer's attention biases add to the residual of prompt ``b``: (T, d), or
    None where the layer has no bias."""
    blk = a.blocks[layer]
    if blk.attn_constant is None:
        return None
    out = scaled(blk.attn_constant, at(tr.attn_post_scale[layer], b), blk.attn_post_norm)
    return out.expand(tr.tokens.shape[1], a.d_model)


def relevance(a: Adapter, prompts: list[torch.Tensor], params: AttributionParams
              ) -> list[Relevance]:
    """Phases 1-3 for prompts of shape (1, T_b), in one forward and one backward."""
    lengths = [int(p.shape[1]) for p in prompts]
    B, T = len(prompts), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long, device=a.device)
    for b, p in enumerate(prompts):
        tokens[b, :lengths[b]] = p[0]
    last = torch.as_tensor(lengths, device=a.device) - 1
    rows = torch.arange(B, device=a.device)
    emb = a.embed_tokens(tokens).detach().requires_grad_(True)
    with torch.enable_grad():
        tr = forward(a, tokens, relp=True, embeddings=emb)
        final = tr.final_resid[rows, last] * tr.final_scale[rows, last] * a.final_norm
        probs = a.cap_logits(final @ a.unembed.T).softmax(-1)  # (B, V)
        targets = [logit_targets(probs[b].detach(), params.max_logits, params.logit_prob)
                   for b in range(B)]
        # prompts are independent in the batch: the gradient of the sum is each one's own
        objective = sum((torch.as_tensor(t.probs, dtype=final.dtype, device=a.device)
                         * (logit_read_vectors(a, t.tokens, final[b]) @ final[b])).sum()
                        for b, t in enumerate(targets))
        wrt = [*tr.act, emb, *(tr.attn_out if a.constants else [])]
        grads = torch.autograd.grad(objective, wrt)
    L = a.n_layers
    rel = [(h * g).detach() for h, g in zip(tr.act, grads[:L], strict=True)]
    emb_rel = (emb * grads[L]).sum(-1).detach()
    tr = tr.detached()
    out = []
    for b, n in enumerate(lengths):
        const = None
        if a.constants:
            const = torch.zeros(n, dtype=a.dtype, device=a.device)
            for layer in range(L):
                c = attention_constants(a, tr, layer, b)
                if c is not None:
                    const += (grads[L + 1 + layer][b, :n] * c[:n]).sum(-1)
        out.append(Relevance(tr.select(b, n), targets[b], [r[b, :n] for r in rel],
                             emb_rel[b, :n], const))
    return out


def select_candidates(rel: list[torch.Tensor], n: int, last_positions: int | None
                      ) -> np.ndarray:
    """(C, 3) array of (layer, position, neuron), sorted, of the top-|relevance| neurons."""
    stacked = torch.stack(rel).abs()  # (L, T, N)
    if last_positions is not None and last_positions < stacked.shape[1]:
        stacked[:, : stacked.shape[1] - last_positions] = -1
    flat = stacked.flatten()
    k = min(n, int((flat > 0).sum()))
    top = flat.topk(k).indices.cpu().numpy() if k else np.zeros(0, np.int64)
    L, T, N = stacked.shape
    cand = np.stack(np.unravel_index(top, (L, T, N)), axis=1).astype(np.int64)
    return cand[np.lexsort((cand[:, 2], cand[:, 1], cand[:, 0]))] if k else cand.reshape(0, 3)


def neuron_read_vectors(a: Adapter, tr: Trace, cand: np.ndarray) -> torch.Tensor:
    """What each candidate reads from the residual stream entering its MLP (C, d).

    The RelP linearisation of h = act(g) * u in the post-norm input x is
    ``(0.5*(act(g)/g)*u*W_gate[n] + 0.5*act(g)*W_up[n]) . x`` (for SiLU, act(g)/g is
    sigmoid(g)); the frozen norm turns that into a vector on the residual stream.
    """
    out = torch.zeros(len(cand), a.d_model, dtype=a.dtype, device=a.device)
    for layer in np.unique(cand[:, 0]):
        idx = np.flatnonzero(cand[:, 0] == layer)
        pos, n, blk = cand[idx, 1], cand[idx, 2], a.blocks[layer]
        g, u = tr.gate[layer][0, pos, n, None], tr.up[layer][0, pos, n, None]
        vec = (0.5 * a.activation_ratio(g) * u * blk.gate[n]
               + 0.5 * a.activation(g) * blk.up[n])
        out[idx] = scaled(vec, at(tr.mlp_scale[layer], 0, pos), blk.mlp_norm)
    return out


def replay_edges(a: Adapter, tr: Trace, cand: np.ndarray, rows_layer: np.ndarray,
                 rows_pos: np.ndarray, rows_vec: torch.Tensor, batch_rows: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Phase 4: incoming edges of each target row, by the linearised transpose.

    Rows are targets injected at the residual stream entering their layer's MLP
    (``rows_layer = n_layers`` for logits, at the last block's output). Returns
    (R, C) candidate-source edges, (R, L, T) remainder edges, (R, T) embedding edges
    and (R, T) constant edges (zero for models without attention biases).
    """
    L, T = a.n_layers, tr.tokens.shape[1]
    R, C = len(rows_layer), len(cand)
    cand_w = np.zeros((R, C), np.float64)
    rem_w = np.zeros((R, L, T), np.float64)
    emb_w = np.zeros((R, T), np.float64)
    const_w = np.zeros((R, T), np.float64)
    by_layer = [np.flatnonzero(cand[:, 0] == layer) for layer in range(L)]
    constants = [attention_constants(a, tr, layer) for layer in range(L)]
    order = np.argsort(-rows_layer, kind="stable")  # deepest targets first
    embed = a.embed_tokens(tr.tokens[0])  # (T, d)
    for start in range(0, R, batch_rows):
        rows = order[start:start + batch_rows]
        depth = rows_layer[rows]  # non-increasing
        vec = rows_vec[torch.as_tensor(rows, device=a.device)]
        G = torch.zeros(len(rows), T, a.d_model, dtype=a.dtype, device=a.device)
        const = torch.zeros(len(rows), T, dtype=a.dtype, device=a.device)
        top = np.flatnonzero(depth == L)
        G[top, rows_pos[rows][top]] = vec[top]
        for layer in range(L - 1, -1, -1):
            # rows are sorted deepest first, so the rows that read this layer's MLP
            # output, and those whose replay has started, are prefixes
            n_src = int((depth > layer).sum())
            n_act = int((depth >= layer).sum())
            if n_act == 0:
                continue
            if n_src:
                g = G[:n_src]
                idx = by_layer[layer]
                total = torch.einsum("rtd,td->rt", g, tr.mlp_out[layer][0])
                if len(idx):
                    lp, ln = cand[idx, 1], cand[idx, 2]
                    write = neuron_writes(a.blocks[layer], tr.act[layer][0, lp, ln], ln,
                                          at(tr.mlp_post_scale[layer], 0, lp))
                    w = torch.einsum("rcd,cd->rc", g[:, lp], write)
                    per_pos = torch.zeros_like(total).index_add_(
                        1, torch.as_tensor(lp, device=a.device), w)
                    total = total - per_pos
                    cand_w[rows[:n_src, None], idx[None, :]] = w.double().cpu().numpy()
                rem_w[rows[:n_src], layer] = total.double().cpu().numpy()
            here = np.flatnonzero(depth == layer)
            if len(here):
                G[here, rows_pos[rows][here]] += vec[here]
            if constants[layer] is not None:
                const[:n_act] += torch.einsum("rtd,td->rt", G[:n_act], constants[layer])
            G[:n_act] += _attention_transpose(a, tr, layer, G[:n_act])
        emb_w[rows] = torch.einsum("rtd,td->rt", G, embed).double().cpu().numpy()
        const_w[rows] = const.double().cpu().numpy()
    return cand_w, rem_w, emb_w, const_w


def _attention_transpose(a: Adapter, tr: Trace, layer: int, G: torch.Tensor) -> torch.Tensor:
    """d(what attention adds)/d(residual input) transposed, applied to G (R, T, d)."""
    blk = a.blocks[layer]
    R, T, _ = G.shape
    G = scaled(G, at(tr.attn_post_scale[layer], 0), blk.attn_post_norm)
    gz = (G @ blk.o).view(R, T, a.n_heads, a.head_dim).transpose(1, 2)  # (R, H, T, dh)
    gv = tr.pattern[layer][0].transpose(-1, -2) @ gz  # (R, H, T, dh)
    gv = gv.view(R, a.n_kv_heads, a.n_heads // a.n_kv_heads, T, a.head_dim).sum(2)
    gxn = gv.transpose(1, 2).reshape(R, T, a.n_kv_heads * a.head_dim) @ blk.v
    return scaled(gxn, at(tr.attn_scale[layer], 0), blk.attn_norm)


def attribute(a: Adapter, tokens: torch.Tensor, params: AttributionParams,
              batch_rows: int = 256) -> RawGraph:
    """The complete RelP graph of one prompt, ``tokens`` of shape (1, T)."""
    return attribute_batch(a, [tokens], params, batch_rows)[0]


def attribute_batch(a: Adapter, prompts: list[torch.Tensor], params: AttributionParams,
                    batch_rows: int = 256) -> list[RawGraph]:
    """The complete RelP graphs of prompts of shape (1, T_b), phases 1-3 shared."""
    t0 = time.perf_counter()
    with torch.no_grad():
        rels = relevance(a, prompts, params)
    shared = (time.perf_counter() - t0) / len(prompts)
    return [_graph(a, r, params, batch_rows, {"forward+relevance": shared}) for r in rels]


@torch.no_grad()
def _graph(a: Adapter, r: Relevance, params: AttributionParams, batch_rows: int,
           timings: dict[str, float]) -> RawGraph:
    """Phases 3 (candidates) and 4 (edges) of one prompt."""
    tr, targets, rel = r.trace, r.targets, r.neurons
    tokens = tr.tokens
    cand = select_candidates(rel, params.candidates, params.last_positions)
    L, T, C, K = a.n_layers, tokens.shape[1], len(cand), len(targets.tokens)
    t1 = time.perf_counter()
    rows_layer = np.concatenate([cand[:, 0], np.full(K, L)])
    rows_pos = np.concatenate([cand[:, 1], np.full(K, T - 1)])
    final = tr.final_resid[0, -1] * tr.final_scale[0, -1] * a.final_norm
    logit_vec = logit_read_vectors(a, targets.tokens, final)
    rows_vec = torch.cat([
        neuron_read_vectors(a, tr, cand),
        logit_vec * tr.final_scale[0, -1] * a.final_norm,
    ])
    cand_w, rem_w, emb_w, const_w = replay_edges(a, tr, cand, rows_layer, rows_pos, rows_vec,
                                                 batch_rows)
    timings["edges"] = time.perf_counter() - t1
    logit_reads = (logit_vec @ final).double().cpu().numpy()
    n_const = T if r.constants is not None else 0
    n = C + L * T + T + n_const + K
    adjacency = np.zeros((n, n), np.float64)
    rows_idx = np.concatenate([np.arange(C), np.arange(n - K, n)])
    adjacency[rows_idx, :C] = cand_w
    adjacency[rows_idx, C:C + L * T] = rem_w.reshape(len(rows_idx), L * T)
    adjacency[rows_idx, C + L * T:C + L * T + T] = emb_w
    if n_const:
        adjacency[rows_idx, C + L * T + T:n - K] = const_w
    at = tuple(torch.as_tensor(cand[:, j], device=a.device) for j in range(3))
    act = torch.stack(tr.act)[at[0], 0, at[1], at[2]].double().cpu().numpy()  # one gather
    rel_c = torch.stack(rel)[at].double().cpu().numpy()
    rem_layer, rem_pos = np.divmod(np.arange(L * T), T)
    read_values = np.zeros(n)
    read_values[:C] = act
    read_values[n - K:] = logit_reads
    rem_rel = torch.stack(rel).sum(-1).flatten().double().cpu().numpy() - np.bincount(
        cand[:, 0] * T + cand[:, 1], weights=rel_c, minlength=L * T)
    ids = tokens[0].cpu().numpy()
    inputs = np.arange(T)
    const_pos = inputs[:n_const]
    const_rel = r.constants.double().cpu().numpy() if n_const else np.zeros(0)
    return RawGraph(
        tokens=ids,
        targets=targets,
        layer=np.concatenate([cand[:, 0], rem_layer, np.full(T + n_const, -1), np.full(K, L)]),
        index=np.concatenate([cand[:, 2], np.full(L * T, -1), ids, np.full(n_const, -1),
                              targets.tokens]),
        position=np.concatenate([cand[:, 1], rem_pos, inputs, const_pos, np.full(K, T - 1)]),
        activation=np.concatenate([act, np.zeros(L * T), np.ones(T + n_const), targets.probs]),
        relevance=np.concatenate([rel_c, rem_rel, r.embeddings.double().cpu().numpy(),
                                  const_rel, targets.probs * logit_reads]),
        adjacency=adjacency,
        read_values=read_values,
        n_candidates=C,
        n_remainders=L * T,
        n_constants=n_const,
        timings=timings,
    )
