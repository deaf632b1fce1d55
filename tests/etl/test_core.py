"""The pure reduce functions against DuckDB, over random inputs (hypothesis)."""

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_atlas.etl.edge_reduce import PARTIAL_SCHEMA as PARTIAL
from circuit_atlas.etl.edge_reduce import finalize, fold_layer, pack, shard_partials, unpack
from circuit_atlas.lake import GRAPH_EDGES
from tests.etl.oracle import assert_same, edge_oracle


def random_edges(rng, n_graphs, rows_per_graph, n_neurons, first_graph=0, shuffle=False):
    n = n_graphs * rows_per_graph
    graph = np.repeat(np.arange(first_graph, first_graph + n_graphs), rows_per_graph)
    t = {
        "graph_id": graph.astype(np.int64),
        "src_layer": rng.integers(-1, 3, n).astype(np.int16),
        "src_neuron": rng.integers(-1, n_neurons, n).astype(np.int32),
        "src_pos": rng.integers(0, 4, n).astype(np.int32),
        "tgt_layer": rng.integers(0, 4, n).astype(np.int16),
        "tgt_neuron": rng.integers(0, n_neurons, n).astype(np.int32),
        "tgt_pos": rng.integers(0, 4, n).astype(np.int32),
        "weight": (rng.normal(size=n) * 10.0 ** rng.integers(-7, 4, n)).astype(np.float32),
    }
    if shuffle:  # rows of a graph interleaved with other graphs' rows
        order = rng.permutation(n)
        t = {k: v[order] for k, v in t.items()}
    return pa.table(t, schema=GRAPH_EDGES.schema)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shards=st.integers(1, 5), graphs=st.integers(0, 6),
       rows=st.integers(0, 40), neurons=st.integers(1, 6), shuffle=st.booleans(),
       min_count=st.integers(1, 3))
def test_partials_and_fold_equal_duckdb(seed, shards, graphs, rows, neurons, shuffle, min_count):
    rng = np.random.default_rng(seed)
    tables = [random_edges(rng, graphs, rows, neurons, first_graph=100 * s, shuffle=shuffle)
              for s in range(shards)]
    layers = sorted({layer for t in tables for layer in shard_partials(t)})
    empty = PARTIAL.empty_table()
    states = [fold_layer(None, [shard_partials(t).get(layer, empty) for t in tables])
              for layer in layers]
    ours = finalize(pa.concat_tables(states) if states else PARTIAL.empty_table(), min_count)
    assert_same(ours, edge_oracle(pa.concat_tables(tables), min_count))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shards=st.integers(2, 12), split=st.data())
def test_folding_onto_a_state_is_bitwise_equal_to_scratch(seed, shards, split):
    rng = np.random.default_rng(seed)
    pieces = [shard_partials(random_edges(rng, 3, 30, 3, first_graph=10 * s)).get(
        0, PARTIAL.empty_table()) for s in range(shards)]
    scratch = fold_layer(None, pieces)
    cut = sorted(split.draw(st.sets(st.integers(1, shards - 1), max_size=3)))
    state = None
    for a, b in zip([0, *cut], [*cut, shards], strict=True):
        state = fold_layer(state, pieces[a:b])
    assert state.equals(scratch)  # exact, not approximate


def test_pack_round_trip_and_order():
    rng = np.random.default_rng(0)
    cols = (rng.integers(-1, 80, 1000), rng.integers(-1, 200000, 1000),
            rng.integers(-1, 81, 1000), rng.integers(-1, 200000, 1000))
    key = pack(*cols)
    for got, want in zip(unpack(key), cols, strict=True):
        assert np.array_equal(got, want)
    order = np.lexsort(cols[::-1])
    assert np.array_equal(np.sort(key), key[order])


def test_out_of_range_ids_are_refused():
    import pytest

    from circuit_atlas import CircuitAtlasError

    with pytest.raises(CircuitAtlasError, match="edge neuron out of range"):
        pack([0], [5_000_000], [1], [0])


hists = st.lists(st.dictionaries(
    st.integers(-1, 5), st.lists(st.integers(0, 800), min_size=1, max_size=6).map(np.array),
    max_size=7), min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(hist=hists, budget=st.integers(500, 5000), workers=st.integers(1, 4),
       max_shards=st.integers(1, 9), bits=st.integers(0, 3),
       stored_cuts=st.dictionaries(st.integers(-1, 5), st.sets(st.integers(1, 40), max_size=3),
                                   max_size=3))
def test_fold_plan_respects_the_budget(hist, budget, workers, max_shards, bits, stored_cuts):
    """Parts tile each layer in order, cut within a layer where it holds more than the
    budget and at every stored part's start; buckets and chunks stay in the budget
    (a single block or shard may exceed it)."""
    from circuit_atlas.etl.plan import FULL, Part, plan_folds

    stored = {Part(layer, lo): 100 for layer, cuts in stored_cuts.items()
              for lo in (-1, *cuts)}
    plan = plan_folds(hist, workers, budget, max_shards, bits, stored)
    parts = [p for bucket, _ in plan for p in bucket]
    layers = sorted({x for h in hist for x in h} | set(stored_cuts))
    assert sorted({p.layer for p in parts}) == layers and parts == sorted(parts)
    for layer in layers:
        mine = [p for p in parts if p.layer == layer]
        assert mine[0].lo == -1 and mine[-1].hi == FULL
        assert all(a.hi == b.lo for a, b in zip(mine, mine[1:], strict=False))
        for s in stored:  # no stored file starts inside a new part
            if s.layer == layer:
                assert s.lo in {p.lo for p in mine}

    def rows(shard, layer, part):
        a = shard.get(layer, np.zeros(0, int))
        return sum(int(n) for b, n in enumerate(a)
                   if (part.lo <= 0 or (b << bits) >= part.lo)
                   and (part.hi == FULL or (b << bits) < part.hi))

    for bucket, chunks in plan:
        assert [i for chunk in chunks for i in chunk] == list(range(len(hist)))  # in order
        for p in bucket:
            total = sum((np.resize(h.get(p.layer, np.zeros(0, int)), 64) * (np.arange(64) < len(
                h.get(p.layer, []))) for h in hist), np.zeros(64, int))
            blocks = [n for b, n in enumerate(total) if n and (p.lo <= 0 or (b << bits) >= p.lo)
                      and (p.hi == FULL or (b << bits) < p.hi)]
            if p.layer not in stored_cuts and sum(blocks) > budget:
                assert len(blocks) == 1  # too big, yet not cut: a single block
        for chunk in chunks:
            n = sum(rows(hist[i], p.layer, p) for i in chunk for p in bucket)
            assert len(chunk) <= max_shards
            assert n <= budget or len(chunk) == 1  # a single shard may exceed it


def test_parts_name_their_files_and_tile_the_keys():
    from circuit_atlas.etl.plan import (
        LAST_KEY,
        Part,
        bucket_ranges,
        file_name,
        histogram,
        start,
        start_of_file,
    )

    parts = [Part(-1), Part(3, -1, 512), Part(3, 512, 2048), Part(3, 2048), Part(4)]
    names = [file_name("edges", p) for p in parts]
    assert names == ["src_layer--01.parquet", "src_layer-003.from-0000000.parquet",
                     "src_layer-003.from-0000512.parquet", "src_layer-003.from-0002048.parquet",
                     "src_layer-004.parquet"]
    assert names == sorted(names)  # file order is key order
    assert [start_of_file(n) for n in names] == [Part(p.layer, p.lo) for p in parts]
    assert file_name("neurons", Part(0)) == "layer-000.parquet"
    ranges = bucket_ranges("edges", [parts[:2], parts[2:4], parts[4:]])
    assert ranges[0][0] == 0 and ranges[-1][1] == LAST_KEY
    assert [b for _, b in ranges[:-1]] == [a for a, _ in ranges[1:]]  # no gap, no overlap
    keys = pack([3, 3, 3, 3, 4, 9], [511, 512, 2047, 2048, 0, 7], [5] * 6, [9] * 6)
    lo, hi = ranges[1]
    assert list((keys >= lo) & (keys < hi)) == [False, True, True, True, False, False]
    assert start("edges", Part(3, 512)) <= keys[1]
    # rows per layer and block of 2**9 neurons, whatever the key order
    hist = histogram("edges", keys[::-1], 9)
    assert {k: list(v) for k, v in hist.items()} == {3: [1, 1, 0, 1, 1], 4: [1], 9: [1]}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tables=st.integers(1, 8), rows=st.integers(0, 60),
       keys=st.integers(1, 12))
def test_fold_is_a_left_fold_in_list_order(seed, tables, rows, keys):
    """Float sums per key are added one row at a time, in list order then row order
    (compared bit for bit with Python's own additions); counts, minima and maxima
    merge as they should; the result is sorted by key."""
    from circuit_atlas.etl.edge_reduce import EDGE_MERGE
    from circuit_atlas.etl.fold import fold

    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(tables):
        n = int(rng.integers(0, rows + 1))
        w = rng.normal(size=(3, n)) * 10.0 ** rng.integers(-8, 8, (3, n))
        parts.append(pa.table({
            "key": rng.integers(0, keys, n), "count": rng.integers(1, 5, n),
            "graph_count": rng.integers(1, 3, n), "weight_sum": w[0], "weight_abs_sum": w[1],
            "weight_sq_sum": w[2], "weight_min": rng.normal(size=n).astype(np.float32),
            "weight_max": rng.normal(size=n).astype(np.float32)}, schema=PARTIAL))
    want: dict[int, dict[str, float]] = {}
    for row in (r for p in parts for r in p.to_pylist()):
        if row["key"] not in want:
            want[row["key"]] = row
            continue
        acc = want[row["key"]]
        for c in ("count", "graph_count", "weight_sum", "weight_abs_sum", "weight_sq_sum"):
            acc[c] += row[c]
        acc["weight_min"] = min(acc["weight_min"], row["weight_min"])
        acc["weight_max"] = max(acc["weight_max"], row["weight_max"])
    got = fold(parts, EDGE_MERGE)
    assert got.column("key").to_pylist() == sorted(want)
    assert got.to_pylist() == [want[k] for k in sorted(want)]  # float sums bit for bit

