"""Static projections against a float64 reference computed in full."""

import numpy as np
import polars as pl
import pytest
import torch

from circuit_atlas import CircuitAtlasError
from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.projections import ProjectionParams, Projector, project
from tests.factories import tiny_llama


def reference(adapter, layer, norm):
    """Full vocab x neurons matrices in float64, straight from the formulas and the HF
    modules (the embedding as the model scales it, its own activation function)."""
    a, blk = adapter, adapter.blocks[layer]
    f, hf = torch.float64, adapter.model.model
    mods = hf.layers[layer]
    gemma = a.family.startswith("gemma")

    def weight(norm_module):  # Gemma stores w and applies 1 + w
        return (1 + norm_module.weight if gemma else norm_module.weight).to(f)

    down, unembed = blk.down.to(f), a.unembed.to(f)
    embed = hf.embed_tokens(torch.arange(unembed.shape[0])).to(f)
    if a.family == "olmo2" or gemma:  # the MLP's output norm weighs what the neuron writes
        down = weight(mods.post_feedforward_layernorm)[:, None] * down
    if norm:
        out = unembed @ (weight(hf.norm)[:, None] * down)
        rms = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + a.eps)
        # post-norm (OLMo): the MLP reads the raw residual
        x = (embed if a.family == "olmo2" else rms * weight(
            mods.pre_feedforward_layernorm if gemma else mods.post_attention_layernorm))
    else:
        out, x = unembed @ down, embed
    inp = mods.mlp.act_fn(x @ blk.gate.to(f).T) * (x @ blk.up.to(f).T)
    return out.T, inp.T  # (N, V)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("family", ["llama", "olmo2", "gemma2", "gemma3_text"])
def test_top_k_agree_with_float64_reference(norm, dtype, family):
    adapter = adapter_for(tiny_llama(seed=1, vocab=400, neurons=40, n_layers=2, family=family))
    k = 6
    projector = Projector(adapter, ProjectionParams(k=k, norm=norm, dtype=dtype, margin=4))
    projector.chunk = 16  # several chunks, one partial
    for layer in range(2):
        cols = projector.layer(layer)
        df = pl.DataFrame(cols)
        for kind, ref in enumerate(reference(adapter, layer, norm)):
            for sign in (1, -1):
                got = df.filter((pl.col("kind") == kind) & (pl.col("sign") == sign)).sort(
                    "neuron", "rank")
                top = (ref if sign == 1 else -ref).topk(k, dim=1)
                want_ids = top.indices.numpy().ravel()
                want_vals = (sign * top.values).numpy().ravel()
                np.testing.assert_array_equal(got["token_id"].to_numpy(), want_ids)
                np.testing.assert_allclose(got["value"].to_numpy(), want_vals, rtol=1e-6)
        norms = df.filter(pl.col("kind") == 0).group_by("neuron").agg(pl.col("write_norm").first())
        down = adapter.blocks[layer].down
        if family != "llama":
            down = down * adapter.blocks[layer].mlp_post_norm[:, None]
        np.testing.assert_allclose(
            norms.sort("neuron")["write_norm"].to_numpy(), down.norm(dim=0).numpy())
        assert df.filter(pl.col("kind") == 1)["write_norm"].is_nan().all()


def test_layers_checked_and_params_validated():
    adapter = adapter_for(tiny_llama(n_layers=2))
    with pytest.raises(CircuitAtlasError, match="out of range"):
        project(adapter, ProjectionParams(), [5])
    with pytest.raises(CircuitAtlasError, match="k must be"):
        ProjectionParams(k=0)
    seen = []
    project(adapter, ProjectionParams(k=3), None, lambda layer, cols: seen.append(layer))
    assert seen == [0, 1]
