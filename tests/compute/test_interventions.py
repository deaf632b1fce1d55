"""Interventions against the Hugging Face model's own forward with hooks on down_proj's
input, one at a time; batched against alone; a planted circuit found necessary and
sufficient and a decoy not."""

import numpy as np
import pytest
import torch

from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.interventions import (
    Edits,
    clean_pass,
    measures,
    predicted_direction,
    predicted_tokens,
    rerun,
)
from tests.factories import tiny_llama

TOKENS = torch.tensor([[3, 17, 42, 8, 29, 11, 5]])
COUNTER = torch.tensor([[3, 17, 40, 8, 29, 12, 5]])
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "gemma2", "gemma3_text"]
TOL = {"rtol": 1e-4, "atol": 5e-6}  # HF's RMSNorm runs in float32 on float64 weights


def hooked(model, tokens, edits: list[tuple[int, int, float, torch.Tensor, torch.Tensor]],
           watch=None):
    """Last-position logits of the HF model with ``h[n] = mult * h[n] + add[t]`` where
    ``where[t]``, for (layer, neuron, mult, add, where) edits, applied to down_proj's input;
    and the activations of ``watch`` [(layer, neuron)] after the edits."""
    layers, handles, seen = model.model.layers, [], {}
    for j in range(len(layers)):
        mine = [e for e in edits if e[0] == j]
        mine_watch = [w for w in (watch or []) if w[0] == j]

        def pre(mod, args, mine=mine, mine_watch=mine_watch):
            h = args[0].clone()
            for _, n, mult, add, where in mine:
                h[0, :, n] = torch.where(where, mult * h[0, :, n] + add, h[0, :, n])
            for w in mine_watch:
                seen[w] = h[0, :, w[1]].clone()
            return (h,)
        handles.append(layers[j].mlp.down_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return model(tokens).logits[0, -1], seen
    finally:
        for handle in handles:
            handle.remove()


def build(rows: list[list[tuple[int, int, float, torch.Tensor, torch.Tensor]]],
          dtype=torch.float64) -> Edits:
    flat = [(r, *e) for r, row in enumerate(rows) for e in row]
    return Edits(row=np.array([f[0] for f in flat]), layer=np.array([f[1] for f in flat]),
                 neuron=np.array([f[2] for f in flat]),
                 mult=torch.tensor([f[3] for f in flat], dtype=dtype),
                 add=torch.stack([f[4] for f in flat]), where=torch.stack([f[5] for f in flat]),
                 rows=len(rows))


def battery(adapter, clean, counter):
    """Rows of every kind: zero and mean ablation, boost, set, patch; at every position
    and at the last; single neurons of every layer and a three-layer circuit."""
    T = clean.length
    every, last = torch.ones(T, dtype=torch.bool), torch.arange(T) == T - 1
    zeros = torch.zeros(T, dtype=torch.float64)
    L = adapter.n_layers
    rows = []
    for layer in range(L):
        rows.append([(layer, 5, 0.0, zeros, every)])  # zero ablation
        rows.append([(layer, 7, 0.0, zeros + 0.3, every)])  # mean ablation / set
        rows.append([(layer, 11, 4.0, zeros, every)])  # boost x4
        rows.append([(layer, 2, 3.0, zeros, last)])  # boost at the last position
        rows.append([(layer, 9, 0.0, counter.act[layer][:, 9], every)])  # patch
    rows.append([(0, 1, 0.0, zeros, every), (1, 4, 0.0, zeros, every),
                 (L - 1, 3, 5.0, zeros, every)])  # a circuit over three layers
    rows.append([(1, n, 0.0, zeros, last) for n in range(0, 40, 3)])  # a module of one layer
    return rows


def test_interventions_equal_hooked_forward():
    for family in FAMILIES:
        model = tiny_llama(seed=4, n_layers=3, family=family)
        adapter = adapter_for(model)
        clean = clean_pass(adapter, TOKENS)
        counter = clean_pass(adapter, COUNTER)
        torch.testing.assert_close(clean.logits, hooked(model, TOKENS, [])[0], **TOL)
        rows = battery(adapter, clean, counter)
        watch = {0: np.array([1, 20]), 2: np.array([3, 30])}
        logits, seen = rerun(adapter, clean, build(rows), watch)
        largest = 0.0
        for b, row in enumerate(rows):
            want, want_seen = hooked(model, TOKENS, row,
                                     [(j, n) for j in watch for n in watch[j]])
            torch.testing.assert_close(logits[b], want, **TOL, msg=f"{family} row {b}")
            largest = max(largest, float((want - clean.logits).abs().max()))
            for j, idx in watch.items():
                for k, n in enumerate(idx):
                    rerun_positions = want_seen[(j, n)][-seen[j].shape[1]:]
                    torch.testing.assert_close(seen[j][b, :, k], rerun_positions, **TOL)
        assert largest > 1e-2, family  # real changes, far above the tolerance


def test_batched_equals_alone_and_measures_against_numpy():
    model = tiny_llama(seed=5, n_layers=4)
    adapter = adapter_for(model)
    clean = clean_pass(adapter, TOKENS)
    rows = battery(adapter, clean, clean_pass(adapter, COUNTER))
    whole, _ = rerun(adapter, clean, build(rows))
    for b in (0, 3, 9, len(rows) - 2, len(rows) - 1):
        alone, _ = rerun(adapter, clean, build([rows[b]]))
        torch.testing.assert_close(whole[b], alone[0], rtol=1e-10, atol=1e-12)
    # a row that changes nothing gives the clean logits
    T = clean.length
    none, _ = rerun(adapter, clean, build([[(2, 3, 1.0, torch.zeros(T, dtype=torch.float64),
                                            torch.ones(T, dtype=torch.bool))]]))
    torch.testing.assert_close(none[0], clean.logits, rtol=1e-10, atol=1e-12)

    target, distractor = int(clean.logits.argmax()), 1
    pred = predicted_direction(adapter, clean, build(rows))
    tokens = predicted_tokens(adapter, clean, build(rows), cache := {})
    assert cache  # single-neuron rows: their projection's top, signed by the edit
    for b in range(len(rows)):  # the same sets as the direction's top (ties aside)
        want = set(pred[b].topk(10).indices.tolist())
        if pred[b].abs().max() > 1e-9:
            assert set(tokens[b].tolist()) == want, b
    m = measures(clean.logits, whole, target, distractor, tokens)
    lg, lc = whole.numpy(), clean.logits.numpy()

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p, p0 = softmax(lg), softmax(lc)
    np.testing.assert_allclose(m["logit_delta"], lg[:, target] - lc[target], rtol=1e-9)
    np.testing.assert_allclose(m["prob_delta"], p[:, target] - p0[target], atol=1e-12)
    np.testing.assert_allclose(m["kl"], (p0 * (np.log(p0) - np.log(p))).sum(-1), atol=1e-10)
    np.testing.assert_allclose(m["logit_diff_delta"],
                               (lg[:, target] - lg[:, 1]) - (lc[target] - lc[1]), rtol=1e-9)
    assert (m["top1_flip"] == (lg.argmax(-1) != lc.argmax())).all()
    centred = (lg - lc) - (lg - lc).mean(-1, keepdims=True)
    b = int(np.argmax(m["kl"]))
    assert set(m["moved_tokens"][b, :5]) == set(np.argsort(-centred[b])[:5])
    np.testing.assert_allclose(m["moved_deltas"][b, 5:], np.sort(centred[b])[:5][::-1] * 0
                               + centred[b][m["moved_tokens"][b, 5:]], rtol=1e-9)
    top = np.argsort(-pred.numpy()[b])[:10]
    np.testing.assert_allclose(m["predicted_delta"][b], centred[b, top].mean(), rtol=1e-9)
    moved = np.abs(p[b] - p0)
    np.testing.assert_allclose(m["specificity"][b], moved[top].sum() / moved.sum(), rtol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # pre-norm: one norm in the way
def test_predicted_direction_is_the_direct_path(family):
    """A small boost at the last position of the last layer acts through the final norm
    only: the logit change is the output projection's prediction times the norm's scale,
    plus the clean logits times the scale's relative change (to first order)."""
    model = tiny_llama(seed=6, n_layers=2, family=family)
    adapter = adapter_for(model)
    clean = clean_pass(adapter, TOKENS)
    T = clean.length
    last = torch.arange(T) == T - 1
    rows = [[(1, n, 1.001, torch.zeros(T, dtype=torch.float64), last)] for n in (3, 8)]
    logits, _ = rerun(adapter, clean, build(rows))
    pred = predicted_direction(adapter, clean, build(rows))
    for b in range(2):
        delta = (logits[b] - clean.logits).numpy()
        basis = np.stack([pred[b].numpy(), clean.logits.numpy()], 1)
        (alpha, _), *_ = np.linalg.lstsq(basis, delta, rcond=None)
        residual = delta - basis @ np.linalg.lstsq(basis, delta, rcond=None)[0]
        assert alpha > 0 and np.abs(residual).max() < 1e-3 * np.abs(delta).max()


def test_module_on_module_equals_hooked_forward():
    """Ablating one module, the other module's mean |activation| as the hooked model
    computes it."""
    from circuit_atlas.compute.battery import Intervention, prompt_battery
    from circuit_atlas.lake.units import Unit

    model = tiny_llama(seed=7, n_layers=3)
    adapter = adapter_for(model)
    a = Unit("m:1", "module", (0, 0, 1), (3, 9, 4))
    b = Unit("m:2", "module", (1, 2, 2), (8, 1, 30))
    cols, circuits = prompt_battery(adapter, TOKENS, [a, b], [Intervention("zero")])
    assert {(c["unit"], c["other"]) for c in circuits} == {(0, 1), (1, 0)}
    T = TOKENS.shape[1]
    for c in circuits:
        ablated, other = (a, b) if c["unit"] == 0 else (b, a)
        edits = [(j, n, 0.0, torch.zeros(T, dtype=torch.float64), torch.ones(T, dtype=torch.bool))
                 for j, n in zip(ablated.layers, ablated.neurons, strict=True)]
        watch = list(zip(other.layers, other.neurons, strict=True))
        _, seen = hooked(model, TOKENS, edits, watch)
        _, clean_seen = hooked(model, TOKENS, [], watch)
        want = torch.stack([seen[w] for w in watch]).abs().mean()
        assert c["intervened"] == pytest.approx(float(want), rel=1e-5)
        assert c["clean"] == pytest.approx(float(torch.stack([clean_seen[w] for w in watch])
                                                 .abs().mean()), rel=1e-5)
    assert len(cols["unit"]) == 2 and not np.isnan(cols["kl"]).any()


def test_smollm2_sampled_neurons_equal_hooked_forward(smollm2):
    """The real model in float32: sampled neurons of four layers, ablated at every
    position, boosted at the last, and a module of two layers."""
    adapter = smollm2.adapter
    tokens = smollm2.tokenizer("Insulin is produced by the", return_tensors="pt").input_ids
    clean = clean_pass(adapter, tokens)
    T = clean.length
    every, last = torch.ones(T, dtype=torch.bool), torch.arange(T) == T - 1
    zeros = torch.zeros(T)
    rng = np.random.default_rng(0)
    rows = []
    for layer in (0, 9, 17, 29):
        n = int(rng.integers(adapter.n_neurons))
        rows += [[(layer, n, 0.0, zeros, every)], [(layer, n, 4.0, zeros, last)]]
    rows.append([(3, 100, 0.0, zeros, every), (20, 7, 0.0, zeros + 0.5, every)])
    logits, _ = rerun(adapter, clean, build(rows, torch.float32))
    for b, row in enumerate(rows):
        want, _ = hooked(smollm2.model, tokens, row)
        torch.testing.assert_close(logits[b], want, rtol=1e-4, atol=3e-4)
