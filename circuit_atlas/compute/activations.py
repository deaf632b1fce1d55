"""The activation pass: windows of a corpus through the model, forward only, folding
every MLP neuron's activation into its exemplar state (``compute.exemplars``).

A text becomes windows of at most ``context`` tokens, ``stride`` apart (a short
prompt is one window). Windows of equal length run together, so no batch holds
padding. The activation is h = SiLU(gate) * up, read where the model's own forward
passes it to ``down_proj`` (a pre-hook), so the pass costs one plain forward plus the
bookkeeping, which runs on the device: per batch and layer one top-k per sign and a
histogram; only k candidates per neuron and the sums cross to the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from circuit_atlas.compute.exemplars import (
    BIN_EDGES,
    BIN_HIGH,
    BIN_LOW,
    BIN_STEPS,
    K,
    LayerState,
    merge,
)
from circuit_atlas.compute.models import LoadedModel
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.ids import window_id


@dataclass(frozen=True)
class Window:
    window: int  # its id (lake.ids.window_id of doc and start): what exemplars refer to
    doc: str  # the text's id (prompt_id)
    start: int  # its first token's position in the text
    tokens: tuple[int, ...]
    skip: int = 0  # leading positions an earlier window of the text already counted


def text_windows(doc: str, ids: list[int], context: int, stride: int, skip_first: int = 0
                 ) -> list[Window]:
    """The windows of one tokenized text: every ``stride`` tokens a window of up to
    ``context``, the last one ending at the text's end. Where windows overlap, each
    position is counted once, in the first window that holds it (``skip``); the
    text's first ``skip_first`` positions are not counted at all."""
    if context < 1 or not 1 <= stride <= context:
        raise CircuitAtlasError(f"need 1 <= stride <= context, got stride {stride}, "
                                f"context {context}")
    if skip_first >= context:
        raise CircuitAtlasError(f"skip_first {skip_first} must be below context {context}")
    if len(ids) <= context:
        return [Window(window_id(doc, 0), doc, 0, tuple(ids), min(skip_first, len(ids)))]
    starts = list(range(0, len(ids) - context + 1, stride))
    if starts[-1] + context < len(ids):
        starts.append(len(ids) - context)
    return [Window(window_id(doc, s), doc, s, tuple(ids[s:s + context]),
                   skip_first if i == 0 else max(starts[i - 1] + context - s, skip_first - s, 0))
            for i, s in enumerate(starts)]


PAD_SHARE = 0.25  # at most this share of a batch's tokens may be padding


def batches(windows: Iterable[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Windows in groups of at most ``batch_tokens`` tokens once padded to the
    group's longest, by length, so that padding stays under :data:`PAD_SHARE` (a
    group's windows run right-padded: in a causal model the padding after a text
    changes nothing before it, and its positions are not counted)."""
    group: list[Window] = []
    for w in sorted(windows, key=lambda w: len(w.tokens)):
        longest = len(w.tokens)
        real = sum(len(g.tokens) for g in group) + longest
        size = (len(group) + 1) * longest
        if group and (size > batch_tokens or size - real > PAD_SHARE * size):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def padded(group: list[Window], device) -> torch.Tensor:
    """The token ids of a group, right-padded to its longest window."""
    T = max(len(w.tokens) for w in group)
    return torch.tensor([list(w.tokens) + [0] * (T - len(w.tokens)) for w in group],
                        dtype=torch.long, device=device)


def _mlp_inputs(model: LoadedModel) -> list[torch.nn.Module]:
    mods = [m for name, m in model.model.named_modules() if name.endswith("mlp.down_proj")]
    if len(mods) != model.adapter.n_layers:
        raise CircuitAtlasError(f"found {len(mods)} mlp.down_proj modules for "
                           f"{model.adapter.n_layers} layers")
    return mods


_LOG_LOW = float(np.log(BIN_LOW))
_LOG_STEP = float(np.log(BIN_HIGH / BIN_LOW) / (BIN_STEPS - 1))


def bins(a: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(a, edges, right=True)`` for the geometric :data:`BIN_EDGES`,
    as int32, in a third of its time: the bin from the logarithm, and bucketize only
    for the values whose logarithm lies too near an edge to trust."""
    u = torch.log(a.abs().clamp_min(1e-30)).sub_(_LOG_LOW).div_(_LOG_STEP)
    f = u.floor()
    frac = u.sub_(f)
    j = f.clamp_(-1, BIN_STEPS - 1).add_(1.5)  # positive edges at most |a|, + 0.5
    # a >= 0: BIN_STEPS + 1 + j; a < 0: BIN_STEPS - j (+ 0.0 turns -0.0 into 0.0)
    out = torch.copysign(j, a + 0.0).add_(BIN_STEPS + 0.5).to(torch.int32)
    near = torch.nonzero(((frac < 1e-4) | (frac > 1 - 1e-4)).view(-1)).view(-1)
    if near.numel():
        flat = out.view(-1)
        flat[near] = torch.bucketize(a.reshape(-1)[near], edges, right=True).to(torch.int32)
    return out


class _Fold:
    """Per layer, the state of the batch being run, computed on the device."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        # exemplar values and the histogram are float32: a value within float32
        # rounding of an edge may land one bin off a float64 count
        self.edges = torch.tensor(BIN_EDGES, dtype=torch.float32, device=device)
        self.window: torch.Tensor | None = None  # (m,) of the current batch
        self.pos: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # positions to count, None: all
        self.layers: dict[int, LayerState] = {}

    def add(self, layer: int, h: torch.Tensor) -> None:
        h = h.reshape(-1, h.shape[-1])  # (m, n): every position of the batch
        if self.keep is not None:
            h = h[self.keep]
        m, n = h.shape
        if m == 0:
            return
        a = h.float()
        # sums in float64 for a float64 model; else float32 per batch (summed across
        # batches in float64), which the ~1e-7 rounding of 4,096 terms allows
        wide = h if h.dtype == torch.float64 else a
        k = min(self.k, m)
        top_v, top_i = torch.topk(a, k, dim=0)  # (k, n)
        bot_v, bot_i = torch.topk(a, k, dim=0, largest=False)
        width = len(BIN_EDGES) + 1
        offset = torch.arange(n, device=a.device, dtype=torch.int32) * width
        hist = torch.bincount((bins(a, self.edges) + offset).view(-1),
                              minlength=n * width).view(n, width)
        top = self._slots(top_v, top_i, -np.inf)
        bottom = self._slots(bot_v, bot_i, np.inf)
        self._ties(a, top_v, top, largest=True)
        self._ties(a, bot_v, bottom, largest=False)
        state = LayerState(
            *top, *bottom, m,
            wide.sum(0).cpu().numpy().astype(np.float64),
            (wide * wide).sum(0).cpu().numpy().astype(np.float64),
            (a > 0).sum(0, dtype=torch.int32).cpu().numpy().astype(np.int64),
            bot_v[0].cpu().numpy(),
            top_v[0].cpu().numpy(), hist.cpu().numpy().astype(np.int64))
        old = self.layers.get(layer)
        self.layers[layer] = state if old is None else merge(old, state)

    def _ties(self, a: torch.Tensor, values: torch.Tensor, slots, largest: bool) -> None:
        """torch.topk keeps any of several values equal to the k-th: where such a tie
        reaches past the k kept (often in bfloat16), choose again in those columns by
        (value, row). The batch's rows are in (window, position) order
        (:func:`activation_pass` sorts each batch by window id), so that is the order
        a brute force ranks ties in."""
        kth = values[-1]
        tied = (a == kth).sum(0, dtype=torch.int32) > (values == kth).sum(0, dtype=torch.int32)
        if not bool(tied.any()):
            return
        cols = torch.nonzero(tied).view(-1)
        sub = a[:, cols] + 0.0  # -0.0 as 0.0: they are equal
        bits = sub.view(torch.int32).to(torch.int64)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as integers
        m = a.shape[0]
        row = torch.arange(m, dtype=torch.int64, device=a.device)[:, None]
        # one integer key per entry: the value, then the earlier row first
        key = (ordered << 32) | ((m - 1 - row) if largest else row)
        k = values.shape[0]
        idx = torch.topk(key, k, dim=0, largest=largest).indices
        v, w, p = self._slots(torch.gather(sub, 0, idx), idx, -np.inf if largest else np.inf)
        j = cols.cpu().numpy()
        slots[0][j], slots[1][j], slots[2][j] = v, w, p

    def _slots(self, values: torch.Tensor, index: torch.Tensor, fill: float):
        v = values.T.cpu().numpy().astype(np.float32)  # (n, k)
        i = index.T.cpu()
        w = self.window[i].numpy()
        p = self.pos[i].numpy()
        k = v.shape[1]
        if k < self.k:  # fewer positions than k so far
            pad = ((0, 0), (0, self.k - k))
            v = np.pad(v, pad, constant_values=fill)
            w = np.pad(w, pad, constant_values=-1)
            p = np.pad(p, pad, constant_values=-1)
        return v, w.astype(np.int64), p.astype(np.int32)


def batch_places(group: list[Window], device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(window, position, keep) of a batch: the window id and position of every
    position that counts (not one an earlier window counted, not padding), and the
    mask that picks those rows out of the batch's (None: all of them)."""
    T = max(len(w.tokens) for w in group)
    window = torch.tensor([w.window for w in group]).repeat_interleave(T)
    pos = torch.arange(T, dtype=torch.int32).repeat(len(group))
    if not any(w.skip or len(w.tokens) < T for w in group):
        return window, pos, None
    skip = torch.tensor([w.skip for w in group], dtype=torch.int32).repeat_interleave(T)
    end = torch.tensor([len(w.tokens) for w in group], dtype=torch.int32).repeat_interleave(T)
    keep = (pos >= skip) & (pos < end)
    return window[keep], pos[keep], keep.to(device)


def forward_batches(model: LoadedModel, windows: Iterable[Window], batch_tokens: int,
                    on_batch: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Run ``windows`` through the model's base (no head) in batches: yields each batch's
    places (``batch_places``: rows in (window, position) order) just before its forward
    runs, so that hooks can read them, then calls ``on_batch(tokens)``."""
    device = model.adapter.device
    base = model.model.base_model
    for group in batches(windows, batch_tokens):
        group = sorted(group, key=lambda w: w.window)
        yield batch_places(group, device)
        base(input_ids=padded(group, device), use_cache=False)
        if on_batch:
            on_batch(sum(len(w.tokens) for w in group))


@torch.no_grad()
def activation_pass(model: LoadedModel, windows: Iterable[Window], k: int = K,
                    batch_tokens: int = 4096,
                    on_batch: Callable[[int], None] | None = None) -> dict[int, LayerState]:
    """The exemplar state of every layer over ``windows``: {layer: LayerState}.
    ``on_batch(tokens)`` after each batch (for progress)."""
    device = model.adapter.device
    fold = _Fold(k, device)
    mods = _mlp_inputs(model)
    hooks = [mod.register_forward_pre_hook(
        lambda _m, args, layer=i: fold.add(layer, args[0])) for i, mod in enumerate(mods)]
    try:
        for fold.window, fold.pos, fold.keep in forward_batches(model, windows, batch_tokens,
                                                                on_batch):
            pass  # the hooks fold each batch as its forward runs
    finally:
        for h in hooks:
            h.remove()
    if not fold.layers:  # no positions at all: every layer's state is empty
        return {i: LayerState.empty(model.adapter.n_neurons, k)
                for i in range(model.adapter.n_layers)}
    return fold.layers


NEXT_TOKENS = 5


@dataclass
class Replay:
    """What a second pass over exemplar windows found: for each wanted entry the
    neuron's activation at every token of the entry's window (``values`` from
    ``offsets[e]`` to ``offsets[e + 1]``), and per window the model's top next tokens
    at every position."""

    values: np.ndarray  # float32
    offsets: np.ndarray  # int64, one more than entries
    where: np.ndarray  # each entry's window, as its index in the windows given
    next_tokens: dict[int, np.ndarray]  # window -> (T, NEXT_TOKENS) token ids


@torch.no_grad()
def replay(model: LoadedModel, windows: list[Window], window: np.ndarray, layer: np.ndarray,
           neuron: np.ndarray, batch_tokens: int = 4096,
           on_batch: Callable[[int], None] | None = None) -> Replay:
    """Run ``windows`` again, through the whole model, and read each entry (``window``,
    ``layer``, ``neuron``: arrays of one entry per element) at every token."""
    device = model.adapter.device
    mods = _mlp_inputs(model)
    ids = np.array([w.window for w in windows], np.int64)
    lengths = np.array([len(w.tokens) for w in windows], np.int64)
    at = np.argsort(ids)
    where = at[np.searchsorted(ids[at], window)]
    if len(window) and not np.array_equal(ids[where], window):
        raise CircuitAtlasError("replay: an entry names a window that is not given")
    offsets = np.concatenate([[0], np.cumsum(lengths[where])]).astype(np.int64)
    values = np.zeros(offsets[-1], np.float32)
    order = np.argsort(window, kind="stable")
    sorted_window = window[order]
    current: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    def read(i: int, h: torch.Tensor) -> None:
        if i in current:
            rows, cols, entries = current[i]
            got = h[rows, :, cols].float().cpu().numpy()  # (entries, T), padded
            span = offsets[entries + 1] - offsets[entries]
            t = np.arange(got.shape[1])
            real = t[None, :] < span[:, None]
            values[(offsets[entries][:, None] + t)[real]] = got[real]

    hooks = [mod.register_forward_pre_hook(
        lambda _m, args, i=i: read(i, args[0])) for i, mod in enumerate(mods)]
    out = Replay(values, offsets, where, {})
    try:
        for group in batches(windows, batch_tokens):
            gids = np.array([w.window for w in group], np.int64)
            lo = np.searchsorted(sorted_window, gids, "left")
            hi = np.searchsorted(sorted_window, gids, "right")
            entries = np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)]
                                     ) if len(group) else np.zeros(0, np.int64)
            rows = np.repeat(np.arange(len(group)), hi - lo)
            current.clear()
            for i in np.unique(layer[entries]):
                sel = layer[entries] == i
                current[int(i)] = (torch.as_tensor(rows[sel], device=device),
                                   torch.as_tensor(neuron[entries[sel]], device=device),
                                   entries[sel])
            logits = model.model(input_ids=padded(group, device), use_cache=False).logits
            top = torch.topk(logits.float(), NEXT_TOKENS, dim=-1).indices.cpu().numpy()
            for row, w in enumerate(group):
                out.next_tokens[w.window] = top[row, :len(w.tokens)].astype(np.int32)
            if on_batch:
                on_batch(sum(len(w.tokens) for w in group))
    finally:
        for h in hooks:
            h.remove()
    return out
