"""The causal battery's core: neurons and whole circuits ablated, boosted and patched,
many interventions per pass.

An intervention rewrites the activations ``h = SiLU(gate) * up`` of a unit's neurons
where the model passes them to ``down_proj``, at every position or the last only:
``h' = mult * h + add`` (zero ablation: 0 * h + 0; mean ablation: 0 * h + mean;
boost: k * h; set: 0 * h + value; patch: 0 * h + the counterfactual prompt's
activation at the same position). Everything downstream is recomputed: norms,
attention, the later layers' own activations (a unit's later members are rewritten
as the pass reaches them, so a circuit is clamped as a whole).

One pass per prompt and batch of interventions, on the clean pass's cache: a row
that first edits layer l starts from the clean residual entering l's MLP and runs
layers l.. only; only the positions from the first edited one on are rerun (causal
attention: nothing before it changes), against the clean keys and values of the
positions before. An intervention at the last position costs ``L - l`` one-position
layer passes, at every position ``(L - l) * T`` where a forward costs ``L * T``, and
a batch of rows shares every matmul (``python bench/interventions.py``).

The measures (:func:`measures`) read the last position's next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from circuit_atlas.compute.adapters import Adapter
from circuit_atlas.compute.effects import final_logits
from circuit_atlas.compute.trace import (
    attention_output,
    attention_pattern,
    causal_mask,
    forward,
    normed,
    qkv,
)

MOVED = 5  # tokens raised most and lowered most, per measure row
PREDICTED = 10  # tokens a unit's output projection predicts, for sufficiency


@dataclass
class Clean:
    """One prompt's clean pass, as much as an intervened rerun needs."""

    tokens: torch.Tensor  # (1, T)
    resid_mid: list[torch.Tensor]  # per layer: (T, d) residual entering the MLP
    act: list[torch.Tensor]  # per layer: (T, N) activations
    keys: list[torch.Tensor]  # per layer: (KV, T, dh), normed and rotated
    values: list[torch.Tensor]
    rotary: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, T, dh) each
    final_resid: torch.Tensor  # (d,) last position, before the final norm
    logits: torch.Tensor  # (V,) last position

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


@torch.no_grad()
def clean_pass(adapter: Adapter, tokens: torch.Tensor) -> Clean:
    """The clean pass of ``tokens`` (1, T)."""
    a = adapter
    trace = forward(a, tokens)
    T = tokens.shape[1]
    x0 = a.embed_tokens(tokens)
    rotary = a.rotary(x0, torch.arange(T, device=tokens.device).unsqueeze(0))
    keys, values = [], []
    for i, blk in enumerate(a.blocks):
        x = x0 if i == 0 else trace.resid_mid[i - 1] + trace.mlp_out[i - 1]
        _, k, v = qkv(a, blk, normed(a, x, blk.attn_norm), *rotary[i])
        keys.append(k[0])
        values.append(v[0])
    return Clean(tokens=tokens, resid_mid=[r[0] for r in trace.resid_mid],
                 act=[h[0] for h in trace.act], keys=keys, values=values, rotary=rotary,
                 final_resid=trace.final_resid[0, -1], logits=trace.logits(a)[0])


@dataclass
class Edits:
    """B intervened runs of one prompt: edit e rewrites neuron ``neuron[e]`` of layer
    ``layer[e]`` in row ``row[e]`` to ``mult[e] * h + add[e, t]`` at the positions t
    where ``where[e, t]``."""

    row: np.ndarray  # (E,)
    layer: np.ndarray  # (E,)
    neuron: np.ndarray  # (E,)
    mult: torch.Tensor  # (E,)
    add: torch.Tensor  # (E, T)
    where: torch.Tensor  # (E, T) bool
    rows: int

    def first_layers(self) -> np.ndarray:
        """The first layer each row edits."""
        first = np.full(self.rows, np.iinfo(np.int64).max)
        np.minimum.at(first, self.row, self.layer)
        return first

    def start(self) -> int:
        """The first position any row edits."""
        cols = torch.nonzero(self.where.any(0))
        return int(cols[0]) if len(cols) else self.where.shape[1]


def edited_values(h: torch.Tensor, mult: torch.Tensor, add: torch.Tensor,
                  where: torch.Tensor) -> torch.Tensor:
    """``mult * h + add`` where ``where``, else ``h`` (all (E, T) but mult (E,))."""
    return torch.where(where, mult[:, None] * h + add, h)


@torch.no_grad()
def rerun(adapter: Adapter, clean: Clean, edits: Edits,
          watch: dict[int, np.ndarray] | None = None
          ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Last-position logits (B, V) of every row, and the activations (B, T', k) of the
    ``watch`` neurons ({layer: indices}) at the rerun positions (the last T' of the
    prompt) as each row's pass computed them (after its edits)."""
    a, T = adapter, clean.length
    first = edits.first_layers()
    if (first > a.n_layers).any():
        raise ValueError("every row needs at least one edit")
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = first[order]
    p0 = edits.start()
    if p0 >= T:  # nothing is edited anywhere
        p0 = T - 1
    watch = watch or {}
    by_layer = {int(j): np.flatnonzero(edits.layer == j) for j in np.unique(edits.layer)}
    entered = np.searchsorted(first, np.arange(a.n_layers), side="right")  # rows with first <= j
    B, d = edits.rows, a.d_model
    x = torch.empty(B, T - p0, d, dtype=clean.logits.dtype, device=clean.logits.device)
    seen: dict[int, torch.Tensor] = {}
    done = 0  # rows running since an earlier layer
    for j in range(int(first[0]), a.n_layers):
        blk, n = a.blocks[j], int(entered[j])
        if done:
            xa = x[:done]
            cos, sin = clean.rotary[j]
            q, k, v = qkv(a, blk, normed(a, xa, blk.attn_norm), cos[:, p0:], sin[:, p0:])
            keys = torch.cat([clean.keys[j][None, :, :p0].expand(done, -1, -1, -1), k], 2)
            vals = torch.cat([clean.values[j][None, :, :p0].expand(done, -1, -1, -1), v], 2)
            mask = causal_mask(T, blk.window, x.device)[p0:]
            attn = attention_output(a, blk, attention_pattern(a, q, keys, mask), vals)
            x[:done] = xa + normed(a, attn, blk.attn_post_norm)
        x[done:n] = clean.resid_mid[j][p0:]  # rows entering here: clean up to this MLP
        xm = normed(a, x[:n], blk.mlp_norm)
        h = a.activation(xm @ blk.gate.T) * (xm @ blk.up.T)
        e = by_layer.get(j)
        if e is not None and len(e):
            r = torch.as_tensor(rank[edits.row[e]], device=h.device)
            c = torch.as_tensor(edits.neuron[e], device=h.device)
            h[r, :, c] = edited_values(h[r, :, c], edits.mult[e], edits.add[e, p0:],
                                       edits.where[e, p0:])
        if j in watch:
            idx = torch.as_tensor(watch[j], device=h.device)
            out = clean.act[j][p0:, idx][None].repeat(B, 1, 1)
            out[:n] = h[:, :, idx]
            seen[j] = out
        x[:n] = x[:n] + normed(a, h @ blk.down.T, blk.mlp_post_norm)
        done = n
    for j, layer_watch in watch.items():  # layers before any edit: clean
        if j not in seen:
            seen[j] = clean.act[j][p0:, torch.as_tensor(layer_watch)][None].repeat(B, 1, 1)
    return final_logits(a, x[:, -1])[rank], {j: s[rank] for j, s in seen.items()}


def _edit_sums(clean: Clean, edits: Edits, e: np.ndarray) -> torch.Tensor:
    """(len(e),): each edit's change of its neuron's clean activation, summed over the
    positions it edits."""
    h = torch.stack([clean.act[int(j)][:, int(n)] for j, n in zip(
        edits.layer[e], edits.neuron[e], strict=True)])  # (E, T)
    return (edited_values(h, edits.mult[e], edits.add[e], edits.where[e]) - h).sum(-1)


def _write_column(blk, neuron) -> torch.Tensor:
    """What one unit of a neuron's activation adds to the residual, its post-MLP norm's
    weight applied (its scale left out): (d,), or (k, d) for an index array."""
    w = blk.down[:, neuron]
    w = w.T if w.dim() == 2 else w
    return w if blk.mlp_post_norm is None else w * blk.mlp_post_norm


def _writes(adapter: Adapter, clean: Clean, edits: Edits, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), d): what the edits of ``rows`` write along the direct path, before the
    final norm: each neuron's edit (:func:`_edit_sums`) times ``W_down[:, n]`` (post-MLP
    norm weight applied, its scale left out)."""
    write = torch.zeros(len(rows), adapter.d_model, dtype=clean.logits.dtype,
                        device=clean.logits.device)
    slot = np.full(edits.rows, -1)
    slot[rows] = np.arange(len(rows))
    for j in np.unique(edits.layer):
        e = np.flatnonzero((edits.layer == j) & (slot[edits.row] >= 0))
        if not len(e):
            continue
        w = _write_column(adapter.blocks[int(j)], edits.neuron[e])
        write.index_add_(0, torch.as_tensor(slot[edits.row[e]], device=write.device),
                         _edit_sums(clean, edits, e)[:, None] * w)
    return write


def _direct_logits(adapter: Adapter, write: torch.Tensor) -> torch.Tensor:
    """Writes (..., d) through the final norm's weight (its scale left out) and the
    unembedding: the static output projection."""
    return (write * adapter.final_norm) @ adapter.unembed.T


def predicted_direction(adapter: Adapter, clean: Clean, edits: Edits) -> torch.Tensor:
    """(B, V): the logit change each row's neurons' output projections predict for its
    edit (of the clean activations, summed over the edited positions): the edit times
    ``W_down[:, n]`` along the direct path to the unembedding, final and post-MLP norm
    weights applied and their scales left out, as the projections table has it."""
    return _direct_logits(adapter, _writes(adapter, clean, edits, np.arange(edits.rows)))


def predicted_tokens(adapter: Adapter, clean: Clean, edits: Edits,
                     cache: dict | None = None) -> torch.Tensor:
    """(B, :data:`PREDICTED`): the top tokens of :func:`predicted_direction`. A row that
    edits one neuron predicts the top of that neuron's output projection, signed by its
    edit: the same on every prompt, computed once per (layer, neuron, sign) in ``cache``."""
    cache = {} if cache is None else cache
    out = torch.empty(edits.rows, PREDICTED, dtype=torch.long, device=clean.logits.device)
    counts = np.bincount(edits.row, minlength=edits.rows)
    e = np.flatnonzero(counts[edits.row] == 1)  # the edits of one-edit rows
    if len(e):
        single = edits.row[e]
        layer, neuron = edits.layer[e], edits.neuron[e]
        signs = torch.where(_edit_sums(clean, edits, e) >= 0, 1, -1).tolist()
        keys = [(int(j), int(n), sign) for j, n, sign in zip(layer, neuron, signs,
                                                             strict=True)]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:  # one unembedding for all of them: a matrix, not many vectors
            w = torch.stack([_write_column(adapter.blocks[j], n) * sign
                             for j, n, sign in missing])
            top = _direct_logits(adapter, w).topk(PREDICTED, -1).indices
            cache.update(zip(missing, top, strict=True))
        out[torch.as_tensor(single)] = torch.stack([cache[k] for k in keys])
    multi = np.flatnonzero(counts > 1)
    if len(multi):
        out[torch.as_tensor(multi)] = _direct_logits(
            adapter, _writes(adapter, clean, edits, multi)).topk(PREDICTED, -1).indices
    return out


def measures(clean_logits: torch.Tensor, logits: torch.Tensor, target: int,
             distractor: int | None = None, predicted: torch.Tensor | None = None
             ) -> dict[str, np.ndarray]:
    """Per row, what an intervention did to the next-token distribution:

    * ``logit_delta``, ``prob_clean``, ``prob_delta``: of the target token;
    * ``logit_diff_delta``: change of logit(target) - logit(distractor), or NaN;
    * ``top1_flip`` and ``top1_token``: whether the top prediction changed, and to what;
    * ``kl``: KL(clean || intervened) in nats;
    * ``moved_tokens`` / ``moved_deltas``: the :data:`MOVED` tokens raised most, then the
      :data:`MOVED` lowered most, by logit change minus its mean over the vocabulary
      (a shift of every logit moves no probability);
    * from the ``predicted`` tokens P (B, k) (:func:`predicted_tokens`, the top of the
      logit change the output projections predict): ``predicted_delta``, the mean
      centred logit change on P (above 0: the intervention moved what the output
      projections say it moves), and ``specificity``, the share of the probability that
      moved (sum of |dp|) that moved on P.
    """
    delta = logits - clean_logits
    centred = delta - delta.mean(-1, keepdim=True)
    lp0 = clean_logits.log_softmax(-1)
    lp = logits.log_softmax(-1)
    p0, p = lp0.exp(), lp.exp()
    out: dict[str, np.ndarray] = {
        "logit_delta": delta[:, target],
        "prob_clean": p0[target].expand(len(logits)),
        "prob_delta": p[:, target] - p0[target],
        "top1_token": logits.argmax(-1),
        "kl": (p0 * (lp0 - lp)).sum(-1).clamp_min(0),
    }
    out["top1_flip"] = out["top1_token"] != clean_logits.argmax()
    if distractor is None:
        out["logit_diff_delta"] = torch.full((len(logits),), float("nan"))
    else:
        out["logit_diff_delta"] = delta[:, target] - delta[:, distractor]
    up, down = centred.topk(MOVED, -1), (-centred).topk(MOVED, -1)
    out["moved_tokens"] = torch.cat([up.indices, down.indices], -1)
    out["moved_deltas"] = torch.cat([up.values, -down.values], -1)
    if predicted is not None:
        top = predicted
        out["predicted_delta"] = centred.gather(1, top).mean(-1)
        moved = (p - p0).abs()
        out["specificity"] = moved.gather(1, top).sum(-1) / moved.sum(-1).clamp_min(1e-30)
    return {k: (v.cpu().numpy() if v.dtype in (torch.bool, torch.int64)
                else v.double().cpu().numpy()) for k, v in out.items()}
