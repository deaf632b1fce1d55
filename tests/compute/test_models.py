"""Model loading: the embedded SmolLM2 end to end, and clear refusals."""

import numpy as np
import pytest
import torch

from circuit_atlas import CircuitAtlasError
from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.attribution import AttributionParams, attribute
from circuit_atlas.compute.models import DEFAULT_MODEL, load_model, resolve
from tests.factories import tiny_llama


def test_embedded_model_loads_from_the_cache(smollm2):
    a = smollm2.adapter
    assert smollm2.name == DEFAULT_MODEL and smollm2.revision.startswith("gguf-sha256:")
    assert (a.n_layers, a.d_model, a.n_neurons, a.embed.shape[0]) == (30, 576, 1536, 49152)
    name, folder, revision = resolve("smollm2")  # converted once: now a cached folder
    assert (folder / "circuit_atlas.json").is_file() and revision == smollm2.revision


def complete(g, rtol):
    rows = np.concatenate([np.arange(g.n_candidates),
                           np.arange(g.n_nodes - g.n_logits, g.n_nodes)])
    np.testing.assert_allclose(g.adjacency[rows].sum(1), g.read_values[rows], rtol=rtol,
                               atol=rtol * np.abs(g.read_values[rows]).max())


def test_capital_of_france_graph(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    g = attribute(smollm2.adapter, ids, AttributionParams(candidates=200))
    words = [smollm2.tokenizer.decode([int(t)]) for t in g.targets.tokens]
    assert words[0] == " Paris" and g.targets.probs[0] > 0.5
    assert g.n_candidates == 200 and np.count_nonzero(g.adjacency) > 1000
    complete(g, rtol=1e-4)


def test_float64_smollm2_is_complete_to_1e6():
    model = load_model("smollm2", dtype="float64")
    ids = model.tokenizer("Aspirin irreversibly inhibits the enzyme", return_tensors="pt")
    g = attribute(model.adapter, ids.input_ids, AttributionParams(candidates=100))
    complete(g, rtol=1e-6)


def test_unknown_models_are_refused():
    with pytest.raises(CircuitAtlasError, match="unknown model 'no-such-org/no-such-model'.*"
                                                "nothing is downloaded"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(CircuitAtlasError, match="missing.gguf: no such GGUF file"):
        load_model("/nowhere/missing.gguf")
    with pytest.raises(CircuitAtlasError, match="unknown dtype 'float8'"):
        load_model("smollm2", dtype="float8")


def test_unsupported_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CircuitAtlasError, match="model family 'gpt2' is not supported"):
        adapter_for(gpt2)
    biased = tiny_llama(dtype=torch.float32, mlp_bias=True)
    with pytest.raises(CircuitAtlasError, match="bias on layers.0.mlp.gate_proj.*affine"):
        adapter_for(biased)
    relu = tiny_llama(dtype=torch.float32, hidden_act="relu")
    with pytest.raises(CircuitAtlasError, match="activation 'relu'; supported: gelu, "):
        adapter_for(relu)


def test_an_exact_gelu_gate_runs_as_the_model_does():
    from circuit_atlas.compute.trace import forward

    model = tiny_llama(hidden_act="gelu")
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    assert adapter.act == "gelu"
    torch.testing.assert_close(forward(adapter, ids, relp=True).logits(adapter, slice(None)),
                               model(ids).logits, atol=1e-6, rtol=1e-6)
