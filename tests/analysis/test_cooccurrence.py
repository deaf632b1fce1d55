"""Co-occurrence on a real LocalCluster against a dense numpy X^T X of the same lake."""

import numpy as np
import polars as pl
import pytest

from circuit_atlas import CircuitAtlasError
from circuit_atlas.analysis.cooccurrence import cooccurrence_lake
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
