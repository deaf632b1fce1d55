"""Steering in generation: a unit's activations held under an intervention at every
position and every step of greedy decoding, beside the clean continuation.

Generation runs the Hugging Face model's own ``generate`` (its KV cache), with a
pre-hook on each edited layer's ``down_proj`` that rewrites the unit's neurons
(``h' = mult * h + add``) on whatever positions that step computes: the prompt on
the first step, then each new token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from circuit_atlas.compute.battery import Intervention, NeuronValues
from circuit_atlas.compute.params import SteerParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.units import Unit
from circuit_atlas.stage import Progress, as_corpora, open_lake


@dataclass
class Steered:
    prompt: str
    unit: str
    intervention: str
    clean: str
    steered: str
    clean_tokens: list[int]
    steered_tokens: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hooks(model, unit: Unit, iv: Intervention, values: NeuronValues | None) -> list:
    if iv.kind == "patch":
        raise CircuitAtlasError("steering holds a boost, a set value or an ablation; "
                                "patching needs a counterfactual prompt (circuit-atlas "
                                "intervene)")
    layers = model.model.model.layers
    per_layer: dict[int, list[tuple[int, float, float]]] = {}
    for layer, neuron in zip(unit.layers, unit.neurons, strict=True):
        per_layer.setdefault(layer, []).append((neuron, *iv.edit(values, layer, neuron)))
    handles = []
    for layer, edits in per_layer.items():
        idx = torch.tensor([e[0] for e in edits])
        mult = torch.tensor([e[1] for e in edits])
        add = torch.tensor([e[2] for e in edits])

        def pre(mod, args, idx=idx, mult=mult, add=add):
            h = args[0].clone()
            m, a = mult.to(h), add.to(h)
            h[..., idx] = m * h[..., idx] + a
            return (h, *args[1:])
        handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(pre))
    return handles


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation token ids of ``tokens`` (1, T)."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.model.generate(tokens, attention_mask=torch.ones_like(tokens),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               temperature=None, top_p=None, top_k=None,
                               pad_token_id=pad)
    return out[0, tokens.shape[1]:].tolist()


def steer(model, text: str, unit: Unit, iv: Intervention, values: NeuronValues | None = None,
          max_new_tokens: int = 24) -> Steered:
    """The clean and the steered greedy continuations of ``text``."""
    from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize

    tokens = tokenize(model, text, MAX_TOKENS)
    clean = generate(model, tokens, max_new_tokens)
    handles = _hooks(model, unit, iv, values)
    try:
        steered = generate(model, tokens, max_new_tokens)
    finally:
        for h in handles:
            h.remove()
    decode = model.tokenizer.decode
    return Steered(text, unit.name, str(iv), decode(clean), decode(steered), clean, steered)


def steer_intervention(params: SteerParams) -> Intervention:
    """The one intervention ``params`` choose."""
    if params.ablate != "none":
        return Intervention(params.ablate)
    if params.quantile is not None:
        return Intervention("set", quantile=params.quantile)
    if params.value is not None:
        return Intervention("set", value=float(params.value))
    return Intervention("boost", factor=float(params.scale))


def run_steer(lake, *, model, text: str, corpora=(), params: SteerParams | None = None,
              progress: Progress | None = None) -> Steered:
    """Greedy continuations of ``text``, clean and with a unit (``params.neurons`` or
    ``params.modules``) held under one intervention at every step. The lake is read
    only for modules and for values from the activation statistics (``corpora``)."""
    from circuit_atlas.compute.battery import activation_values
    from circuit_atlas.compute.models import loaded
    from circuit_atlas.lake.units import Unit, select_units

    params = params or SteerParams()
    progress = progress or Progress()
    iv = steer_intervention(params)
    model = loaded(model, params.device, params.dtype, "interventions", progress)
    corpora = as_corpora(corpora)
    opened = open_lake(lake) if (params.modules or iv.needs_stats) else None
    key = None
    if opened is not None:
        key = opened.reduced_corpus(model.name, corpora or None)
        corpora = corpora or key.split("+")
    units = select_units(opened, model.name, key, model.adapter.n_layers,
                         neurons=params.neurons, modules=params.modules, method=params.method)
    # the named units act together
    unit = units[0] if len(units) == 1 else Unit(
        "+".join(u.name for u in units), "module",
        tuple(x for u in units for x in u.layers), tuple(x for u in units for x in u.neurons))
    values = activation_values(opened, model.name, corpora, [unit]) if iv.needs_stats else None
    return steer(model, text, unit, iv, values, params.max_new_tokens)
