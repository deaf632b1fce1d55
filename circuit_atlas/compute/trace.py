"""One forward pass over a gated-MLP decoder that records what RelP needs.

The pass is written out (rather than hooked into the model's own forward) so that
the RelP rules are explicit. With ``relp=True`` it computes the same values but
differentiates as the linearised model of RelP (arXiv 2508.21258):

* LN-rule: the RMSNorm scale ``1/rms(x)`` is a constant (detached);
* AH-rule: the attention pattern (after softmax) is a constant;
* Identity-rule: ``SiLU(g)`` passes gradient as ``sigmoid(g) * g`` with ``sigmoid(g)``
  constant (any gate activation: ``act(g) / g`` constant, see :mod:`adapters`);
* Half-rule: ``act(g) * up`` sends half of the gradient to each factor.

Under these rules every quantity is linear in the embeddings (plus the constants
that attention biases add), so relevance is conserved: the contributions of all
inputs to an output sum to the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuit_atlas.compute.adapters import Adapter


@dataclass
class Trace:
    """What a forward pass recorded, per layer (lists of length n_layers).

    Shapes: B prompts of T tokens, H heads, d model width, N neurons per layer. A
    norm's scale is None where the block has no such norm (see :class:`Block`).
    """

    tokens: torch.Tensor  # (B, T)
    attn_scale: list[torch.Tensor | None]  # (B, T, 1): 1/rms of attention's input
    pattern: list[torch.Tensor]  # (B, H, T, T)
    attn_post_scale: list[torch.Tensor | None]  # (B, T, 1): 1/rms of attention's output
    attn_out: list[torch.Tensor]  # (B, T, d): what attention adds to the residual
    resid_mid: list[torch.Tensor]  # (B, T, d): the residual entering the MLP
    mlp_scale: list[torch.Tensor | None]  # (B, T, 1): 1/rms of the MLP's input
    gate: list[torch.Tensor]  # (B, T, N) pre-activation
    up: list[torch.Tensor]  # (B, T, N)
    act: list[torch.Tensor]  # (B, T, N) h = act(gate) * up
    mlp_post_scale: list[torch.Tensor | None]  # (B, T, 1): 1/rms of the MLP's output
    mlp_out: list[torch.Tensor]  # (B, T, d): what the MLP adds to the residual
    final_scale: torch.Tensor  # (B, T, 1)
    final_resid: torch.Tensor  # (B, T, d) before the final norm

    def logits(self, adapter: Adapter, positions: slice | int = -1) -> torch.Tensor:
        x = self.final_resid[:, positions] * self.final_scale[:, positions]
        return adapter.cap_logits((x * adapter.final_norm) @ adapter.unembed.T)

    def select(self, b: int, length: int) -> Trace:
        """Prompt ``b`` of a batch, its first ``length`` positions (right padding cut
        off: under causal attention nothing before it saw the padding)."""
        def cut(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 4:  # attention pattern
                return t[b:b + 1, :, :length, :length]
            return t[b:b + 1, :length]
        return self._map(cut)

    def detached(self) -> Trace:
        return self._map(torch.Tensor.detach)

    def _map(self, fn) -> Trace:
        """A trace of ``fn`` applied to every recorded tensor (None stays None)."""
        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return Trace(**{k: ([one(t) for t in v] if isinstance(v, list) else one(v))
                        for k, v in self.__dict__.items()})


def at(scale: torch.Tensor | None, *index) -> torch.Tensor | None:
    """``scale[index]`` of a recorded norm scale, None where the block has no such norm."""
    return None if scale is None else scale[index]


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + half(q) * sin, k * cos + half(k) * sin


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.T
    return y if bias is None else y + bias


def qkv(a: Adapter, blk, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries (B, H, T, dh), keys and values (B, KV, T, dh) of attention input ``xn``,
    q/k-normed and rotated: keys and values are what a KV cache holds."""
    B, T, _ = xn.shape
    q, k = _linear(xn, blk.q, blk.q_bias), _linear(xn, blk.k, blk.k_bias)
    v = _linear(xn, blk.v, blk.v_bias)
    if blk.qk_norm == "full":
        q, k = blk.q_norm(q), blk.k_norm(k)
    q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
    k = k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    if blk.qk_norm == "head":
        q, k = blk.q_norm(q), blk.k_norm(k)
    q, k = _rotate(q, k, cos, sin)
    return q, k, v


def causal_mask(T: int, window: int | None, device) -> torch.Tensor:
    """(T, T) allowed keys: earlier positions, and within ``window`` if one is set."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return mask if window is None else mask.triu(1 - window)


def capped_scores(a: Adapter, scores: torch.Tensor) -> torch.Tensor:
    """Attention scores through the family's soft-cap (Gemma-2), if it has one."""
    c = a.attn_softcap
    return scores if c is None else c * torch.tanh(scores / c)


def attention_pattern(a: Adapter, q: torch.Tensor, k: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax pattern (B, H, Tq, Tk); ``mask`` (Tq, Tk) marks the allowed keys."""
    k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    scores = capped_scores(a, (q @ k.transpose(-1, -2)) * a.query_scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def attention_output(a: Adapter, blk, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention's output (B, Tq, d), before any post norm."""
    B, _, Tq, _ = pattern.shape
    z = pattern @ v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    return _linear(z.transpose(1, 2).reshape(B, Tq, a.n_heads * a.head_dim), blk.o,
                   blk.o_bias)


def cached_attention(a: Adapter, blk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention output (B, 1, d) of B one-position queries q (B, H, 1, dh), each with its
    own key/value k, v (B, KV, 1, dh), over shared cached earlier positions ``keys``,
    ``values`` (H, T', dh) (already cut to the layer's window): one matmul per head, no
    copy of the cache per row. Before any post norm."""
    B = q.shape[0]
    group = a.n_heads // a.n_kv_heads
    qh = q[:, :, 0].transpose(0, 1)  # (H, B, dh)
    kn = k[:, :, 0].repeat_interleave(group, dim=1).transpose(0, 1)
    vn = v[:, :, 0].repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.cat([qh @ keys.transpose(1, 2), (qh * kn).sum(-1, keepdim=True)], -1)
    pattern = capped_scores(a, scores * a.query_scale).softmax(-1)
    z = pattern[..., :-1] @ values + pattern[..., -1:] * vn  # (H, B, dh)
    return _linear(z.transpose(0, 1).reshape(B, 1, a.n_heads * a.head_dim), blk.o, blk.o_bias)


def rms_scale(x: torch.Tensor, eps: float, relp: bool = False) -> torch.Tensor:
    """1/rms(x) over the last dimension (a constant under RelP's LN-rule)."""
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return scale.detach() if relp else scale


def norm_scale(x: torch.Tensor, weight: torch.Tensor | None, eps: float, relp: bool = False
               ) -> torch.Tensor | None:
    """The scale of a norm with ``weight`` applied to ``x``; None where there is no norm."""
    return None if weight is None else rms_scale(x, eps, relp)


def scaled(x: torch.Tensor, scale: torch.Tensor | None, weight: torch.Tensor | None
           ) -> torch.Tensor:
    """``x`` through a norm whose scale is known (``x`` itself where there is no norm)."""
    return x if weight is None else x * scale * weight


def normed(a: Adapter, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``x`` through an RMSNorm with ``weight`` (or unchanged: no norm there)."""
    return scaled(x, norm_scale(x, weight, a.eps), weight)


def neuron_writes(blk, act: torch.Tensor, index, post_scale: torch.Tensor | None
                  ) -> torch.Tensor:
    """What neurons ``index`` of a block add to the residual at activations ``act`` (C,):
    ``h * W_down[:, n]``, through the post-MLP norm at its (frozen) ``post_scale`` in
    post-norm families. (C, d)."""
    return scaled(act[:, None] * blk.down[:, index].T, post_scale, blk.mlp_post_norm)


def mlp(a: Adapter, blk, xm: torch.Tensor) -> torch.Tensor:
    """The gated MLP's output (before any post norm) on its input ``xm``."""
    return (a.activation(xm @ blk.gate.T) * (xm @ blk.up.T)) @ blk.down.T


def forward(adapter: Adapter, tokens: torch.Tensor, relp: bool = False,
            embeddings: torch.Tensor | None = None, frozen: Trace | None = None,
            mlp_override: list[torch.Tensor] | None = None) -> Trace:
    """Run ``tokens`` (B, T) through the model, recording a :class:`Trace`.

    ``embeddings`` replaces the embedding lookup (a leaf to differentiate against).
    ``frozen`` takes norm scales and attention patterns from an earlier trace, and
    ``mlp_override`` replaces what each MLP adds to the residual: together they
    evaluate the linearised model with frozen MLPs at any input, which is what an
    edge means.
    """
    a = adapter
    B, T = tokens.shape
    x = a.embed_tokens(tokens) if embeddings is None else embeddings
    positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
    rotary = a.rotary(x, positions)
    masks: dict[int | None, torch.Tensor] = {}
    rec: dict[str, list] = {k: [] for k in (
        "attn_scale", "pattern", "attn_post_scale", "attn_out", "resid_mid", "mlp_scale",
        "gate", "up", "act", "mlp_post_scale", "mlp_out")}

    def scale(name: str, i: int, t: torch.Tensor, weight: torch.Tensor | None):
        return getattr(frozen, name)[i] if frozen else norm_scale(t, weight, a.eps, relp)

    for i, blk in enumerate(a.blocks):
        s = scale("attn_scale", i, x, blk.attn_norm)
        cos, sin = rotary[i]
        q, k, v = qkv(a, blk, scaled(x, s, blk.attn_norm), cos, sin)
        if blk.window not in masks:
            masks[blk.window] = causal_mask(T, blk.window, x.device)
        pattern = attention_pattern(a, q, k, masks[blk.window])
        if relp:
            pattern = pattern.detach()
        if frozen:
            pattern = frozen.pattern[i]
        raw = attention_output(a, blk, pattern, v)
        sp = scale("attn_post_scale", i, raw, blk.attn_post_norm)
        attn = scaled(raw, sp, blk.attn_post_norm)
        x = mid = x + attn
        s2 = scale("mlp_scale", i, x, blk.mlp_norm)
        xm = scaled(x, s2, blk.mlp_norm)
        g, u = xm @ blk.gate.T, xm @ blk.up.T
        if relp:
            act = a.activation_ratio(g).detach() * g  # identity rule
            h = 0.5 * (act * u.detach()) + 0.5 * (act.detach() * u)  # half rule
        else:
            h = a.activation(g) * u
        if mlp_override is None:
            raw_m = h @ blk.down.T
            sm = scale("mlp_post_scale", i, raw_m, blk.mlp_post_norm)
            m = scaled(raw_m, sm, blk.mlp_post_norm)
        else:
            sm, m = frozen.mlp_post_scale[i] if frozen else None, mlp_override[i]
        x = x + m
        for key, val in (("attn_scale", s), ("pattern", pattern), ("attn_post_scale", sp),
                         ("attn_out", attn), ("resid_mid", mid), ("mlp_scale", s2),
                         ("gate", g), ("up", u), ("act", h), ("mlp_post_scale", sm),
                         ("mlp_out", m)):
            rec[key].append(val)
    final_scale = frozen.final_scale if frozen else rms_scale(x, a.eps, relp)
    return Trace(tokens=tokens, final_scale=final_scale, final_resid=x, **rec)
