"""The projections and effects tables of the real SmolLM2, written to a lake and read
back, through the functions and the CLI."""

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.compute.attribution import AttributionParams
from circuit_atlas.compute.effects import clean_run, neuron_effects, write_effects
from circuit_atlas.compute.graphs import MAX_TOKENS, graph_job, tokenize
from circuit_atlas.compute.precision import auto_dtype
from circuit_atlas.compute.projections import ProjectionParams, write_projections
from circuit_atlas.lake import Lake, LakeError

PROMPTS = ["The capital of France is", "Insulin is produced by the"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory, smollm2):
    lake = Lake.init(tmp_path_factory.mktemp("atlas") / "lake")
    lake.import_prompts([{"text": t} for t in PROMPTS], "c")
    graph_job(lake, smollm2, "c", AttributionParams(candidates=30))
    return lake


def test_projections_table(lake, smollm2):
    rows, params = write_projections(lake, smollm2, ProjectionParams(k=5), layers=[0, 29])
    table = lake.table("projections").collect()
    assert rows == len(table) == 2 * 1536 * 2 * 2 * 5
    assert table["corpus"].unique().to_list() == ["static"]
    one = table.filter((pl.col("layer") == 29) & (pl.col("neuron") == 7)
                       & (pl.col("kind") == "output")).sort("sign", "rank",
                                                            descending=[True, False])
    # the decoded token is the tokenizer's, values ranked, and the top one checks out
    assert one["token"][0] == smollm2.tokenizer.decode([one["token_id"][0]])
    assert (one.filter(pl.col("sign") == 1)["value"].diff().drop_nulls() <= 0).all()
    a = smollm2.adapter
    want = (a.unembed @ (a.final_norm * a.blocks[29].down[:, 7])).double()
    assert one["value"][0] == pytest.approx(want.max().item(), rel=1e-5)
    manifest = lake.table_manifest(smollm2.name, "static", "projections")
    assert manifest["inputs"]["params"]["norm"] is True
    # auto is resolved before anything runs, and the manifest says what ran
    assert params.dtype == manifest["inputs"]["params"]["dtype"] == auto_dtype("cpu",
                                                                              "projections")
    assert manifest["inputs"]["model_shape"]["n_layers"] == 30


def test_effects_tables(lake, smollm2):
    counts = write_effects(lake, smollm2, ["c"], batch=64)
    pairs = lake.table("effects").collect()
    nodes = lake.scan("graph_nodes").filter((pl.col("layer").is_between(0, 29))
                                      & (pl.col("neuron") >= 0)).collect()
    graphs = lake.scan("graphs").collect()
    want = nodes.join(graphs, on="graph_id").select("prompt_id", "layer", "neuron").unique()
    assert counts["effects"] == len(pairs) == len(want) and counts["prompts"] == 2
    got = set(pairs.select("prompt_id", "layer", "neuron").iter_rows())
    assert got == set(want.iter_rows())
    # one pair against a direct computation
    row = pairs.sort("layer", "neuron").row(0, named=True)
    text = lake.scan("prompts").filter(pl.col("prompt_id") == row["prompt_id"]).collect()
    run = clean_run(smollm2.adapter, tokenize(smollm2, text["text"][0], MAX_TOKENS))
    eff = neuron_effects(smollm2.adapter, run, np.array([row["layer"]]),
                         np.array([row["neuron"]]))
    t = int(run.logits.argmax())
    assert row["target_token"] == t
    assert row["direct"] == pytest.approx(eff.direct[0, t].item(), rel=1e-4, abs=1e-6)
    assert row["total"] == pytest.approx(eff.total[0, t].item(), rel=1e-4, abs=1e-6)
    summary = lake.table("neuron_effects").collect()
    assert len(summary) == pairs.select("layer", "neuron").n_unique()
    assert set(summary["der_class"].drop_nulls()) <= {"routing-dominant", "mixed",
                                                       "logit-dominant"}
    assert summary["prompts"].sum() == len(pairs)


def test_cli_projections_and_effects_for_given_neurons(lake):
    runner = CliRunner()
    out = runner.invoke(cli, ["projections", "--lake", lake.url, "--layer", "3", "--k", "2"])
    assert out.exit_code == 0, out.output
    assert "projections" in out.output and lake.table("projections").collect()[
        "layer"].unique().to_list() == [3]
    out = runner.invoke(cli, ["effects", "--lake", lake.url, "--corpus", "c",
                              "--neuron", "L3/N10", "--neuron", "20:5"])
    assert out.exit_code == 0, out.output
    pairs = lake.table("effects").collect()
    assert len(pairs) == 4 and set(pairs["layer"]) == {3, 20}
    out = runner.invoke(cli, ["effects", "--lake", lake.url, "--corpus", "c",
                              "--neuron", "L3-N10"])
    assert out.exit_code == 2 and "L12/N345" in out.output
    out = runner.invoke(cli, ["effects", "--lake", lake.url, "--corpus", "c",
                              "--neuron", "L99/N1"])
    assert out.exit_code == 1 and "out of range" in out.output


def test_effects_without_graphs(tmp_path, smollm2):
    empty = Lake.init(tmp_path / "e")
    empty.import_prompts([{"text": "Hello"}], "c")
    with pytest.raises(Exception, match="nothing to evaluate|graphs"):
        write_effects(empty, smollm2, ["c"])
    with pytest.raises(LakeError):
        empty.table("effects").collect()
    assert torch.is_grad_enabled()
