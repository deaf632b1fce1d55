"""One forward pass over a pre-norm gated-MLP decoder that records what RelP needs.

The pass is written out (rather than hooked into the model's own forward) so that
the RelP rules are explicit. With ``relp=True`` it computes the same values but
differentiates as the linearised model of RelP (arXiv 2508.21258):

* LN-rule: the RMSNorm scale ``1/rms(x)`` is a constant (detached);
* AH-rule: the attention pattern (after softmax) is a constant;
* Identity-rule: ``SiLU(g)`` passes gradient as ``sigmoid(g) * g`` with ``sigmoid(g)``
  constant;
* Half-rule: ``SiLU(g) * up`` sends half of the gradient to each factor.

Under these rules every quantity is linear in the embeddings, so relevance is
conserved: the contributions of all inputs to an output sum to the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuit_atlas.compute.adapters import Adapter


@dataclass
class Trace:
    """What a forward pass recorded, per layer (lists of length n_layers).

    Shapes: B prompts of T tokens, H heads, d model width, N neurons per layer.
    """

    tokens: torch.Tensor  # (B, T)
    attn_scale: list[torch.Tensor]  # (B, T, 1): 1/rms of the residual entering attention
    pattern: list[torch.Tensor]  # (B, H, T, T)
    resid_mid: list[torch.Tensor]  # (B, T, d): the residual entering the MLP (pre-norm)
    mlp_scale: list[torch.Tensor]  # (B, T, 1): 1/rms of the residual entering the MLP
    gate: list[torch.Tensor]  # (B, T, N) pre-activation
    up: list[torch.Tensor]  # (B, T, N)
    act: list[torch.Tensor]  # (B, T, N) h = SiLU(gate) * up
    mlp_out: list[torch.Tensor]  # (B, T, d)
    final_scale: torch.Tensor  # (B, T, 1)
    final_resid: torch.Tensor  # (B, T, d) before the final norm

    def logits(self, adapter: Adapter, positions: slice | int = -1) -> torch.Tensor:
        x = self.final_resid[:, positions] * self.final_scale[:, positions]
        return (x * adapter.final_norm) @ adapter.unembed.T


def _rms_scale(x: torch.Tensor, eps: float, relp: bool) -> torch.Tensor:
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return scale.detach() if relp else scale


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + half(q) * sin, k * cos + half(k) * sin


def forward(adapter: Adapter, tokens: torch.Tensor, relp: bool = False,
            embeddings: torch.Tensor | None = None, frozen: Trace | None = None,
            mlp_override: list[torch.Tensor] | None = None) -> Trace:
    """Run ``tokens`` (B, T) through the model, recording a :class:`Trace`.

    ``embeddings`` replaces the embedding lookup (a leaf to differentiate against).
    ``frozen`` takes norm scales and attention patterns from an earlier trace, and
    ``mlp_override`` replaces each MLP's output: together they evaluate the
    linearised model with frozen MLPs at any input, which is what an edge means.
    """
    a = adapter
    B, T = tokens.shape
    x = a.embed[tokens] if embeddings is None else embeddings
    positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
    cos, sin = a.rotary(x, positions)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    group = a.n_heads // a.n_kv_heads
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "attn_scale", "pattern", "resid_mid", "mlp_scale", "gate", "up", "act", "mlp_out")}
    for i, blk in enumerate(a.blocks):
        s = frozen.attn_scale[i] if frozen else _rms_scale(x, a.eps, relp)
        xn = x * s * blk.attn_norm
        q = (xn @ blk.q.T).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = (xn @ blk.k.T).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = (xn @ blk.v.T).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if blk.q_norm is not None:
            q, k = blk.q_norm(q), blk.k_norm(k)
        q, k = _rotate(q, k, cos, sin)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * a.head_dim**-0.5
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        if relp:
            pattern = pattern.detach()
        if frozen:
            pattern = frozen.pattern[i]
        z = (pattern @ v).transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim)
        x = x + z @ blk.o.T
        mid = x
        s2 = frozen.mlp_scale[i] if frozen else _rms_scale(x, a.eps, relp)
        xm = x * s2 * blk.mlp_norm
        g, u = xm @ blk.gate.T, xm @ blk.up.T
        if relp:
            silu = torch.sigmoid(g).detach() * g  # identity rule
            h = 0.5 * (silu * u.detach()) + 0.5 * (silu.detach() * u)  # half rule
        else:
            h = torch.nn.functional.silu(g) * u
        m = h @ blk.down.T if mlp_override is None else mlp_override[i]
        x = x + m
        for key, val in (("attn_scale", s), ("pattern", pattern), ("resid_mid", mid),
                         ("mlp_scale", s2),
                         ("gate", g), ("up", u), ("act", h), ("mlp_out", m)):
            rec[key].append(val)
    final_scale = frozen.final_scale if frozen else _rms_scale(x, a.eps, relp)
    return Trace(tokens=tokens, final_scale=final_scale, final_resid=x, **rec)
