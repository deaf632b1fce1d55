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


def fold(partials: list[pa.Table], merge: Merge, presorted: bool = False) -> pa.Table:
    """Merge the rows of ``partials`` by ``key``: float sums added per key in row order
    (list order, then order within a table). Sorted by key. ``presorted``: the rows
    already are (one table, sorted by key), which saves the sort."""
    parts = [p for p in partials if p.num_rows]
    if not parts:
        return merge.schema.empty_table()
    t = pa.concat_tables(parts)
    key = t.column("key").to_numpy()
    if presorted:
        order = np.arange(len(key))
    else:
        order = np.argsort(key, kind="stable")  # stable: a key's rows stay in list order
        key = key[order]
    starts = segments(key)
    if len(key) == len(starts):  # no key repeats: nothing to merge
        return pa.Table.from_arrays([t.column(n).take(order) if not presorted else t.column(n)
                                     for n in merge.schema.names], schema=merge.schema)
    seg = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    out: dict[str, np.ndarray] = {"key": key[starts]}
    for names, ufunc in ((merge.int_sums, np.add), (merge.mins, np.minimum),
                         (merge.maxs, np.maximum)):
        for name in names:
            out[name] = ufunc.reduceat(t.column(name).to_numpy()[order], starts)
    if merge.float_sums:
        rank = np.arange(len(key)) - starts[seg]
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(rank.max() + 2))
        for name in merge.float_sums:
            values = t.column(name).to_numpy()[order]
            acc = values[starts].copy()
            for r in range(1, len(bounds) - 1):
                rows = by_rank[bounds[r]:bounds[r + 1]]
                acc[seg[rows]] += values[rows]  # one addition per key per round
            out[name] = acc
    return pa.table({n: out[n] for n in merge.schema.names}, schema=merge.schema)
