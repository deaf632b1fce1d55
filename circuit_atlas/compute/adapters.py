"""Where each model family keeps its parts: the only architecture knowledge we hold.

The attribution code never names a module; it asks an :class:`Adapter` for the
embedding, the blocks' attention and MLP weights, the norms and where they sit.

Supported, all decoders with a SiLU-gated MLP:

* **pre-norm** (Llama, Mistral, SmolLM, Qwen2, Qwen3): ``x + attn(norm(x))``, then
  ``x + mlp(norm(x))``;
* **post-norm** (OLMo-2, OLMo-3): ``x + norm(attn(x))``, then ``x + norm(mlp(x))``.
  HF names OLMo-2's norm after attention ``post_attention_layernorm``, the name
  Llama gives its norm *before* the MLP: the same name, another place, which is
  why placement is stated here per family and never inferred from names.

Attention biases (Qwen2's q/k/v, Llama's optional ``attention_bias``) are taken in:
q/k biases only shape the pattern, and what v and o biases add is a constant that
the graphs keep as constant nodes. Sliding-window layers get their window mask and
per-layer rotary tables (OLMo-3). MLP biases would make a neuron's activation
affine rather than linear in its input, so such models are refused with a message,
never attributed wrongly.
"""

from __future__ import annotations

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


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm="head"),
    "olmo2": Family(post_norm=True, qk_norm="full"),
    "olmo3": Family(post_norm=True, qk_norm="full"),
}


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
            f"{', '.join(sorted(FAMILIES))} (decoders with a SiLU-gated MLP)")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CircuitAtlasError(f"{family} model uses activation {act!r}; RelP here needs SiLU")
    return FAMILIES[family]


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
    per_type_rope = family == "olmo3"
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
        if fam.post_norm:
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
            rope=config.layer_types[i] if per_type_rope else None,
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
        final_norm=model.model.norm.weight,
        unembed=model.lm_head.weight,
    )
