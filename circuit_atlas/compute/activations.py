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

from circuit_atlas.compute.exemplars import BIN_EDGES, K, LayerState, merge
from circuit_atlas.compute.models import LoadedModel
from circuit_atlas.errors import CircuitAtlasError


@dataclass(frozen=True)
class Window:
    window: int  # its id: what exemplars refer to
    doc: str  # the text's id (prompt_id)
    start: int  # its first token's position in the text
    tokens: tuple[int, ...]


def text_windows(doc: str, ids: list[int], context: int, stride: int, first: int
                 ) -> list[Window]:
    """The windows of one tokenized text, numbered from ``first``: every ``stride``
    tokens a window of up to ``context``, the last one ending at the text's end."""
    if len(ids) <= context:
        return [Window(first, doc, 0, tuple(ids))]
    starts = list(range(0, len(ids) - context + 1, stride))
    if starts[-1] + context < len(ids):
        starts.append(len(ids) - context)
    return [Window(first + i, doc, s, tuple(ids[s:s + context])) for i, s in enumerate(starts)]


def batches(windows: Iterable[Window], batch_tokens: int) -> Iterator[list[Window]]:
    """Windows grouped by length, at most ``batch_tokens`` tokens per group."""
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w.tokens), []).append(w)
    for length in sorted(by_length):
        group = by_length[length]
        per = max(1, batch_tokens // max(length, 1))
        for i in range(0, len(group), per):
            yield group[i:i + per]


def _mlp_inputs(model: LoadedModel) -> list[torch.nn.Module]:
    mods = [m for name, m in model.model.named_modules() if name.endswith("mlp.down_proj")]
    if len(mods) != model.adapter.n_layers:
        raise CircuitAtlasError(f"found {len(mods)} mlp.down_proj modules for "
                           f"{model.adapter.n_layers} layers")
    return mods


class _Fold:
    """Per layer, the state of the batch being run, computed on the device."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        # float32 edges: a value within float32 rounding of an edge may land one bin off
        # numpy's float64 count, the price of not copying every activation to float64
        self.edges = torch.tensor(BIN_EDGES, dtype=torch.float32, device=device)
        self.window: torch.Tensor | None = None  # (m,) of the current batch
        self.pos: torch.Tensor | None = None
        self.layers: dict[int, LayerState] = {}

    def add(self, layer: int, h: torch.Tensor) -> None:
        a = h.reshape(-1, h.shape[-1]).float()  # (m, n): every position of the batch
        m, n = a.shape
        k = min(self.k, m)
        top_v, top_i = torch.topk(a, k, dim=0)  # (k, n)
        bot_v, bot_i = torch.topk(a, k, dim=0, largest=False)
        bins = torch.bucketize(a, self.edges, right=True)  # (m, n) in 0..len(edges)
        width = len(BIN_EDGES) + 1
        offset = torch.arange(n, device=a.device) * width
        hist = torch.bincount((bins + offset).view(-1), minlength=n * width).view(n, width)
        state = LayerState(
            *self._slots(top_v, top_i, -np.inf), *self._slots(bot_v, bot_i, np.inf), m,
            a.sum(0, dtype=torch.float64).cpu().numpy(),
            (a * a).sum(0, dtype=torch.float64).cpu().numpy(),
            (a > 0).sum(0).cpu().numpy().astype(np.int64), bot_v[0].cpu().numpy(),
            top_v[0].cpu().numpy(), hist.cpu().numpy().astype(np.int64))
        # torch.topk keeps any of several equal values at the k-th place, so with such
        # a tie the entry kept may differ from brute force's (merge then ranks by
        # value, window, position); real activations almost never tie
        old = self.layers.get(layer)
        self.layers[layer] = state if old is None else merge(old, state)

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
    base = model.model.base_model
    try:
        for group in batches(windows, batch_tokens):
            T = len(group[0].tokens)
            ids = torch.tensor([w.tokens for w in group], dtype=torch.long, device=device)
            fold.window = torch.tensor([w.window for w in group]).repeat_interleave(T)
            fold.pos = torch.arange(T, dtype=torch.int32).repeat(len(group))
            base(input_ids=ids, use_cache=False)
            if on_batch:
                on_batch(ids.numel())
    finally:
        for h in hooks:
            h.remove()
    return fold.layers
