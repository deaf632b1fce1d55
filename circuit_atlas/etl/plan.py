"""How the reduce divides its work so that no task outgrows its worker, however many
graphs the lake holds.

A table's rows are ordered by a packed int64 key whose top fields are a layer and a
neuron (for edges, the source's). The unit of output is a **part**: a layer, or a
range of its neurons when one layer alone holds more rows than a fold may (a lake of
200,000 graphs puts ~6M edge keys in its busiest source layer). A **bucket** is a run
of consecutive parts folded by one chain of tasks; a **chunk** is the shards one task
of that chain folds at a time. Both are sized from a budget of rows.

Sizes come from per-shard histograms: rows per layer and block of neurons (a block
is ``2**block_bits`` neurons, ~16 blocks per MLP layer), so a layer is cut where its
rows are, not at equal neuron ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuit_atlas.etl import neuron_reduce as nr

NEURON_BITS = 22
FULL = (1 << NEURON_BITS) - 1  # the end of a layer's neuron range
# where each table's key holds its layer and neuron fields
SHIFT = {"edges": 30, **nr.KEY_SHIFT}
PREFIX = {"edges": "src_layer"}

# Peak bytes per partial row while a fold runs (inputs, their sorted copies, sort
# indices, float64 temporaries, the state): kept loose.
BYTES_PER_ROW = 300
# A fold holds its bucket's state and a chunk, each up to the budget of rows, within
# half of its worker's memory limit: the worker also holds results waiting for later
# tasks and Dask's own memory.
FOLD_MEMORY_SHARE = 0.25
# Buckets per worker, at least: with several, the last fold chains to finish are short
# (at 2 per worker, a 2-core reduce of 20,000 graphs idled a worker for its last 1-2 s).
BUCKETS_PER_WORKER = 4


@dataclass(frozen=True, order=True)
class Part:
    """A layer's keys with neuron in [lo, hi); (-1, FULL) is the whole layer."""

    layer: int
    lo: int = -1
    hi: int = FULL

    @property
    def whole(self) -> bool:
        return self.lo == -1 and self.hi == FULL


def layer_of(table: str, key: np.ndarray) -> np.ndarray:
    """The layer of a table's partial keys (-1: embeddings)."""
    return (key >> (SHIFT[table] + NEURON_BITS)) - 1


def neuron_of(table: str, key: np.ndarray) -> np.ndarray:
    return ((key >> SHIFT[table]) & FULL) - 1


def bound(table: str, layer: int, neuron: int) -> int:
    """The first key of ``neuron`` in ``layer`` (neuron FULL: the next layer's first)."""
    return (((layer + 1) << NEURON_BITS) + neuron + 1) << SHIFT[table]


def key_range(table: str, parts: list[Part]) -> tuple[int, int]:
    """The keys of a run of consecutive parts: [lo, hi)."""
    return bound(table, parts[0].layer, parts[0].lo), bound(table, parts[-1].layer, parts[-1].hi)


def block_bits(shape: dict[str, int] | None) -> int:
    """Block width (log2 of neurons) giving ~16 blocks per MLP layer."""
    n = (shape or {}).get("n_neurons") or 1 << 14
    return max(0, (int(n) - 1).bit_length() - 4)


def histogram(table: str, key: np.ndarray, bits: int) -> dict[int, np.ndarray]:
    """Rows per layer and block of neurons of a partial sorted by key."""
    if not len(key):
        return {}
    layer = layer_of(table, key)
    block = np.maximum(neuron_of(table, key), 0) >> bits
    cuts = [0, *(np.flatnonzero(layer[1:] != layer[:-1]) + 1), len(key)]
    return {int(layer[a]): np.bincount(block[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)}


def file_name(table: str, part: Part) -> str:
    """A part's file (published and state): ``src_layer-005.parquet`` for a whole
    layer, ``src_layer-005.from-0003584.parquet`` for its neurons from 3584 on."""
    name = f"{PREFIX.get(table, 'layer')}-{part.layer:03d}"
    return f"{name}.parquet" if part.whole else f"{name}.from-{max(part.lo, 0):07d}.parquet"


def parts_of_files(names: list[str]) -> dict[str, Part]:
    """The parts that stored files cover, by name. A layer's files tile it: each from
    its own start to the next one's (a part with no rows has no file; its neighbour's
    range covers it, truthfully, as no key lies there)."""
    starts: dict[int, list[tuple[int, str]]] = {}
    for name in names:
        stem, *rest = name.removesuffix(".parquet").split(".")
        layer = int(stem.split("-", 1)[1])
        starts.setdefault(layer, []).append((int(rest[0].removeprefix("from-")) if rest else -1,
                                             name))
    out = {}
    for layer, runs in starts.items():
        runs.sort()
        for i, (_, name) in enumerate(runs):
            lo = -1 if i == 0 else runs[i][0]
            hi = runs[i + 1][0] if i + 1 < len(runs) else FULL
            out[name] = Part(layer, lo, hi)
    return out


def _block_sum(hist: np.ndarray, bits: int, lo: int, hi: int) -> int:
    """Rows of the blocks that start in [lo, hi)."""
    first = 0 if lo <= 0 else -(-lo >> bits)
    last = len(hist) if hi >= FULL else -(-hi >> bits)
    return int(hist[first:last].sum()) if last > first else 0


def cut_layer(layer: int, hist: np.ndarray, bits: int, budget: int,
              stored: list[Part]) -> list[Part]:
    """A layer's parts: cut between blocks so that each holds at most ``budget`` rows
    (a single block may hold more: it is not cut), and at every stored part's start,
    so that each new part lies in one stored file."""
    cuts = {p.lo for p in stored if p.lo > 0}
    if hist.sum() > budget:
        rows = 0
        for b, n in enumerate(hist):
            if rows and rows + n > budget:
                cuts.add(b << bits)
                rows = 0
            rows += int(n)
    edges = [-1, *sorted(cuts), FULL]
    return [Part(layer, a, b) for a, b in zip(edges, edges[1:], strict=False)]


def plan_folds(hists: list[dict[int, np.ndarray]], n_workers: int, budget: int,
               max_shards: int, bits: int, stored: dict[Part, int] | None = None
               ) -> list[tuple[list[Part], list[list[int]]]]:
    """Buckets of parts and, per bucket, chunks of shard indices to fold at a time.

    ``hists``: per shard, rows per layer and block; ``stored``: the stored state's
    parts and their rows (counted in the bucket's size, not in its chunks). Enough
    buckets that one holds at most ``budget`` rows and every worker has work; chunks
    that add at most ``budget`` rows (and ``max_shards`` shards).
    """
    stored = stored or {}
    layers = sorted({layer for h in hists for layer in h} | {p.layer for p in stored})
    width = max((len(a) for h in hists for a in h.values()), default=1)
    col = {layer: i * width for i, layer in enumerate(layers)}
    # shards x (layer, block): rows
    matrix = np.zeros((len(hists), len(layers) * width), np.int32)
    for s, h in enumerate(hists):
        for layer, a in h.items():
            matrix[s, col[layer]:col[layer] + len(a)] = a
    total = matrix.sum(0, dtype=np.int64)
    parts, part_rows = [], []
    for layer in layers:
        held = sorted(p for p in stored if p.layer == layer)
        layer_hist = total[col[layer]:col[layer] + width].copy()
        for p in held:  # stored rows count where their part starts
            layer_hist[min(max(p.lo, 0) >> bits, width - 1)] += stored[p]
        for part in cut_layer(layer, layer_hist, bits, budget, held):
            parts.append(part)
            part_rows.append(_block_sum(layer_hist, bits, part.lo, part.hi))
    n_buckets = max(-(-sum(part_rows) // budget), BUCKETS_PER_WORKER * n_workers)
    target = sum(part_rows) / n_buckets
    buckets: list[list[int]] = []
    rows = 0
    for i, n in enumerate(part_rows):
        if not buckets or rows >= target or (rows and rows + n > budget):
            buckets.append([])
            rows = 0
        buckets[-1].append(i)
        rows += n
    plan = []
    for bucket in buckets:
        mask = np.zeros(matrix.shape[1], bool)
        for i in bucket:
            p = parts[i]
            first = 0 if p.lo <= 0 else -(-p.lo >> bits)
            last = width if p.hi >= FULL else -(-p.hi >> bits)
            mask[col[p.layer] + first:col[p.layer] + max(first, min(last, width))] = True
        per_shard = matrix[:, mask].sum(1, dtype=np.int64)
        chunks, current, rows = [], [], 0
        for s, n in enumerate(per_shard):
            if current and (rows + n > budget or len(current) >= max_shards):
                chunks.append(current)
                current, rows = [], 0
            current.append(s)
            rows += int(n)
        if current:
            chunks.append(current)
        plan.append(([parts[i] for i in bucket], chunks))
    return plan
