"""How the reduce divides its work so that no task outgrows its worker, however many
graphs the lake holds.

A table's rows are ordered by a packed int64 key whose top fields are a layer and a
neuron (for edges, the source's). A **part** is a layer, or a range of its neurons
when one layer alone holds more rows than a fold may (a lake of 200,000 graphs puts
~6M edge keys in its busiest source layer). A **bucket** is a run of consecutive
parts folded by one chain of tasks; a **chunk** is the shards one task of that chain
folds at a time. Both are sized from a budget of rows.

The parts' starts cut the whole key line: a part (and a bucket) holds the keys from
its start to the next one's, so every key has one place, whichever layers hold rows.
A file is named by its start and holds the keys up to the next file's: the edges
table writes one per part (a source layer, or a neuron range of one), the neuron
tables one per bucket.

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
# (at 2 per worker, a 2-core reduce of 20,000 graphs idled a worker for its last 1-2 s);
# but no smaller than this, where each bucket's fixed costs (its files) would dominate.
BUCKETS_PER_WORKER = 4
MIN_BUCKET_ROWS = 1_000_000
LAST_KEY = 2**63 - 1


@dataclass(frozen=True, order=True)
class Part:
    """A layer's neurons [lo, hi); (-1, FULL) is the whole layer."""

    layer: int
    lo: int = -1
    hi: int = FULL


def layer_of(table: str, key: np.ndarray) -> np.ndarray:
    """The layer of a table's partial keys (-1: embeddings)."""
    return (key >> (SHIFT[table] + NEURON_BITS)) - 1


def neuron_of(table: str, key: np.ndarray) -> np.ndarray:
    return ((key >> SHIFT[table]) & FULL) - 1


def bound(table: str, layer: int, neuron: int) -> int:
    """The first key of ``neuron`` in ``layer`` (neuron FULL: the next layer's first)."""
    return (((layer + 1) << NEURON_BITS) + neuron + 1) << SHIFT[table]


def start(table: str, part: Part) -> int:
    return bound(table, part.layer, part.lo)


def bucket_ranges(table: str, buckets: list[list[Part]]) -> list[tuple[int, int]]:
    """Each bucket's keys, [lo, hi): from its first part's start to the next bucket's;
    the first from the first key, the last to the last, so the buckets tile the keys."""
    starts = [0, *(start(table, b[0]) for b in buckets[1:]), LAST_KEY]
    return list(zip(starts, starts[1:], strict=False))


def block_bits(shape: dict[str, int] | None) -> int:
    """Block width (log2 of neurons) giving ~16 blocks per MLP layer."""
    n = (shape or {}).get("n_neurons") or 1 << 14
    return max(0, (int(n) - 1).bit_length() - 4)


def histogram(table: str, key: np.ndarray, bits: int) -> dict[int, np.ndarray]:
    """Rows per layer and block of neurons of a partial (any key order)."""
    if not len(key):
        return {}
    block = np.maximum(neuron_of(table, key), 0) >> bits
    width = int(block.max()) + 1
    counts = np.bincount((layer_of(table, key) + 1) * width + block)
    out = {}
    for row in np.flatnonzero(np.add.reduceat(counts, np.arange(0, len(counts), width))):
        a = counts[row * width:(row + 1) * width]
        out[int(row) - 1] = a[:np.flatnonzero(a)[-1] + 1]
    return out


def file_name(table: str, part: Part) -> str:
    """The file that starts at ``part`` (published and state): ``src_layer-005.parquet``
    for a whole layer 5; ``src_layer-005.from-0000000.parquet``,
    ``src_layer-005.from-0003584.parquet`` for its neurons from 0 and from 3584, so
    that names sort as keys do."""
    name = f"{PREFIX.get(table, 'layer')}-{part.layer:03d}"
    if part.lo == -1 and part.hi == FULL:
        return f"{name}.parquet"
    return f"{name}.from-{max(part.lo, 0):07d}.parquet"


def start_of_file(name: str) -> Part:
    """Where a file named by :func:`file_name` starts (it ends where the next starts)."""
    stem, *rest = name.removesuffix(".parquet").split(".")
    lo = int(rest[0].removeprefix("from-")) if rest else 0
    return Part(int(stem.split("-", 1)[1]), lo if lo > 0 else -1)


def _block_sum(hist: np.ndarray, bits: int, lo: int, hi: int) -> int:
    """Rows of the blocks that start in [lo, hi)."""
    first = 0 if lo <= 0 else -(-lo >> bits)
    last = len(hist) if hi >= FULL else -(-hi >> bits)
    return int(hist[first:last].sum()) if last > first else 0


def cut_layer(layer: int, hist: np.ndarray, bits: int, budget: int,
              stored: list[Part]) -> list[Part]:
    """A layer's parts: cut between blocks so that each holds at most ``budget`` rows
    (a single block may hold more: it is not cut), and at every stored file's start,
    so that no stored file starts inside a part."""
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

    ``hists``: per shard, rows per layer and block; ``stored``: where the stored
    state's files start, and their rows (counted in the bucket's size, not in its
    chunks). Enough buckets that one holds at most ``budget`` rows and, for a table
    big enough, every worker has work; chunks that add at most ``budget`` rows (and
    ``max_shards`` shards).
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
    n_buckets = max(-(-sum(part_rows) // budget),
                    min(BUCKETS_PER_WORKER * n_workers, -(-sum(part_rows) // MIN_BUCKET_ROWS)), 1)
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
