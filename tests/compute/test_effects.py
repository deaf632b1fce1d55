"""Direct, indirect and total effects against forward passes of the Hugging Face model
itself (hooks), batched against one at a time, and the per-neuron summary."""

import numpy as np
import polars as pl
import pytest
import torch

from circuit_atlas import CircuitAtlasError
from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.effects import (
    clean_run,
    neuron_effects,
    prompt_effects,
    summarise,
)
from tests.factories import tiny_llama

TOKENS = torch.tensor([[3, 17, 42, 8, 29, 11, 5]])


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, n_layers=4)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "olmo2", "olmo3",
                                        "gemma2", "gemma3_text"])
def family_model(request):
    return tiny_llama(seed=3, n_layers=4, family=request.param)


def added(layer_module, post_norm: bool, part: str):
    """The module whose output a block adds to the residual: the sublayer itself, or
    in post-norm and sandwich families (OLMo, Gemma) the norm on its output."""
    if not post_norm:
        return getattr(layer_module, {"attn": "self_attn", "mlp": "mlp"}[part])
    return getattr(layer_module, {"attn": "post_attention_layernorm",
                                  "mlp": "post_feedforward_layernorm"}[part])


def hf_logits(model, patches):
    """Last-position logits of the HF model with forward hooks: ``patches`` maps a module
    to a function of its output tensor."""
    handles = []
    for module, fn in patches.items():
        def hook(mod, args, output, fn=fn):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(TOKENS).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def add_last(delta):
    def fn(out):
        out = out.clone()
        out[0, -1] += delta
        return out
    return fn


# The HF model computes its RMSNorms in float32 even for float64 weights, so it agrees
# with our float64 passes to ~1e-7 relative, not to float64 precision.
TOL = {"rtol": 1e-4, "atol": 5e-6}


def test_effects_equal_hooked_forward_passes(family_model):
    model = family_model
    adapter = adapter_for(model)
    run = clean_run(adapter, TOKENS)
    clean = hf_logits(model, {})
    torch.testing.assert_close(run.logits, clean, **TOL)
    for layer in range(adapter.n_layers):
        check_layer(model, adapter, run, clean, layer, np.array([0, 5, 17]))


def check_layer(model, adapter, run, clean, layer, index):
    layers = model.model.layers
    gemma = model.config.model_type.startswith("gemma")
    post = model.config.model_type.startswith("olmo") or gemma
    eff = neuron_effects(adapter, run, np.full(len(index), layer), index)
    # the clean outputs of every later attention and MLP, to freeze them
    captured = {added(layers[j], post, part): None for j in range(layer + 1, adapter.n_layers)
                for part in ("attn", "mlp")}

    def keep(part):
        def fn(out):
            captured[part] = out.clone()
            return out
        return fn

    raw = []  # the MLP's clean output before any post norm, last position
    handle = layers[layer].mlp.register_forward_hook(
        lambda m, args, out: raw.append(out[0, -1].clone()))
    hf_logits(model, {p: keep(p) for p in captured})
    handle.remove()
    frozen = {p: (lambda out, p=p: captured[p]) for p in captured}
    target = added(layers[layer], post, "mlp")
    largest = 0.0
    for b, n in enumerate(index):
        write = eff.activation[b] * model.model.layers[layer].mlp.down_proj.weight[:, n]
        if post:  # the norm on the MLP's output scales the neuron's share as in the clean run
            norm = layers[layer].post_feedforward_layernorm
            eps = norm.eps if gemma else norm.variance_epsilon
            weight = 1 + norm.weight if gemma else norm.weight  # Gemma applies 1 + w
            write = write * torch.rsqrt(raw[0].pow(2).mean() + eps) * weight
        total = hf_logits(model, {target: add_last(write)}) - clean
        largest = max(largest, float(total.abs().max()))
        torch.testing.assert_close(eff.total[b], total, **TOL)
        direct = hf_logits(model, {**frozen, target: add_last(write)}) - clean
        torch.testing.assert_close(eff.direct[b], direct, **TOL)
        torch.testing.assert_close(eff.direct[b] + eff.indirect[b], eff.total[b])
    assert largest > 1e-2  # real effects, far above the tolerance
    # the activation is the neuron's at the last position of the clean pass
    seen = []
    handle = layers[layer].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append(args[0][0, -1].clone()))
    hf_logits(model, {})
    handle.remove()
    torch.testing.assert_close(eff.activation, seen[0][index], **TOL)


def test_batched_equals_one_at_a_time(model):
    """Neurons of every layer in one pass give what each gives alone."""
    adapter = adapter_for(model)
    run = clean_run(adapter, TOKENS)
    layers = np.repeat(np.arange(adapter.n_layers), 12)
    index = np.tile(np.arange(0, 48, 4), adapter.n_layers)
    whole = neuron_effects(adapter, run, layers, index)
    for b in (0, 13, 30, len(layers) - 1):
        one = neuron_effects(adapter, run, layers[b:b + 1], index[b:b + 1])
        torch.testing.assert_close(whole.total[b], one.total[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(whole.direct[b], one.direct[0])
    last = layers == adapter.n_layers - 1  # nothing runs after the last layer
    torch.testing.assert_close(whole.direct[last], whole.total[last])
    chunked = prompt_effects(adapter, TOKENS, {1: np.arange(48), 3: np.arange(5)}, batch=7)
    full = prompt_effects(adapter, TOKENS, {1: np.arange(48), 3: np.arange(5)})
    for key in ("direct", "total", "prob_change"):
        np.testing.assert_allclose(chunked[key], full[key], rtol=1e-6)
    with pytest.raises(ValueError, match="sorted"):
        neuron_effects(adapter, run, np.array([2, 1]), np.array([0, 0]))


def test_metrics_and_summary_against_numpy(model):
    adapter = adapter_for(model)
    neurons = {0: np.arange(10), 2: np.array([3, 4])}
    cols = prompt_effects(adapter, TOKENS, neurons)
    run = clean_run(adapter, TOKENS)
    target = int(run.logits.argmax())
    assert (cols["target_token"] == target).all()
    eff = neuron_effects(adapter, run, np.zeros(10, int), np.arange(10))
    d = eff.direct[:, target].numpy()
    t = eff.total[:, target].numpy()
    np.testing.assert_allclose(cols["direct"][:10], d, rtol=1e-6)
    np.testing.assert_allclose(cols["indirect"][:10], t - d, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(cols["direct_ratio"][:10],
                               np.abs(d) / (np.abs(d) + np.abs(t - d)), rtol=1e-5)
    p0 = torch.softmax(run.logits, -1)[target].item()
    p1 = torch.softmax(run.logits + eff.total[4], -1)[target].item()
    assert cols["prob_change"][4] == pytest.approx(p1 - p0, rel=1e-5)
    # the distractor variant is target minus distractor
    dis = prompt_effects(adapter, TOKENS, neurons, target=target, distractor=1)
    np.testing.assert_allclose(dis["direct"][:10], d - eff.direct[:, 1].numpy(), rtol=1e-5)

    pairs = pl.DataFrame({
        "layer": [0] * 5 + [1] * 2, "neuron": [1] * 5 + [2] * 2,
        "direct_ratio": [0.1, 0.2, 0.9, 0.25, np.nan, 0.8, 0.75],
        "aligned": [True, False, True, True, False, True, True],
        "direct": [1.0] * 7, "indirect": [2.0] * 7, "total": [3.0] * 7})
    s = summarise(pairs).sort("layer").to_dicts()
    r = np.array([0.1, 0.2, 0.9, 0.25])
    assert s[0]["prompts"] == 5 and s[0]["der_mean"] == pytest.approx(r.mean())
    assert s[0]["der_std"] == pytest.approx(r.std(ddof=1))
    assert s[0]["der_median"] == pytest.approx(np.median(r))
    assert s[0]["der_class"] == "mixed" and s[0]["consistency"] == 0.0  # 0.36: none mixed
    assert s[0]["aligned_fraction"] == pytest.approx(3 / 5)
    assert s[1]["der_class"] == "logit-dominant" and s[1]["consistency"] == 1.0


def test_bad_layer(model):
    with pytest.raises(CircuitAtlasError, match="out of range"):
        prompt_effects(adapter_for(model), TOKENS, {9: np.array([0])})
