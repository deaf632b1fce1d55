"""Where each model family keeps its parts: the only architecture knowledge we hold.

The attribution code never names a module; it asks an :class:`Adapter` for the
embedding, the blocks' attention and MLP weights, the norms and where they sit.
Supported: pre-norm gated-MLP decoders (Llama, Mistral, SmolLM, Qwen2 without
attention biases, Qwen3 with its q/k norms). A family we cannot linearise
exactly is refused with a message, never attributed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from circuit_atlas.errors import CircuitAtlasError

# model_type -> has q/k RMSNorm on the head dimension (they only shape the pattern)
PRE_NORM_FAMILIES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


@dataclass(frozen=True)
class Block:
    """One decoder block's weights, in the shapes ``torch.nn.Linear`` stores them."""

    attn_norm: torch.Tensor  # (d,)
    q: torch.Tensor  # (H*dh, d)
    k: torch.Tensor  # (KV*dh, d)
    v: torch.Tensor  # (KV*dh, d)
    o: torch.Tensor  # (d, H*dh)
    q_norm: Any  # module applied to (B, H, T, dh) queries, or None
    k_norm: Any
    mlp_norm: torch.Tensor  # (d,)
    gate: torch.Tensor  # (N, d)
    up: torch.Tensor  # (N, d)
    down: torch.Tensor  # (d, N)


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
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.rotary_emb(x, positions)


def _check_linear(module: Any, name: str, family: str) -> torch.Tensor:
    if getattr(module, "bias", None) is not None:
        raise CircuitAtlasError(
            f"{family} model has a bias on {name}: attention and MLP biases are constants that "
            "no neuron explains, and this version does not attribute them"
        )
    return module.weight


def adapter_for(model: Any) -> Adapter:
    """The adapter of a loaded Hugging Face causal LM, or a clear refusal."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family not in PRE_NORM_FAMILIES:
        raise CircuitAtlasError(
            f"model family {family!r} is not supported; supported: "
            f"{', '.join(sorted(PRE_NORM_FAMILIES))} (pre-norm decoders with a gated MLP)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CircuitAtlasError(f"{family} model uses activation {act!r}; RelP here needs SiLU")
    blocks = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        blocks.append(Block(
            attn_norm=layer.input_layernorm.weight,
            q=_check_linear(attn.q_proj, f"layers.{i}.self_attn.q_proj", family),
            k=_check_linear(attn.k_proj, f"layers.{i}.self_attn.k_proj", family),
            v=_check_linear(attn.v_proj, f"layers.{i}.self_attn.v_proj", family),
            o=_check_linear(attn.o_proj, f"layers.{i}.self_attn.o_proj", family),
            q_norm=getattr(attn, "q_norm", None) if PRE_NORM_FAMILIES[family] else None,
            k_norm=getattr(attn, "k_norm", None) if PRE_NORM_FAMILIES[family] else None,
            mlp_norm=layer.post_attention_layernorm.weight,
            gate=_check_linear(mlp.gate_proj, f"layers.{i}.mlp.gate_proj", family),
            up=_check_linear(mlp.up_proj, f"layers.{i}.mlp.up_proj", family),
            down=_check_linear(mlp.down_proj, f"layers.{i}.mlp.down_proj", family),
        ))
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return Adapter(
        model=model,
        family=family,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        n_neurons=config.intermediate_size,
        eps=config.rms_norm_eps,
        blocks=blocks,
        embed=model.model.embed_tokens.weight,
        final_norm=model.model.norm.weight,
        unembed=model.lm_head.weight,
    )
