"""Specificity, roles and profiles: pure functions against independent computations,
and the commands on a reduced lake."""

import json
import math

import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas import CircuitAtlasError
from circuit_atlas.analysis.profile import neuron_profile
from circuit_atlas.analysis.roles import classify, role_features
from circuit_atlas.analysis.specificity import specificity
from circuit_atlas.cli import cli
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import parse_neuron
from tests.factories import MODEL, N_LAYERS, prompts_of, write_shard


def test_specificity_against_the_formulas():
    counts = pl.DataFrame({"layer": [0, 0, 1, 2], "neuron": [1, 1, 5, 7],
                           "corpus_name": ["med", "gen", "med", "gen"],
                           "graph_count": [30, 3, 1, 40]})
    out = specificity(counts, {"med": 40, "gen": 50}, "med", "gen").to_dicts()
    assert [(r["layer"], r["neuron"]) for r in out] == [(0, 1), (1, 5), (2, 7)]
    for r, (cd, cb) in zip(out, [(30, 3), (1, 0), (0, 40)], strict=True):
        pd_, pb = (cd + 1) / 42, (cb + 1) / 52
        assert r["specificity"] == pytest.approx(pd_ / (pd_ + pb))
        lor = math.log((cd + .5) / (40 - cd + .5)) - math.log((cb + .5) / (50 - cb + .5))
        se = math.sqrt(1 / (cd + .5) + 1 / (40 - cd + .5) + 1 / (cb + .5) + 1 / (50 - cb + .5))
        assert r["log_odds"] == pytest.approx(lor)
        assert r["log_odds_low"] == pytest.approx(lor - 1.959964 * se, rel=1e-6)
        assert (r["domain_count"], r["baseline_count"]) == (cd, cb)
    assert out[0]["log_odds_low"] > 0 and out[1]["log_odds_low"] < 0 < out[1]["log_odds_high"]
    assert out[2]["log_odds_high"] < 0  # significantly general
    assert 0.5 < out[1]["specificity"] < 0.75  # one sighting is not certainty
    with pytest.raises(CircuitAtlasError, match="not in the reduced"):
        specificity(counts, {"med": 40}, "med", "gen")


def edge(src, tgt, w, n=10):
    return {"src_layer": src[0], "src_neuron": src[1], "tgt_layer": tgt[0], "tgt_neuron": tgt[1],
            "weight_sum": w * n, "weight_abs_sum": abs(w) * n}


def test_roles_follow_the_documented_rules():
    L = 6
    edges = [edge((-1, 3), (0, 1), 5.0), edge((0, 1), (1, 1), 0.1),   # L0/N1 detector
             *[edge((1, i), (2, 2), 1.0) for i in range(6)],          # L2/N2 integrator
             edge((2, 2), (3, 3), 0.5),
             edge((3, 3), (5, 5), -2.0), edge((3, 3), (4, 4), -1.0),  # L3/N3 inhibitor
             edge((5, 5), (L, 42), 3.0),                              # L5/N5 formatter
             edge((4, 4), (5, 5), 1.0)]
    features = role_features(pl.DataFrame(edges).lazy(), L)
    roles = dict(((r["layer"], r["neuron"]), r["role"]) for r in
                 classify(features, L).iter_rows(named=True))
    assert roles[(0, 1)] == "feature detector"
    assert roles[(2, 2)] == "integrator"
    assert roles[(3, 3)] == "inhibitor"
    assert roles[(5, 5)] == "output formatter"
    row = features.filter((pl.col("layer") == 3) & (pl.col("neuron") == 3)).row(0, named=True)
    assert row["out_negative_share"] == 1.0 and row["targets"] == 2 and row["sources"] == 1
    assert (L, 42) not in roles and (-1, 3) not in roles  # token nodes have no role


def test_parse_neuron():
    assert parse_neuron("L12/N345") == parse_neuron("12:345") == (12, 345)
    with pytest.raises(CircuitAtlasError, match="L12/N345"):
        parse_neuron("12-345")


@pytest.fixture
def reduced(tmp_path, client):
    lake = Lake.init(tmp_path / "l")
    for s in range(2):
        write_shard(lake, "med", prompts_of(6, f"m{s}"), seed=s, neurons=20)
        write_shard(lake, "gen", prompts_of(6, f"g{s}"), seed=10 + s, neurons=20)
    reduce_lake(lake, MODEL, ["med", "gen"], client)
    return lake


def test_commands_and_profile(reduced):
    lake, runner = reduced, CliRunner()
    base = ["--lake", lake.url, "--model", MODEL, "--corpus", "med", "--corpus", "gen"]
    for args in (["specificity", "--domain", "med", "--baseline", "gen"], ["roles"],
                 ["cooccurrence", "--workers", "1", "--min-count", "1"]):
        out = runner.invoke(cli, [args[0], *base, *args[1:]])
        assert out.exit_code == 0, out.output
    spec = lake.table("specificity").collect()
    counts = lake.table("neuron_corpora").collect()
    assert len(spec) == counts.filter(pl.col("layer").is_between(0, N_LAYERS - 1)).select(
        "layer", "neuron").n_unique()
    assert set(lake.table("roles").collect()["role"]) <= {
        "output formatter", "feature detector", "inhibitor", "integrator", "relay", "other"}
    neuron = lake.table("neurons").filter(pl.col("layer") == 1).sort(
        "graph_count", descending=True).head(1).collect().row(0, named=True)
    found = neuron_profile(lake, MODEL, 1, neuron["neuron"])
    assert found["appearances"]["graph_count"] == neuron["graph_count"]
    assert sum(found["appearances"]["by_corpus"].values()) == neuron["graph_count"]
    edges = lake.table("edges").collect()
    up = edges.filter((pl.col("tgt_layer") == 1) & (pl.col("tgt_neuron") == neuron["neuron"]))
    assert len(found["upstream"]) == min(10, len(up))
    top = up.sort("weight_abs_sum", descending=True).row(0, named=True)
    assert found["upstream"][0]["mean_weight"] == pytest.approx(top["mean_weight"])
    assert "role" in found and "specificity" in found and "cooccurring" in found
    assert "projections" not in found and "labels" not in found  # not computed: left out
    out = runner.invoke(cli, ["profile", f"L1/N{neuron['neuron']}", "--lake", lake.url,
                              "--model", MODEL, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["id"] == f"L1/N{neuron['neuron']}"
    out = runner.invoke(cli, ["profile", f"1:{neuron['neuron']}", "--lake", lake.url,
                              "--model", MODEL])
    assert out.exit_code == 0 and "upstream" in out.output and "role" in out.output
    out = runner.invoke(cli, ["profile", "L1/N99999", "--lake", lake.url, "--model", MODEL])
    assert out.exit_code == 1 and "in no graph" in out.output
    assert spec["log_odds"].is_finite().all()
