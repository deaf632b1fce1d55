"""The exemplar core against brute force: top and bottom k with ties, statistics and
histograms; merging is associative and order-independent."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_atlas.compute.exemplars import BIN_EDGES, LayerState, from_positions, merge


def brute(acts, window, pos, k):
    """Per neuron, the sorted lists a person would write down."""
    out = []
    for j in range(acts.shape[1]):
        rows = [(float(np.float32(acts[i, j])), int(window[i]), int(pos[i]))
                for i in range(len(acts))]
        top = sorted(rows, key=lambda r: (-r[0], r[1], r[2]))[:k]
        bottom = sorted(rows, key=lambda r: (r[0], r[1], r[2]))[:k]
        out.append((top, bottom))
    return out


def entries(state, j, which):
    v, w, p = (getattr(state, f"{which}_{x}")[j] for x in ("value", "window", "pos"))
    return [(float(a), int(b), int(c)) for a, b, c in zip(v, w, p, strict=True) if b >= 0]


def corpus(rng, m, n, ties=True):
    acts = rng.normal(size=(m, n))
    if ties:
        acts = np.round(acts, 1)  # many equal values: the tie order must be fixed
    window = rng.integers(0, 5, m)
    pos = np.arange(m) % 7  # (window, pos) pairs may repeat across rows only with pos
    keys = np.unique(np.stack([window, pos], 1), axis=0)
    window, pos = keys[:, 0], keys[:, 1]
    return acts[:len(window)], window, pos


@pytest.mark.parametrize("m,k", [(30, 5), (3, 5), (1, 1), (40, 40)])
def test_one_batch_equals_brute_force(m, k):
    rng = np.random.default_rng(m)
    acts, window, pos = corpus(rng, m, 6)
    state = from_positions(acts, window, pos, k)
    for j, (top, bottom) in enumerate(brute(acts, window, pos, k)):
        assert entries(state, j, "top") == top and entries(state, j, "bottom") == bottom
    a = acts.astype(np.float64)
    assert state.count == len(acts)
    np.testing.assert_allclose(state.mean(), a.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.std(), a.std(0), rtol=1e-9, atol=1e-12)
    assert (state.positive == (a > 0).sum(0)).all()
    assert np.array_equal(state.min, a.min(0).astype(np.float32))
    assert np.array_equal(state.max, a.max(0).astype(np.float32))
    hist = np.stack([np.histogram(a[:, j], bins=np.concatenate(
        [[-np.inf], BIN_EDGES, [np.inf]]))[0] for j in range(a.shape[1])])
    assert np.array_equal(hist, state.hist)  # bins [e_i, e_i+1), as numpy's


def test_histogram_bins_by_right_edges():
    state = from_positions(np.array([[0.0], [-1e-4], [5e-4], [1e3], [-1e3]]),
                           np.arange(5), np.zeros(5, np.int32), 2)
    zero = int(np.searchsorted(BIN_EDGES, 0.0, side="right"))
    assert state.hist[0, zero] == 2  # 0 and 5e-4 lie in [0, 1e-3)
    assert state.hist[0, zero - 1] == 1  # -1e-4 in [-1e-3, 0)
    assert state.hist[0, -1] == 1 and state.hist[0, 0] == 1  # beyond the outer edges


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 60), k=st.integers(1, 8),
       cuts=st.lists(st.floats(0, 1), max_size=5), order=st.randoms(use_true_random=False))
def test_merge_of_any_split_in_any_order_equals_one_pass(seed, m, k, cuts, order):
    rng = np.random.default_rng(seed)
    acts, window, pos = corpus(rng, m, 4)
    whole = from_positions(acts, window, pos, k)
    idx = rng.permutation(len(acts))
    bounds = sorted({int(c * len(idx)) for c in cuts} | {0, len(idx)})
    parts = [from_positions(acts[idx[a:b]], window[idx[a:b]], pos[idx[a:b]], k)
             for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    order.shuffle(parts)
    got = LayerState.empty(acts.shape[1], k)
    for p in parts:
        got = merge(got, p) if order.random() < 0.5 else merge(p, got)
    for name in ("top_value", "top_window", "top_pos", "bottom_value", "bottom_window",
                 "bottom_pos", "positive", "min", "max", "hist"):
        assert np.array_equal(getattr(got, name), getattr(whole, name)), name
    assert got.count == whole.count
    np.testing.assert_allclose(got.total, whole.total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.total_sq, whole.total_sq, rtol=1e-12, atol=1e-12)


def test_update_batch_by_batch_equals_one_pass():
    rng = np.random.default_rng(1)
    acts, window, pos = corpus(rng, 50, 3)
    state = LayerState.empty(3, 4)
    for a in range(0, len(acts), 7):
        state = state.update(acts[a:a + 7], window[a:a + 7], pos[a:a + 7])
    whole = from_positions(acts, window, pos, 4)
    assert np.array_equal(state.top_window, whole.top_window)
    assert np.array_equal(state.bottom_value, whole.bottom_value)
