"""Quantile samples and in-context token means, from a fixed random subset of the
windows: what a label scorer needs besides the top contexts.

* **Quantile samples** (delphi's sampling): for each neuron, a few contexts from each
  decile of its positive activations (bins 0..9, strongest last) and from where it is
  near zero (bin -1: at most :data:`NEAR_ZERO` of its largest absolute activation),
  the negatives a scorer shows beside the exemplars. The deciles come from the
  neuron's histogram over every token; the samples from the sample windows, chosen
  per neuron by a hash of (window, position, neuron), so different neurons get
  different contexts and the choice does not depend on how the windows were batched.
* **Token means**: per neuron, the mean activation at each token of the vocabulary
  seen at least :data:`MIN_COUNT` times in the sample, its top tokens, and the rank
  correlation of those means with the neuron's static input projection (what the
  token alone would do), the comparison the original atlas asked for.

The sample windows are those with the smallest window ids (hashes: a uniform random
subset) up to a token budget, a function of the corpus alone, so a run after adding
texts gives what a run from scratch gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from circuit_atlas.compute.activations import (
    Window,
    _mlp_inputs,
    batch_places,
    batches,
    padded,
)
from circuit_atlas.compute.exemplars import BIN_EDGES, LayerState
from circuit_atlas.compute.models import LoadedModel

DECILES = 10
SAMPLES = 3  # contexts per neuron and bin
NEAR_ZERO = 0.01
MIN_COUNT = 3  # occurrences of a token in the sample before its mean counts
TOP_TOKENS = 10
BINS = DECILES + 1  # bin -1 (near zero) at index 0, deciles at 1..10
_NONE = np.iinfo(np.int64).max


def sample_windows(windows: list[Window], tokens: int) -> list[Window]:
    """The windows with the smallest ids, until their counted tokens reach ``tokens``."""
    out, total = [], 0
    for w in sorted(windows, key=lambda w: w.window):
        if total >= tokens:
            break
        out.append(w)
        total += len(w.tokens) - w.skip
    return out


def bounds(state: LayerState) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron: the 9 inner decile edges of its positive activations (read off the
    histogram, linear within a bin) and its near-zero threshold."""
    n = state.hist.shape[0]
    zero = NEAR_ZERO * np.maximum(np.abs(state.max), np.abs(state.min)).astype(np.float64)
    zero = np.where(np.isfinite(zero), zero, 0.0)
    first = int(np.searchsorted(BIN_EDGES, 0.0, side="right"))  # the bin from 0 up
    hist = state.hist[:, first:].astype(np.float64)  # bins [0, e1), [e1, e2), ... [eK, inf)
    lo = BIN_EDGES[first - 1:]
    hi = np.concatenate([BIN_EDGES[first:], [np.inf]])
    cum = np.cumsum(hist, axis=1)
    total = cum[:, -1]
    rows = np.arange(n)
    edges = np.zeros((n, DECILES - 1), np.float32)
    for j in range(1, DECILES):
        target = total * j / DECILES
        b = np.minimum((cum < target[:, None]).sum(1), hist.shape[1] - 1)
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0.0)
        inside = hist[rows, b]
        a = lo[b]
        z = np.minimum(hi[b], state.max.astype(np.float64))
        frac = np.where(inside > 0, (target - before) / np.maximum(inside, 1), 0.0)
        edges[:, j - 1] = np.where(total > 0, a + np.clip(frac, 0, 1) * (z - a), np.inf)
    return edges, zero.astype(np.float32)


@dataclass
class Picks:
    """Per layer, the chosen samples: (n, BINS, SAMPLES) arrays, key _NONE where empty."""

    key: np.ndarray
    value: np.ndarray
    window: np.ndarray
    pos: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Picks:
        shape = (n, BINS, SAMPLES)
        return cls(np.full(shape, _NONE, np.int64), np.zeros(shape, np.float32),
                   np.full(shape, -1, np.int64), np.full(shape, -1, np.int32))

    def merge(self, other: Picks) -> Picks:
        """The SAMPLES smallest keys of both, per neuron and bin."""
        def both(a, b):
            return np.concatenate([a, b], axis=2)

        key = both(self.key, other.key)
        order = np.argsort(key, axis=2, kind="stable")[:, :, :SAMPLES]
        take = np.take_along_axis
        return Picks(take(key, order, 2), take(both(self.value, other.value), order, 2),
                     take(both(self.window, other.window), order, 2),
                     take(both(self.pos, other.pos), order, 2))


def _keys(window: torch.Tensor, pos: torch.Tensor, n: int, device) -> torch.Tensor:
    """(m, n) pseudo-random non-negative keys of (window, position, neuron)."""
    h = (window.to(device) * 1_000_003 + pos.to(device).to(torch.int64)) * -7046029254386353131
    neuron = torch.arange(n, dtype=torch.int64, device=device) * -4658895280553007687
    x = h[:, None] ^ neuron[None, :]
    x = x ^ (x >> 31)
    x = x * -7723592293110705685
    return (x ^ (x >> 29)) & ((1 << 62) - 1)


class _Sampler:
    def __init__(self, layer_bounds: dict[int, tuple[np.ndarray, np.ndarray]],
                 tokens: np.ndarray, vocab: int, device) -> None:
        self.device = device
        self.edges = {la: torch.as_tensor(e, device=device) for la, (e, _) in layer_bounds.items()}
        self.zero = {la: torch.as_tensor(z, device=device) for la, (_, z) in layer_bounds.items()}
        self.picks = {la: Picks.empty(len(z)) for la, (_, z) in layer_bounds.items()}
        self.slot = torch.full((vocab,), -1, dtype=torch.int64, device=device)
        self.slot[torch.as_tensor(tokens, device=device)] = torch.arange(len(tokens),
                                                                         device=device)
        n = len(next(iter(layer_bounds.values()))[1]) if layer_bounds else 0
        self.sums = {la: torch.zeros(len(tokens), n, dtype=torch.float64, device=device)
                     for la in layer_bounds}
        self.counts = np.zeros(len(tokens), np.int64)
        # the batch's counted positions: window, position, mask, token id
        self.window = self.pos = self.keep = self.token_ids = None

    def add(self, layer: int, h: torch.Tensor) -> None:
        a = h.reshape(-1, h.shape[-1])
        if self.keep is not None:
            a = a[self.keep]
        a = a.float()
        m, n = a.shape
        if m == 0:
            return
        slot = self.slot[self.token_ids]
        seen = slot >= 0
        self.sums[layer].index_add_(0, slot[seen], a[seen].double())
        # bin per (position, neuron): 0 near zero, 1..10 the deciles, -1 none
        decile = torch.searchsorted(self.edges[layer], a.T.contiguous(), right=True).T + 1
        near = a.abs() <= self.zero[layer]
        group = torch.where(near, 0, torch.where(a > self.zero[layer], decile, -1))
        key = _keys(self.window, self.pos, n, a.device)
        key = torch.where(group >= 0, key, _NONE)
        flat_group = (torch.arange(n, device=a.device)[None, :] * BINS + group.clamp(min=0))
        found = Picks.empty(n)
        for s in range(SAMPLES):  # the s-th smallest key of each (neuron, bin)
            best = torch.full((n * BINS,), _NONE, dtype=torch.int64, device=a.device)
            best.scatter_reduce_(0, flat_group.view(-1), key.view(-1), reduce="amin")
            won = (key == best[flat_group]) & (key != _NONE)
            rows, cols = torch.nonzero(won, as_tuple=True)
            g = group[rows, cols].cpu().numpy()
            c = cols.cpu().numpy()
            found.key[c, g, s] = key[rows, cols].cpu().numpy()
            found.value[c, g, s] = a[rows, cols].cpu().numpy()
            found.window[c, g, s] = self.window[rows.cpu()].numpy()
            found.pos[c, g, s] = self.pos[rows.cpu()].numpy()
            key = torch.where(won, _NONE, key)
        self.picks[layer] = self.picks[layer].merge(found)


@torch.no_grad()
def sample_pass(model: LoadedModel, windows: list[Window],
                layer_bounds: dict[int, tuple[np.ndarray, np.ndarray]], batch_tokens: int,
                on_batch: Callable[[int], None] | None = None
                ) -> tuple[dict[int, Picks], np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """(picks per layer, the token ids with means, their counts, per layer the
    (tokens, n) mean activations) over ``windows``."""
    device = model.adapter.device
    counted = np.concatenate([np.array(w.tokens[w.skip:], np.int64) for w in windows]
                             ) if windows else np.zeros(0, np.int64)
    ids, counts = np.unique(counted, return_counts=True)
    tokens = ids[counts >= MIN_COUNT]
    vocab = max((max(w.tokens) + 1 for w in windows), default=1)  # padding is id 0
    sampler = _Sampler(layer_bounds, tokens, vocab, device)
    mods = _mlp_inputs(model)
    hooks = [mod.register_forward_pre_hook(
        lambda _m, args, i=i: sampler.add(i, args[0])) for i, mod in enumerate(mods)]
    try:
        for group in batches(windows, batch_tokens):
            group = sorted(group, key=lambda w: w.window)
            sampler.window, sampler.pos, sampler.keep = batch_places(group, device)
            ids = padded(group, device)
            tok = ids.reshape(-1)
            sampler.token_ids = tok if sampler.keep is None else tok[sampler.keep]
            model.model.base_model(input_ids=ids, use_cache=False)
            if on_batch:
                on_batch(sum(len(w.tokens) for w in group))
    finally:
        for h in hooks:
            h.remove()
    n_tok = counts[counts >= MIN_COUNT]
    means = {la: (s.cpu().numpy() / np.maximum(n_tok, 1)[:, None]) for la, s in
             sampler.sums.items()}
    return sampler.picks, tokens, n_tok, means


def rank_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of x (tokens, n) with the same column of y
    (average ranks for ties); nan where fewer than 3 tokens or a constant column."""
    if x.shape[0] < 3:
        return np.full(x.shape[1], np.nan)

    def ranks(a: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        return rankdata(a, axis=0)

    rx, ry = ranks(x), ranks(y)
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    den = np.sqrt((rx * rx).sum(0) * (ry * ry).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / den, np.nan)


def sample_index(picks: dict[int, Picks]) -> pa.Table:
    """The chosen samples as index rows: layer, neuron, group (the bin: -1 near zero,
    0..9 the deciles), rank, activation, window_id, position."""
    parts = []
    for layer, p in sorted(picks.items()):
        neuron, g, s = np.nonzero(p.key != _NONE)
        parts.append(pa.table({
            "layer": np.full(len(neuron), layer, np.int16), "neuron": neuron.astype(np.int32),
            "group": (g - 1).astype(np.int8), "rank": s.astype(np.int16),
            "activation": p.value[neuron, g, s], "window_id": p.window[neuron, g, s],
            "position": p.pos[neuron, g, s]}))
    return pa.concat_tables(parts) if parts else None


def token_rows(layer: int, tokens: np.ndarray, counts: np.ndarray, means: np.ndarray,
               static: np.ndarray) -> pa.Table:
    """The token_activations rows of a layer: each neuron's TOP_TOKENS tokens by mean."""
    n = means.shape[1]
    top = min(TOP_TOKENS, len(tokens))
    order = np.argsort(-means, axis=0, kind="stable")[:top]  # (top, n)
    cols = np.broadcast_to(np.arange(n), order.shape)
    return pa.table({
        "layer": np.full(order.size, layer, np.int16),
        "neuron": cols.T.ravel().astype(np.int32),
        "rank": np.broadcast_to(np.arange(top)[:, None], order.shape).T.ravel().astype(np.int16),
        "token_id": tokens[order.T.ravel()].astype(np.int32),
        "count": counts[order.T.ravel()].astype(np.int32),
        "mean": means[order, cols].T.ravel().astype(np.float32),
        "static": static[order, cols].T.ravel().astype(np.float32)})


def sample_task(model: LoadedModel | tuple[str, str, str], windows: list[Window],
                layer_bounds: dict[int, tuple[np.ndarray, np.ndarray]], batch_tokens: int,
                on_tokens: Callable[[int], None] | None = None):
    """A Dask task (or a call here, with a loaded model): the sample pass, and per
    layer the token means against the static input projection. Returns (sample index,
    token_activations rows, {layer: rank correlation per neuron}, tokens correlated)."""
    from circuit_atlas.compute.params import ProjectionParams
    from circuit_atlas.compute.projections import Projector

    if not isinstance(model, LoadedModel):
        from circuit_atlas.compute.workers import worker_model

        model = worker_model(*model)
    picks, tokens, counts, means = sample_pass(model, windows, layer_bounds, batch_tokens,
                                               on_tokens)
    projector = Projector(model.adapter, ProjectionParams(dtype="float32"))
    rows, corr = [], {}
    for layer, mean in sorted(means.items()):
        static = (projector.input_scores(layer, tokens) if len(tokens)
                  else np.zeros((0, mean.shape[1])))
        corr[layer] = rank_correlation(mean, static)
        if len(tokens):
            rows.append(token_rows(layer, tokens, counts, mean, static))
    return sample_index(picks), pa.concat_tables(rows) if rows else None, corr, len(tokens)
