"""Where each model family keeps its parts: the only architecture knowledge we hold.

The attribution code never names a module; it asks an :class:`Adapter` for the
embedding, the blocks' attention and MLP weights, the norms and where they sit.

Supported, all decoders with a gated MLP (``act(gate) * up``):

* **pre-norm** (Llama, Mistral, SmolLM, Qwen2, Qwen3): ``x + attn(norm(x))``, then
  ``x + mlp(norm(x))``; SiLU;
* **post-norm** (OLMo-2, OLMo-3): ``x + norm(attn(x))``, then ``x + norm(mlp(x))``.
  HF names OLMo-2's norm after attention ``post_attention_layernorm``, the name
  Llama gives its norm *before* the MLP: the same name, another place, which is
  why placement is stated here per family and never inferred from names; SiLU;
* **sandwich** (Gemma-2, Gemma-3): ``x + norm(attn(norm(x)))``, then
  ``x + norm(mlp(norm(x)))``: four norms per block, each stored as ``w`` and applied
  as ``1 + w`` (the adapter hands out ``1 + w``); the embedding scaled by sqrt(d);
  queries scaled by ``query_pre_attn_scalar``; GELU (tanh approximation). Gemma-2
  soft-caps attention scores and the final logits (``c * tanh(x / c)``).

RelP's identity rule treats every activation alike: ``act(g) = (act(g) / g) * g``
with the ratio a constant (sigmoid(g) for SiLU, the Gaussian CDF's tanh form for
GELU-tanh); the final soft-cap likewise, ``c * tanh(z / c) = (tanh(z / c) / (z / c)) * z``.
The attention soft-cap only shapes the pattern, which RelP freezes anyway.

Attention biases (Qwen2's q/k/v, Llama's optional ``attention_bias``) are taken in:
q/k biases only shape the pattern, and what v and o biases add is a constant that
the graphs keep as constant nodes. Sliding-window layers get their window mask and
per-layer rotary tables (OLMo-3, Gemma-3). MLP biases would make a neuron's activation
affine rather than linear in its input, so such models are refused with a message,
never attributed wrongly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from circuit_atlas.errors import CircuitAtlasError


@dataclass(frozen=True)
class Family:
    """Where a family's norms sit and how its q/k norms are applied."""

    post_norm: bool = False
    """Norms on the sublayer outputs (OLMo-2/3) instead of their inputs."""
    qk_norm: str | None = None
    """"head": RMSNorm over each head's dh dims (Qwen3); "full": over all heads (OLMo)."""
    sandwich: bool = False
    """Norms before and after both sublayers (Gemma-2/3)."""
    offset_norms: bool = False
    """RMSNorm weights stored as w and applied as 1 + w (Gemma)."""
    per_type_rope: bool = False
    """One rotary table per layer type (sliding and full attention)."""

    @property
    def mlp_norm_module(self) -> str | None:
        """The HF name of the norm in front of the MLP (None: it reads the residual)."""
        if self.post_norm:
            return None
        return "pre_feedforward_layernorm" if self.sandwich else "post_attention_layernorm"


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm="head"),
    "olmo2": Family(post_norm=True, qk_norm="full"),
    "olmo3": Family(post_norm=True, qk_norm="full", per_type_rope=True),
    "gemma2": Family(sandwich=True, offset_norms=True),
    "gemma3_text": Family(sandwich=True, offset_norms=True, qk_norm="head",
                          per_type_rope=True),
}
# HF's activation names -> ours
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu": "gelu"}


def activation(kind: str, g: torch.Tensor) -> torch.Tensor:
    """The gate's activation: SiLU, GELU with the tanh approximation, or exact GELU."""
    if kind == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh" if kind == "gelu_tanh" else "none")


def activation_ratio(kind: str, g: torch.Tensor) -> torch.Tensor:
    """act(g) / g, what RelP's identity rule holds constant: sigmoid(g) for SiLU, the
    Gaussian CDF (or its tanh form) for GELU; finite at g = 0."""
    if kind == "silu":
        return torch.sigmoid(g)
    if kind == "gelu_tanh":
        return 0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))
    return 0.5 * (1 + torch.erf(g * 2**-0.5))


@dataclass(frozen=True)
class Block:
    """One decoder block's weights, in the shapes ``torch.nn.Linear`` stores them.

    A norm that a family does not have is None (a pre-norm block has no post norms
    and the other way round).
    """

    attn_norm: torch.Tensor | None  # (d,) before attention
    q: torch.Tensor  # (H*dh, d)
    k: torch.Tensor  # (KV*dh, d)
    v: torch.Tensor  # (KV*dh, d)
    o: torch.Tensor  # (d, H*dh)
    q_norm: Any  # module applied to queries (see Family.qk_norm), or None
    k_norm: Any
    mlp_norm: torch.Tensor | None  # (d,) before the MLP
    gate: torch.Tensor  # (N, d)
    up: torch.Tensor  # (N, d)
    down: torch.Tensor  # (d, N)
    qk_norm: str | None = None
    attn_post_norm: torch.Tensor | None = None  # (d,) on attention's output
    mlp_post_norm: torch.Tensor | None = None  # (d,) on the MLP's output
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    attn_constant: torch.Tensor | None = None
    """What attention adds whatever its input, before any post norm (d,): the v bias
    passes through the pattern unchanged (each row sums to 1), then o, plus o's bias."""
    window: int | None = None
    """Sliding window: a query sees keys less than ``window`` positions back."""
    rope: str | None = None
    """The rotary table this layer uses, for models with one per layer type."""


@dataclass
class Adapter:
    """A loaded causal LM seen as embedding, blocks, final norm and unembedding."""

    model: Any
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    n_neurons: int
    eps: float
    blocks: list[Block]
    embed: torch.Tensor  # (V, d)
    final_norm: torch.Tensor  # (d,)
    unembed: torch.Tensor  # (V, d)
    act: str = "silu"  # the MLP gate's activation (see ACTIVATIONS)
    embed_scale: float = 1.0  # the embedding's multiplier (Gemma: sqrt(d))
    attn_scale: float | None = None  # queries' scale; None: 1/sqrt(head_dim)
    attn_softcap: float | None = None  # attention scores c * tanh(s / c) (Gemma-2)
    final_softcap: float | None = None  # logits c * tanh(z / c) (Gemma-2)

    @functools.cached_property
    def unembed_mean(self) -> torch.Tensor:
        """The mean unembedding row (d,), which every logit read subtracts."""
        return self.unembed.mean(0)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the tokens put on the residual stream (the scale rounded to the weights'
        dtype, as the model does)."""
        x = self.embed[tokens]
        if self.embed_scale == 1.0:
            return x
        return x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)

    def activation(self, g: torch.Tensor) -> torch.Tensor:
        return activation(self.act, g)

    def activation_ratio(self, g: torch.Tensor) -> torch.Tensor:
        return activation_ratio(self.act, g)

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def cap_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The final soft-cap on logits ``z`` (unchanged where the family has none)."""
        c = self.final_softcap
        return z if c is None else c * torch.tanh(z / c)

    def cap_ratio(self, z: torch.Tensor) -> torch.Tensor | None:
        """cap(z) / z, the soft-cap's constant under the identity rule (None: no cap)."""
        c = self.final_softcap
        if c is None:
            return None
        t = z / c
        small = t.abs() < 1e-4
        return torch.where(small, 1 - t * t / 3, torch.tanh(t) / torch.where(small, 1, t))

    @property
    def constants(self) -> bool:
        """Whether any block adds a constant (attention biases): graphs then get constant
        nodes, so that every target's incoming edges still sum to its read."""
        return any(b.attn_constant is not None for b in self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def rotary(self, x: torch.Tensor, positions: torch.Tensor
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer, in ``x``'s dtype; each distinct table computed once."""
        emb, tables, out = self.model.model.rotary_emb, {}, []
        for blk in self.blocks:
            if blk.rope not in tables:
                cs = emb(x, positions) if blk.rope is None else emb(x, positions, blk.rope)
                tables[blk.rope] = tuple(t.to(x.dtype) for t in cs)
            out.append(tables[blk.rope])
        return out


def _weight(module: Any, name: str, family: str, bias_ok: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(module, "bias", None)
    if bias is not None and not bias_ok:
        raise CircuitAtlasError(
            f"{family} model has a bias on {name}: an MLP bias makes a neuron's activation "
            "affine in its input, which RelP's rules do not attribute; this model is not "
            "supported")
    return module.weight, bias


def check_family(config: Any) -> Family:
    """The family of a model config, or a clear refusal (no weights needed)."""
    family = getattr(config, "model_type", type(config).__name__)
    if family not in FAMILIES:
        raise CircuitAtlasError(
            f"model family {family!r} is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))} (decoders with a gated MLP)")
    act = hidden_activation(config)
    if act not in ACTIVATIONS:
        raise CircuitAtlasError(
            f"{family} model uses activation {act!r}; supported: "
            f"{', '.join(sorted(ACTIVATIONS))}")
    return FAMILIES[family]


def hidden_activation(config: Any) -> str:
    """The MLP gate's activation as HF names it (Gemma's config calls it
    ``hidden_activation``, the others ``hidden_act``)."""
    return (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
            or "silu")


def _window(config: Any, attn: Any, family: str) -> int | None:
    if family == "mistral":  # one window for every layer, set on the config only
        return getattr(config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def adapter_for(model: Any) -> Adapter:
    """The adapter of a loaded Hugging Face causal LM, or a clear refusal."""
    config = model.config
    fam = check_family(config)
    family = config.model_type
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    offset = fam.offset_norms

    def norm(module: Any) -> torch.Tensor:
        return 1 + module.weight if offset else module.weight

    blocks = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        name = f"layers.{i}"
        q, qb = _weight(attn.q_proj, f"{name}.self_attn.q_proj", family, bias_ok=True)
        k, kb = _weight(attn.k_proj, f"{name}.self_attn.k_proj", family, bias_ok=True)
        v, vb = _weight(attn.v_proj, f"{name}.self_attn.v_proj", family, bias_ok=True)
        o, ob = _weight(attn.o_proj, f"{name}.self_attn.o_proj", family, bias_ok=True)
        constant = None
        if vb is not None or ob is not None:
            constant = torch.zeros(config.hidden_size, dtype=o.dtype, device=o.device)
            if vb is not None:
                expanded = vb.view(n_kv, head_dim).repeat_interleave(n_heads // n_kv, 0)
                constant = constant + expanded.flatten() @ o.T
            if ob is not None:
                constant = constant + ob
        if fam.sandwich:
            norms = {"attn_norm": norm(layer.input_layernorm),
                     "attn_post_norm": norm(layer.post_attention_layernorm),
                     "mlp_norm": norm(layer.pre_feedforward_layernorm),
                     "mlp_post_norm": norm(layer.post_feedforward_layernorm)}
        elif fam.post_norm:
            norms = {"attn_norm": None, "mlp_norm": None,
                     "attn_post_norm": layer.post_attention_layernorm.weight,
                     "mlp_post_norm": layer.post_feedforward_layernorm.weight}
        else:
            norms = {"attn_norm": layer.input_layernorm.weight,
                     "mlp_norm": layer.post_attention_layernorm.weight}
        blocks.append(Block(
            q=q, k=k, v=v, o=o, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=ob,
            attn_constant=constant,
            q_norm=attn.q_norm if fam.qk_norm else None,
            k_norm=attn.k_norm if fam.qk_norm else None, qk_norm=fam.qk_norm,
            gate=_weight(mlp.gate_proj, f"{name}.mlp.gate_proj", family)[0],
            up=_weight(mlp.up_proj, f"{name}.mlp.up_proj", family)[0],
            down=_weight(mlp.down_proj, f"{name}.mlp.down_proj", family)[0],
            window=_window(config, attn, family),
            rope=config.layer_types[i] if fam.per_type_rope else None,
            **norms,
        ))
    return Adapter(
        model=model,
        family=family,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_model=config.hidden_size,
        n_neurons=config.intermediate_size,
        eps=config.rms_norm_eps,
        blocks=blocks,
        embed=model.model.embed_tokens.weight,
        final_norm=norm(model.model.norm),
        unembed=model.lm_head.weight,
        act=ACTIVATIONS[hidden_activation(config)],
        embed_scale=float(getattr(model.model.embed_tokens, "scalar_embed_scale", 1.0)),
        attn_scale=(config.query_pre_attn_scalar**-0.5
                    if getattr(config, "query_pre_attn_scalar", None) else None),
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )
