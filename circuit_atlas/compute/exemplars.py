"""Activation exemplars and statistics of every MLP neuron: the pure core.

Over the token positions a pass sees, for each neuron of a layer (its activation
h = SiLU(gate) * up, the graphs' activation):

* the top ``k`` positions by activation and the bottom ``k`` (most negative: gated
  activations are signed, and the negative side often means something else), each
  as (value, window, position);
* statistics: positions seen, sum and sum of squares (float64), positives, min, max,
  and a histogram over fixed bin edges (:data:`BIN_EDGES`), so that the state of two
  shards merges into the state of their union.

A :class:`LayerState` is built batch by batch (:meth:`LayerState.update`) and merged
(:func:`merge`). Ties are broken by (window, position), smallest first, so the top k
of a union is one set whatever the split and order of the shards: merging is
associative and order-independent (float sums up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

K = 20
# symmetric, finer near zero: where most activations of a gated MLP lie; 0, and
# BIN_STEPS geometric edges from BIN_LOW to BIN_HIGH on each side: 61 edges
BIN_LOW, BIN_HIGH, BIN_STEPS = 1e-3, 1e2, 30
_POS = np.concatenate([[0.0], np.geomspace(BIN_LOW, BIN_HIGH, BIN_STEPS)])
BIN_EDGES = np.concatenate([-_POS[:0:-1], _POS]).astype(np.float64)


@dataclass
class LayerState:
    """The mergeable state of one layer's neurons (``n`` of them) over some positions."""

    top_value: np.ndarray  # (n, k) float32, descending; -inf where fewer than k seen
    top_window: np.ndarray  # (n, k) int64; -1 where empty
    top_pos: np.ndarray  # (n, k) int32
    bottom_value: np.ndarray  # (n, k) float32, ascending; +inf where empty
    bottom_window: np.ndarray
    bottom_pos: np.ndarray
    count: int
    total: np.ndarray  # (n,) float64
    total_sq: np.ndarray  # (n,) float64
    positive: np.ndarray  # (n,) int64
    min: np.ndarray  # (n,) float32
    max: np.ndarray  # (n,) float32
    hist: np.ndarray  # (n, len(BIN_EDGES) + 1) int64: below the first edge .. above the last

    @classmethod
    def empty(cls, n: int, k: int = K) -> LayerState:
        def full(v, dtype):
            return np.full((n, k), v, dtype)
        return cls(full(-np.inf, np.float32), full(-1, np.int64), full(-1, np.int32),
                   full(np.inf, np.float32), full(-1, np.int64), full(-1, np.int32), 0,
                   np.zeros(n), np.zeros(n), np.zeros(n, np.int64),
                   np.full(n, np.inf, np.float32), np.full(n, -np.inf, np.float32),
                   np.zeros((n, len(BIN_EDGES) + 1), np.int64))

    @property
    def k(self) -> int:
        return self.top_value.shape[1]

    def update(self, acts: np.ndarray, window: np.ndarray, pos: np.ndarray) -> LayerState:
        """This state with positions added: ``acts`` (m, n) activations of the n neurons
        at m positions (padding already dropped), ``window``/``pos`` (m,) their ids."""
        return merge(self, from_positions(acts, window, pos, self.k))

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def std(self) -> np.ndarray:
        mean = self.mean()
        return np.sqrt(np.maximum(self.total_sq / max(self.count, 1) - mean * mean, 0.0))


def select_k(values: np.ndarray, window: np.ndarray, pos: np.ndarray, k: int,
            largest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the k entries with the largest (or smallest) value, ties by (window,
    pos) ascending; empty slots (window -1) always last."""
    empty = window < 0
    v = values.astype(np.float64)
    key = np.where(empty, np.inf, -v if largest else v)
    # lexsort: last key is primary. Empty slots carry window -1: order them last via key.
    order = np.lexsort((pos, np.where(empty, np.iinfo(np.int64).max, window), key), axis=1)
    order = order[:, :k]
    take = np.take_along_axis
    return take(values, order, 1), take(window, order, 1), take(pos, order, 1)


def from_positions(acts: np.ndarray, window: np.ndarray, pos: np.ndarray, k: int = K
                   ) -> LayerState:
    """The state of ``acts`` (m positions x n neurons) alone."""
    acts = np.asarray(acts)
    m, n = acts.shape
    a = acts.T.astype(np.float32)  # (n, m)
    w = np.broadcast_to(np.asarray(window, np.int64), (n, m))
    p = np.broadcast_to(np.asarray(pos, np.int32), (n, m))
    pad = max(k - m, 0)
    if pad:
        a_top = np.pad(a, ((0, 0), (0, pad)), constant_values=-np.inf)
        a_bot = np.pad(a, ((0, 0), (0, pad)), constant_values=np.inf)
        w = np.pad(w, ((0, 0), (0, pad)), constant_values=-1)
        p = np.pad(p, ((0, 0), (0, pad)), constant_values=-1)
    else:
        a_top = a_bot = a
    top = select_k(a_top, w, p, k, largest=True)
    bottom = select_k(a_bot, w, p, k, largest=False)
    a64 = acts.astype(np.float64)
    hist = np.zeros((n, len(BIN_EDGES) + 1), np.int64)
    bins = np.searchsorted(BIN_EDGES, a64.T, side="right")  # (n, m) in 0..len(edges)
    np.add.at(hist, (np.repeat(np.arange(n), m), bins.ravel()), 1)
    return LayerState(*top, *bottom, m, a64.sum(0), (a64 * a64).sum(0),
                      (acts > 0).sum(0).astype(np.int64),
                      acts.min(0).astype(np.float32) if m else np.full(n, np.inf, np.float32),
                      acts.max(0).astype(np.float32) if m else np.full(n, -np.inf, np.float32),
                      hist)


def merge(a: LayerState, b: LayerState) -> LayerState:
    """The state of the union of two disjoint sets of positions."""
    k = a.k

    def both(x, y):
        return np.concatenate([x, y], axis=1)

    top = select_k(both(a.top_value, b.top_value), both(a.top_window, b.top_window),
                  both(a.top_pos, b.top_pos), k, largest=True)
    bottom = select_k(both(a.bottom_value, b.bottom_value),
                     both(a.bottom_window, b.bottom_window),
                     both(a.bottom_pos, b.bottom_pos), k, largest=False)
    return LayerState(*top, *bottom, a.count + b.count, a.total + b.total,
                      a.total_sq + b.total_sq, a.positive + b.positive,
                      np.minimum(a.min, b.min), np.maximum(a.max, b.max), a.hist + b.hist)


STATE_COLUMNS = ("top_value", "top_window", "top_pos", "bottom_value", "bottom_window",
                 "bottom_pos")
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def state_table(layer: int, state: LayerState) -> pa.Table:
    """The rows (one per neuron) of a layer's state, as the activation_state table."""
    n, k = state.top_value.shape

    def lists(a: np.ndarray, type_: pa.DataType) -> pa.Array:
        a = np.ascontiguousarray(a)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), type_), a.shape[1]
                                                 ).cast(pa.list_(type_))

    cols = {"layer": pa.array(np.full(n, layer, np.int16)),
            "neuron": pa.array(np.arange(n, dtype=np.int32))}
    for name in STATE_COLUMNS:
        a = getattr(state, name)
        cols[name] = lists(a, {np.float32: pa.float32(), np.int64: pa.int64(),
                               np.int32: pa.int32()}[a.dtype.type])
    cols.update(count=pa.array(np.full(n, state.count, np.int64)), total=state.total,
                total_sq=state.total_sq, positive=state.positive, min=state.min,
                max=state.max, hist=lists(state.hist, pa.int64()))
    return pa.table(cols)


def state_from_table(table: pa.Table) -> LayerState:
    """A layer's state from its activation_state rows (sorted by neuron here)."""
    table = table.sort_by("neuron")
    n = table.num_rows
    if n and not np.array_equal(table.column("neuron").to_numpy(), np.arange(n)):
        raise ValueError("activation state rows must hold neurons 0..n-1 once each")

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(n, -1) if n else np.zeros((0, 0))

    def vector(name: str) -> np.ndarray:
        return table.column(name).to_numpy()

    counts = vector("count")
    if n and (counts != counts[0]).any():
        raise ValueError("activation state rows of one layer disagree on the positions seen")
    return LayerState(*(matrix(c) for c in STATE_COLUMNS), int(counts[0]) if n else 0,
                      vector("total"), vector("total_sq"), vector("positive"),
                      vector("min"), vector("max"), matrix("hist"))


def quantiles(state: LayerState, qs: tuple[float, ...] = QUANTILES) -> np.ndarray:
    """(n, len(qs)) activation quantiles read off the histogram: linear within a bin;
    the open bins at either end are bounded by the neuron's min and max."""
    n = state.hist.shape[0]
    out = np.full((n, len(qs)), np.nan, np.float32)
    if state.count == 0:
        return out
    cum = np.cumsum(state.hist, axis=1)
    lo = np.concatenate([[-np.inf], BIN_EDGES])  # bin b spans lo[b] .. hi[b]
    hi = np.concatenate([BIN_EDGES, [np.inf]])
    for j, q in enumerate(qs):
        target = q * state.count
        b = np.minimum((cum < target).sum(1), state.hist.shape[1] - 1)  # first bin reaching it
        rows = np.arange(n)
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        inside = state.hist[rows, b]
        a = np.maximum(lo[b], state.min.astype(np.float64))
        z = np.minimum(hi[b], state.max.astype(np.float64))
        frac = np.where(inside > 0, (target - before) / np.maximum(inside, 1), 0.0)
        out[:, j] = a + np.clip(frac, 0, 1) * (z - a)
    return out
