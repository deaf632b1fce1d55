"""Co-occurrence on a real LocalCluster against a dense numpy X^T X of the same lake."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_atlas import CircuitAtlasError
from circuit_atlas.analysis.cooccurrence import (
    cooccurrence_lake,
    incidence,
    joint_counts,
    plan_buckets,
    shard_groups,
    touched,
)
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import Lake
from tests.factories import MODEL, N_LAYERS, prompts_of, write_shard


def make_lake(path, shards=4, neurons=25):
    lake = Lake.init(path)
    for s in range(shards):
        write_shard(lake, "c", prompts_of(6 + s, f"s{s}"), seed=s, neurons=neurons)
    # a shard that repeats graphs of the first: they must count once
    write_shard(lake, "c", prompts_of(6, "s0"), seed=0, neurons=neurons)
    return lake


def oracle(lake, k, min_count, max_share, rank_by):
    nodes = lake.scan("graph_nodes").filter(
        pl.col("layer").is_between(0, N_LAYERS - 1) & (pl.col("neuron") >= 0)).select(
        "graph_id", "layer", "neuron").unique().collect()
    graphs = np.unique(lake.scan("graphs").select("graph_id").collect()["graph_id"])
    keys = nodes.select("layer", "neuron").unique().sort("layer", "neuron")
    kid = {k_: i for i, k_ in enumerate(keys.iter_rows())}
    gid = {g: i for i, g in enumerate(graphs)}
    x = np.zeros((len(graphs), len(kid)), np.int64)
    for g, la, ix in nodes.iter_rows():
        x[gid[g], kid[(la, ix)]] = 1
    c = x.T @ x
    count = np.diag(c)
    n = len(graphs)
    hub = count > max_share * n
    rows = []
    names = list(kid)
    for a in range(len(names)):
        if hub[a]:
            continue
        cands = []
        for b in range(len(names)):
            j = c[a, b]
            if b == a or hub[b] or j < min_count:
                continue
            jac = j / (count[a] + count[b] - j)
            p = j / n
            npmi = 1.0 if p == 1 else np.log(p / (count[a] / n * count[b] / n)) / -np.log(p)
            score = {"jaccard": jac, "npmi": npmi, "joint_count": j}[rank_by]
            cands.append((-score, -j, names[b], j, count[a], count[b], jac, npmi))
        for cand in sorted(cands)[:k]:
            rows.append((*names[a], *cand[2], *cand[3:]))
    return rows, [names[i] for i in np.flatnonzero(hub)]


@settings(max_examples=150, deadline=None)
@given(sets=st.lists(st.sets(st.integers(0, 14), max_size=9), max_size=14),
       cut=st.integers(0, 14), buckets=st.integers(1, 6), chunk=st.integers(1, 3))
def test_bucket_products_equal_dense_counts(sets, cut, buckets, chunk):
    """The bucket products over groups' touched graphs equal a dense X^T X: every
    bucket, every grouping of graphs, chunks of files summed, hubs (keys 0 and 7) out."""
    keys = np.array([k for k in range(15) if k not in (0, 7)], np.int64) * 10
    n = len(keys)
    dense = np.zeros((len(sets), n), np.int64)
    for g, neurons in enumerate(sets):
        for k in neurons:
            if k not in (0, 7):
                dense[g, np.searchsorted(keys, k * 10)] = 1
    want = dense.T @ dense
    groups = [range(0, min(cut, len(sets))), range(min(cut, len(sets)), len(sets))]
    files = []
    for group in groups:  # graph ids not consecutive: numbered within the group
        members = pl.DataFrame({"graph_id": [1000 - 3 * g for g in group for _ in sets[g]],
                                "key": [10 * k for g in group for k in sorted(sets[g])]},
                               schema={"graph_id": pl.Int64, "key": pl.Int64})
        files.append(incidence(members, keys))
    for lo, hi in plan_buckets(np.ones(n), buckets):
        parts = [touched(f, lo, hi) for f in files]
        chunks = [parts[i:i + chunk] for i in range(0, len(parts), chunk)]
        got = sum(joint_counts(c, n, lo, hi).toarray() for c in chunks)
        np.testing.assert_array_equal(got, want[lo:hi])


def test_shard_groups_cover_every_shard_once():
    for shards, threads in [(0, 2), (1, 2), (5, 2), (100, 2), (3560, 64), (100_000, 4)]:
        groups = shard_groups(shards, threads)
        assert [i for g in groups for i in g] == list(range(shards))
        assert all(0 < len(g) <= 256 for g in groups)
        assert len(groups) == min(shards, max(4 * threads, -(-shards // 256)))


@pytest.mark.parametrize(("rank_by", "max_share", "neurons"), [
    ("jaccard", 0.5, 25), ("npmi", 1.0, 25), ("joint_count", 0.4, 3), ("jaccard", 0.4, 3)])
def test_cooccurrence_equals_dense_numpy(tmp_path, client, rank_by, max_share, neurons):
    lake = make_lake(tmp_path / "l", neurons=neurons)
    reduce_lake(lake, MODEL, ["c"], client)
    report = cooccurrence_lake(lake, MODEL, ["c"], client, k=4, min_count=2,
                               max_share=max_share, rank_by=rank_by, buckets=3)
    want, hubs = oracle(lake, 4, 2, max_share, rank_by)
    got = lake.table("cooccurrence").drop("model", "corpus").collect()
    assert report.rows == len(got) == len(want) > 0
    assert report.graphs == 6 + 7 + 8 + 9
    got_rows = sorted(got.iter_rows())
    for g, w in zip(got_rows, sorted(want), strict=True):
        assert g[:7] == tuple(int(v) for v in w[:7])
        assert g[7] == pytest.approx(w[7]) and g[8] == pytest.approx(w[8])
    manifest = lake.table_manifest(MODEL, "c", "cooccurrence")
    assert manifest["inputs"]["hubs"] == [f"L{a}/N{b}" for a, b in hubs]
    assert bool(hubs) == (neurons == 3)  # few neurons: some are in most graphs
    # both directions: a pair kept for both neurons appears twice
    pairs = set(zip(got["layer"], got["neuron"], got["other_layer"], got["other_neuron"],
                    strict=True))
    assert any((c, d, a, b) in pairs for a, b, c, d in pairs)


def test_cooccurrence_needs_a_current_reduce(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=2)
    with pytest.raises(CircuitAtlasError, match="circuit-atlas reduce"):
        cooccurrence_lake(lake, MODEL, ["c"], client)
    reduce_lake(lake, MODEL, ["c"], client)
    write_shard(lake, "c", prompts_of(3, "late"), seed=9)
    with pytest.raises(CircuitAtlasError, match="committed since"):
        cooccurrence_lake(lake, MODEL, ["c"], client)
    with pytest.raises(CircuitAtlasError, match="ranking"):
        cooccurrence_lake(lake, MODEL, ["c"], client, rank_by="vibes")
