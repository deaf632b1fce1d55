"""Clustering: planted modules recovered, reproducible, consistent hierarchies, edge cases,
and the lake round trip (on this process and on a Dask worker)."""

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas import CircuitAtlasError
from circuit_atlas.cli import cli
from circuit_atlas.clustering.methods import cluster, method_params
from circuit_atlas.clustering.network import build_network, link_frame, network_params
from circuit_atlas.clustering.run import cluster_lake, compare_methods
from circuit_atlas.clustering.tables import assignment_table, cluster_table, nmi
from circuit_atlas.lake import Lake
from tests.factories import MODEL, N_LAYERS, planted_edges, write_edge_table

METHODS = ("infomap", "leiden")


def network_of(table, **kw):
    params = network_params(**kw)
    return build_network(link_frame(table.lazy(), params, N_LAYERS).collect(), params)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_modules_are_recovered(method, seed):
    table, module, _ = planted_edges(np.random.default_rng(seed))
    net = network_of(table)
    partition = cluster(net, method, method_params(method))
    assert nmi(module[net.index], partition.top) >= 0.9


def test_planted_modules_through_min_count_and_top_k():
    table, module, _ = planted_edges(np.random.default_rng(3), modules=5, size=40)
    net = network_of(table, min_count=10, top_k=8)
    assert net.n_links < len(table)
    counts = np.bincount(net.src)
    assert counts.max() <= 8
    partition = cluster(net, "infomap", method_params("infomap"))
    assert nmi(module[net.index], partition.top) >= 0.9


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_assignments(method):
    table, _, _ = planted_edges(np.random.default_rng(4), p_out=0.05)
    net = network_of(table)
    runs = [cluster(net, method, method_params(method, seed=s)) for s in (7, 7, 8)]
    assert runs[0].paths == runs[1].paths
    np.testing.assert_array_equal(runs[0].flow, runs[1].flow)
    assert len(runs[2].paths) == net.n_nodes  # another seed may differ, but is complete


@pytest.mark.parametrize("method", METHODS)
def test_hierarchy_is_consistent(method):
    table, module, sub = planted_edges(np.random.default_rng(5), modules=4, size=60,
                                       sub_modules=3, p_in=0.08, p_sub=0.7, p_out=0.004)
    net = network_of(table)
    partition = cluster(net, method, method_params(method))
    planted = (module * 10 + sub)[net.index]
    paths = np.array([":".join(map(str, p)) for p in partition.paths])
    assert partition.stats["levels"] == 2 and nmi(planted, paths) >= 0.9
    assignments = pl.from_arrow(assignment_table(net, partition))
    clusters = pl.from_arrow(cluster_table(assignment_table(net, partition)))
    # every node's ids are the prefix of its path, its depth the path's length
    for row in assignments.iter_rows(named=True):
        path = [int(x) for x in row["cluster_path"].split(":")]
        assert row["depth"] == len(path) and row["top_cluster"] == path[0]
        assert row["sub_module"] == (path[1] if len(path) > 1 else None)
    # sizes add up: a module's children hold exactly its members
    by_path = {r["cluster_path"]: r for r in clusters.iter_rows(named=True)}
    for path, row in by_path.items():
        children = [r for p, r in by_path.items() if p.rsplit(":", 1)[0] == path and p != path]
        if children:
            assert sum(c["size"] for c in children) == row["size"]
        members = assignments.filter((pl.col("cluster_path") == path)
                                     | pl.col("cluster_path").str.starts_with(path + ":"))
        assert len(members) == row["size"]
        assert row["layer_min"] == members["layer"].min()
        assert row["flow"] == pytest.approx(members["flow"].sum())
    top = clusters.filter(pl.col("level") == 1)
    assert top["size"].sum() == net.n_nodes
    assert sorted(top["top_cluster"]) == list(range(1, len(top) + 1))
    assert partition.flow.sum() == pytest.approx(1.0)


def test_modularity_matches_numpy():
    table, _, _ = planted_edges(np.random.default_rng(6))
    net = network_of(table)
    partition = cluster(net, "leiden", method_params("leiden"))
    c, w = partition.top, net.weight
    kout, kin = (np.bincount(x, w, net.n_nodes) for x in (net.src, net.tgt))
    q = w[c[net.src] == c[net.tgt]].sum() / w.sum() - sum(
        kout[c == k].sum() * kin[c == k].sum() for k in np.unique(c)) / w.sum() ** 2
    assert partition.stats["modularity"] == pytest.approx(q)


def _edge(src, tgt, w=1.0, count=9):
    return {"src_layer": src[0], "src_neuron": src[1], "tgt_layer": tgt[0],
            "tgt_neuron": tgt[1], "w": w, "count": count}


@pytest.mark.parametrize("method", METHODS)
def test_tiny_networks(method):
    params = network_params()
    # one edge: both ends in one module
    one = build_network(pl.DataFrame([_edge((0, 1), (1, 2))]), params)
    part = cluster(one, method, method_params(method))
    assert part.top.tolist() == [1, 1]
    # isolated nodes: each in a module of its own, after the linked ones, with no flow
    # under Infomap (Leiden: no link weight, so no flow either)
    links = pl.DataFrame([_edge((0, 1), (1, 2)), _edge((1, 2), (2, 3)), _edge((0, 1), (2, 3))])
    iso = build_network(links, params, nodes=pl.DataFrame({"layer": [0, 2], "neuron": [7, 9]}))
    part = cluster(iso, method, method_params(method))
    by_id = dict(zip(iso.node_ids(range(iso.n_nodes)), part.top.tolist(), strict=True))
    assert by_id["L0/N1"] == by_id["L1/N2"] == by_id["L2/N3"] == 1
    assert {by_id["L0/N7"], by_id["L2/N9"]} == {2, 3}
    assert part.flow[[iso.node_ids(range(iso.n_nodes)).index(x)
                      for x in ("L0/N7", "L2/N9")]].sum() == 0
    # all weights equal on a ring of two triangles: still two modules
    ring = [_edge((0, a), (1, b)) for a, b in [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)]]
    ring.append(_edge((0, 2), (1, 3)))
    part = cluster(build_network(pl.DataFrame(ring), params), method, method_params(method))
    assert part.stats["nodes"] == 12 and part.stats["top_modules"] >= 1


def test_bad_parameters_and_empty_network():
    with pytest.raises(CircuitAtlasError, match="unknown weight"):
        network_params(weight="nope")
    with pytest.raises(CircuitAtlasError, match="flow model"):
        method_params("infomap", flow_model="sideways")
    with pytest.raises(CircuitAtlasError, match="unknown clustering method"):
        method_params("kmeans")
    table, _, _ = planted_edges(np.random.default_rng(0), modules=2, size=5)
    empty = network_of(table, min_count=10**6)
    with pytest.raises(CircuitAtlasError, match="lower the min count"):
        cluster(empty, "infomap", method_params("infomap"))


def test_filters_drop_embeddings_and_logits():
    links = pl.DataFrame([_edge((-1, 5), (0, 1)), _edge((0, 1), (1, 2)),
                          _edge((1, 2), (N_LAYERS, 9)), _edge((0, 1), (2, 3), count=2)])
    lf = links.rename({"w": "mean_abs_weight"}).with_columns(
        graph_count=pl.col("count"), weight_abs_sum=pl.col("mean_abs_weight")).lazy()

    def kept(**kw):
        params = network_params(**kw)
        out = link_frame(lf, params, N_LAYERS).collect()
        return sorted(zip(out["src_layer"], out["tgt_layer"], strict=True))

    assert kept() == [(0, 1)]
    assert kept(include_embeddings=True, include_logits=True) == [(-1, 0), (0, 1), (1, N_LAYERS)]
    assert kept(min_count=1) == [(0, 1), (0, 2)]
    with pytest.raises(CircuitAtlasError, match="layer count"):
        link_frame(lf, network_params(), None)


def planted_lake(path, n_layers=N_LAYERS):
    lake = Lake.init(path)
    table, module, _ = planted_edges(np.random.default_rng(8))
    write_edge_table(lake, table, n_layers=n_layers)
    return lake, module


def test_cluster_lake_publishes_both_methods(tmp_path):
    lake, module = planted_lake(tmp_path / "l")
    first = cluster_lake(lake, MODEL, "c", "infomap", network_params(),
                         method_params("infomap"))
    assert first.where == "this process" and first.phases["cluster"] >= 0
    before = lake.table("cluster_assignments").collect()
    cluster_lake(lake, MODEL, "c", "leiden", network_params(), method_params("leiden"))
    after = lake.table("cluster_assignments").collect()
    assert sorted(after["method"].unique()) == ["infomap", "leiden"]
    # the leiden run carried the infomap file over unchanged
    assert after.filter(pl.col("method") == "infomap").sort("layer", "neuron").equals(
        before.sort("layer", "neuron"))
    for m in METHODS:
        got = after.filter(pl.col("method") == m)
        assert nmi(module[got["neuron"].to_numpy()], got["top_cluster"].to_numpy()) >= 0.9
    clusters = lake.table("clusters").collect()
    assert set(clusters["method"]) == {"infomap", "leiden"}
    report = compare_methods(lake, MODEL, "c")
    assert set(report["methods"]) == {"infomap", "leiden"}
    assert report["nmi"][0]["nmi_top"] >= 0.9
    assert report["methods"]["infomap"]["codelength_savings"] > 0
    # rerunning one method replaces only its own part
    cluster_lake(lake, MODEL, "c", "infomap", network_params(),
                 method_params("infomap", two_level=True))
    manifest = lake.table_manifest(MODEL, "c", "cluster_assignments")
    assert manifest["inputs"]["methods"]["infomap"]["params"]["two_level"] is True
    assert "leiden" in manifest["inputs"]["methods"]
    assert len(manifest["files"]) == 2


def test_cluster_lake_runs_on_a_worker_and_refuses_what_cannot_fit(tmp_path, client):
    lake, module = planted_lake(tmp_path / "l")
    report = cluster_lake(lake, MODEL, "c", "infomap", network_params(),
                          method_params("infomap"), client=client)
    assert report.where.startswith("worker tcp://")
    got = lake.table("cluster_assignments").collect()
    assert nmi(module[got["neuron"].to_numpy()], got["top_cluster"].to_numpy()) >= 0.9
    from circuit_atlas.etl.clusters import dask_client

    with dask_client(n_workers=1, memory_limit="100MB", echo=None) as small, \
            pytest.raises(CircuitAtlasError, match="raise --min-count"):
        cluster_lake(lake, MODEL, "c", "leiden", network_params(), method_params("leiden"),
                     client=small)
    assert lake.table_manifest(MODEL, "c", "cluster_assignments")["inputs"]["methods"].keys() \
        == {"infomap"}


def test_missing_tables_give_clear_errors(tmp_path):
    lake = Lake.init(tmp_path / "l")
    with pytest.raises(CircuitAtlasError, match="circuit-atlas reduce"):
        cluster_lake(lake, MODEL, "c", "infomap", network_params(), method_params("infomap"))
    with pytest.raises(CircuitAtlasError, match="circuit-atlas cluster"):
        compare_methods(lake, MODEL, "c")
    old, _ = planted_lake(tmp_path / "old", n_layers=None)
    with pytest.raises(CircuitAtlasError, match="reduce again"):
        cluster_lake(old, MODEL, "c", "infomap", network_params(), method_params("infomap"))


def test_cli_cluster_and_report(tmp_path):
    lake, _ = planted_lake(tmp_path / "l")
    runner = CliRunner()
    base = ["--lake", lake.url, "--corpus", "c", "--model", MODEL]
    out = runner.invoke(cli, ["cluster", *base, "--method", "infomap", "--method", "leiden"])
    assert out.exit_code == 0, out.output
    assert "NMI infomap vs leiden" in out.output and "clusterings" in out.output
    out = runner.invoke(cli, ["cluster", *base, "--report-only", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["methods"]["leiden"]["params"]["seed"] == 42
    out = runner.invoke(cli, ["cluster", *base, "--min-count", "100000"])
    assert out.exit_code == 1 and "lower the min count" in out.output
    assert "Traceback" not in out.output
