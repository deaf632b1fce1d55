"""Merging partial aggregates keyed by one int64 column, deterministically.

Integer counts and min/max merge in any order; float sums do not (a float sum
depends on the order of its additions). :func:`fold` therefore adds each key's
float partial sums strictly in list order, a left fold. A stored state is exactly
the fold of the partials it holds, so folding new partials onto it gives
bit-for-bit what folding everything from scratch gives, and a long list can be
folded in consecutive chunks with the same result (bounded memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Merge:
    """How the columns of a partial table merge (every column but ``key`` is named once)."""

    schema: pa.Schema
    float_sums: tuple[str, ...] = ()
    int_sums: tuple[str, ...] = ()
    mins: tuple[str, ...] = ()
    maxs: tuple[str, ...] = ()


def segments(sorted_key: np.ndarray) -> np.ndarray:
    """Start of each run of equal keys in a sorted key array."""
    if not len(sorted_key):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])


def fold(partials: list[pa.Table], merge: Merge) -> pa.Table:
    """Merge the rows of ``partials`` by ``key``: float sums added per key in row order
    (list order, then order within a table). Sorted by key.

    Partials that are each sorted by key make the sort a merge of sorted runs, which
    numpy's stable sort (timsort) finds."""
    parts = [p for p in partials if p.num_rows]
    if not parts:
        return merge.schema.empty_table()
    t = pa.concat_tables(parts)
    key = t.column("key").to_numpy()
    order = np.argsort(key, kind="stable")  # stable: a key's rows stay in list order
    key = key[order]
    starts = segments(key)
    if len(key) == len(starts):  # no key repeats: nothing to merge
        return pa.Table.from_arrays([t.column(n).take(order) for n in merge.schema.names],
                                    schema=merge.schema)
    out: dict[str, np.ndarray] = {"key": key[starts]}
    for names, ufunc in ((merge.int_sums, np.add), (merge.mins, np.minimum),
                         (merge.maxs, np.maximum)):
        for name in names:
            out[name] = ufunc.reduceat(t.column(name).to_numpy()[order], starts)
    if merge.float_sums:
        # A left fold, one addition per key per round: round r adds each key's r-th
        # row. Keys ordered by their number of rows, longest first, make the keys
        # still adding in round r a prefix, so a round is one gather and one add.
        length = np.diff(np.r_[starts, len(key)])
        small = length.max() < 2**15  # int16: numpy's stable sort is then a radix sort
        by_length = np.argsort(-length.astype(np.int16 if small else np.int64), kind="stable")
        first = starts[by_length]  # each key's r-th row is at first + r, sorted
        # keys with more than r rows: length >= r + 1, a prefix of by_length
        still = np.searchsorted(-length[by_length], -np.arange(2, length.max() + 1), "right")
        for name in merge.float_sums:
            values = t.column(name).to_numpy()[order]
            acc = values[first]
            for r, m in enumerate(still, start=1):
                acc[:m] += values[first[:m] + r]
            out[name] = np.empty_like(acc)
            out[name][by_length] = acc
    return pa.table({n: out[n] for n in merge.schema.names}, schema=merge.schema)
