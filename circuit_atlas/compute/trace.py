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


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + half(q) * sin, k * cos + half(k) * sin


def qkv(a: Adapter, blk, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries (B, H, T, dh), keys and values (B, KV, T, dh) of normed input ``xn``,
    q/k-normed and rotated: keys and values are what a KV cache holds."""
    B, T, _ = xn.shape
    q = (xn @ blk.q.T).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
    k = (xn @ blk.k.T).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = (xn @ blk.v.T).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    if blk.q_norm is not None:
        q, k = blk.q_norm(q), blk.k_norm(k)
    q, k = _rotate(q, k, cos, sin)
    return q, k, v


def attention_pattern(a: Adapter, q: torch.Tensor, k: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax pattern (B, H, Tq, Tk); ``mask`` (Tq, Tk) marks the allowed keys."""
    k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) * a.head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def attention_output(a: Adapter, blk, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What attention adds to the residual, (B, Tq, d)."""
    B, _, Tq, _ = pattern.shape
    z = pattern @ v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    return z.transpose(1, 2).reshape(B, Tq, a.n_heads * a.head_dim) @ blk.o.T


def cached_attention(a: Adapter, blk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention output (B, 1, d) of B one-position queries q (B, H, 1, dh), each with its
    own key/value k, v (B, KV, 1, dh), over shared cached earlier positions ``keys``,
    ``values`` (H, T', dh): one matmul per head, no copy of the cache per row."""
    B = q.shape[0]
    group = a.n_heads // a.n_kv_heads
    scale = a.head_dim**-0.5
    qh = q[:, :, 0].transpose(0, 1)  # (H, B, dh)
    kn = k[:, :, 0].repeat_interleave(group, dim=1).transpose(0, 1)
    vn = v[:, :, 0].repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.cat([qh @ keys.transpose(1, 2), (qh * kn).sum(-1, keepdim=True)], -1)
    pattern = (scores * scale).softmax(-1)
    z = pattern[..., :-1] @ values + pattern[..., -1:] * vn  # (H, B, dh)
    return (z.transpose(0, 1).reshape(B, 1, a.n_heads * a.head_dim)) @ blk.o.T


def rms_scale(x: torch.Tensor, eps: float, relp: bool = False) -> torch.Tensor:
    """1/rms(x) over the last dimension (a constant under RelP's LN-rule)."""
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return scale.detach() if relp else scale


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
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "attn_scale", "pattern", "resid_mid", "mlp_scale", "gate", "up", "act", "mlp_out")}
    for i, blk in enumerate(a.blocks):
        s = frozen.attn_scale[i] if frozen else rms_scale(x, a.eps, relp)
        xn = x * s * blk.attn_norm
        q, k, v = qkv(a, blk, xn, cos, sin)
        pattern = attention_pattern(a, q, k, causal)
        if relp:
            pattern = pattern.detach()
        if frozen:
            pattern = frozen.pattern[i]
        x = x + attention_output(a, blk, pattern, v)
        mid = x
        s2 = frozen.mlp_scale[i] if frozen else rms_scale(x, a.eps, relp)
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
    final_scale = frozen.final_scale if frozen else rms_scale(x, a.eps, relp)
    return Trace(tokens=tokens, final_scale=final_scale, final_resid=x, **rec)
