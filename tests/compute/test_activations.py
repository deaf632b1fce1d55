"""The activation pass on SmolLM2 against our written-out forward (compute.trace), an
independent implementation of the same activations: every exemplar's value is the
activation at its window and position, and the states equal brute force over a full
activation dump."""

import numpy as np
import pytest
import torch

from circuit_atlas.compute.activations import activation_pass, batches, text_windows
from circuit_atlas.compute.exemplars import from_positions
from circuit_atlas.compute.trace import forward
from circuit_atlas.errors import CircuitAtlasError


def test_windows_cover_a_text_and_end_at_its_end():
    ids = list(range(50))
    ws = text_windows("d", ids, context=16, stride=12)
    assert len({w.window for w in ws}) == len(ws) and min(w.window for w in ws) >= 0
    assert all(len(w.tokens) == 16 for w in ws) and ws[-1].tokens[-1] == 49
    # every position is counted once: in the first window that holds it
    counted = [w.start + i for w in ws for i in range(w.skip, len(w.tokens))]
    assert sorted(counted) == ids
    ws = text_windows("d", ids, context=16, stride=12, skip_first=2)  # not the text's first two
    assert sorted(w.start + i for w in ws for i in range(w.skip, len(w.tokens))) == ids[2:]
    assert [w.tokens for w in text_windows("d", ids[:5], 16, 12)] == [tuple(ids[:5])]
    with pytest.raises(CircuitAtlasError, match="stride"):
        text_windows("d", ids, context=8, stride=9)
    some = ws + text_windows("e", ids[:5], 16, 12) + text_windows("f", ids[:14], 16, 12)
    groups = list(batches(some, batch_tokens=40))
    assert sorted(w.window for g in groups for w in g) == sorted(w.window for w in some)
    for g in groups:  # padded to the longest, within the budget and the padding share
        size = len(g) * max(len(w.tokens) for w in g)
        assert len(g) == 1 or size <= 40
        assert size - sum(len(w.tokens) for w in g) <= 0.25 * size


@pytest.fixture(scope="module")
def windows(smollm2):
    texts = ["The patient was given a dose of", "Paris is the capital of",
             "def add(a, b):\n    return", "She opened the door and saw " * 4]
    out = []
    for i, t in enumerate(texts):
        ids = smollm2.tokenizer(t).input_ids
        out += text_windows(f"t{i}", ids, context=12, stride=8)
    return out


def dump(smollm2, windows):
    """Every activation of every layer at every position: (positions, neurons) each."""
    acts = {layer: [] for layer in range(smollm2.adapter.n_layers)}
    where = []
    with torch.no_grad():
        for w in windows:
            trace = forward(smollm2.adapter, torch.tensor([w.tokens]))
            for layer, a in enumerate(trace.act):
                acts[layer].append(a[0].double().numpy())
            where += [(w.window, p) for p in range(len(w.tokens))]
    keep = np.concatenate([np.arange(len(w.tokens)) >= w.skip for w in windows])
    acts = {k: np.concatenate(v)[keep] for k, v in acts.items()}
    return acts, np.array(where)[keep]


def test_exemplars_and_statistics_equal_the_written_out_forward(smollm2, windows):
    states = activation_pass(smollm2, windows, k=5, batch_tokens=30)
    acts, where = dump(smollm2, windows)
    at = {(int(w), int(p)): i for i, (w, p) in enumerate(where)}
    assert sorted(states) == list(range(smollm2.adapter.n_layers))
    for layer in (0, 11, smollm2.adapter.n_layers - 1):
        s, a = states[layer], acts[layer]
        # each exemplar's value is the activation at its (window, position)
        rows = np.array([[at[(int(w), int(p))] for w, p in zip(ws, ps, strict=True)]
                         for ws, ps in zip(s.top_window, s.top_pos, strict=True)])
        np.testing.assert_allclose(s.top_value, np.take_along_axis(a.T, rows, 1),
                                   rtol=1e-4, atol=1e-4)
        # and they are the top k: brute force over the dump, values compared
        brute = from_positions(a, where[:, 0], where[:, 1], 5)
        np.testing.assert_allclose(s.top_value, brute.top_value, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.bottom_value, brute.bottom_value, rtol=1e-4, atol=1e-4)
        agree = (s.top_window == brute.top_window) & (s.top_pos == brute.top_pos)
        assert agree.mean() > 0.99  # only near-ties may swap places
        assert s.count == len(a)
        np.testing.assert_allclose(s.mean(), a.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.std(), a.std(0), rtol=1e-3, atol=1e-5)
        assert np.abs(s.hist - brute.hist).sum() <= 0.001 * a.size  # values on a bin edge


def test_splitting_the_windows_merges_to_the_same_state(smollm2, windows):
    from circuit_atlas.compute.exemplars import merge

    whole = activation_pass(smollm2, windows, k=4, batch_tokens=64)
    half = len(windows) // 2
    a = activation_pass(smollm2, windows[:half], k=4, batch_tokens=64)
    b = activation_pass(smollm2, windows[half:], k=4, batch_tokens=64)
    for layer in (3, 20):
        m, w = merge(b[layer], a[layer]), whole[layer]
        # other batches, other float rounding: values agree closely, places but for
        # near-ties exactly
        np.testing.assert_allclose(m.top_value, w.top_value, rtol=1e-5, atol=1e-5)
        assert ((m.top_window == w.top_window) & (m.top_pos == w.top_pos)).mean() > 0.99
        assert m.count == w.count and np.abs(m.hist - w.hist).sum() <= 0.001 * w.hist.sum()
