"""The self-report dataset: activations equal the HF model's own MLP computed on each
window alone, the split is by document (no test text in training), deterministic, and
in the shares asked for; refusals name what to do."""

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.compute.models import load_model
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.splits import document_split
from circuit_atlas.selfreport.dataset import corpus_windows, neuron_activations
from circuit_atlas.selfreport.params import DatasetParams


def test_activations_equal_the_mlp_on_each_window_alone(planted):
    lake = Lake(planted[1])
    model = load_model(planted[0], dtype="float64")
    texts = lake.scan("prompts", corpus="c").select("prompt_id", "text").collect().rows()[:12]
    windows = corpus_windows(model.tokenizer, texts, context=5)
    # several batches; neurons of two layers read in the same forwards
    both = neuron_activations(model, windows, [(2, 17), (0, 3), (2, 5)], batch_tokens=23)
    got = both[2, 17]
    mlp = model.model.model.layers[2].mlp
    seen = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for w in windows:
        seen.clear()
        with torch.no_grad():
            model.model(torch.tensor([w.tokens]))
        x = seen[0][0]
        want = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        np.testing.assert_allclose(got[w.window], want[:, 17].numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(both[2, 5][w.window], want[:, 5].numpy(), rtol=1e-6,
                                   atol=1e-9)
    hook.remove()
    alone = neuron_activations(model, windows, [(0, 3)])[0, 3]
    for w in windows:
        np.testing.assert_array_equal(both[0, 3][w.window], alone[w.window])
    with pytest.raises(CircuitAtlasError, match="L2/N999 is not in this model"):
        neuron_activations(model, windows, [(2, 999)])


def test_the_split_is_by_document_and_the_planted_neuron_fires_at_its_token(planted):
    args = ["self-report", "dataset", "--lake", planted[1], "--model", planted[0],
            "--corpus", "c",
            "--neuron", "L1/N7", "--context", "6", "--val", "0.2", "--test", "0.25"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "self-report dataset c L1/N7: train" in result.output
    lake = Lake(planted[1])
    table = lake.table("selfreport_dataset", "tiny", "c").collect()
    docs = table.group_by("prompt_id").agg(pl.col("split").n_unique().alias("n"),
                                           pl.col("split").first())
    assert (docs["n"] == 1).all()  # every window of a text in one split
    by = {s: set(docs.filter(pl.col("split") == s)["prompt_id"]) for s in ("train", "val",
                                                                          "test")}
    assert not by["train"] & by["test"] and not by["train"] & by["val"]
    shares = {s: len(v) / len(docs) for s, v in by.items()}
    assert shares["test"] == pytest.approx(0.25, abs=0.12)
    assert shares["val"] == pytest.approx(0.2, abs=0.12)
    # every text is there once, cut into windows of 6 that tile it
    texts = lake.scan("prompts", corpus="c").collect()
    assert set(docs["prompt_id"]) == set(texts["prompt_id"])
    # the planted neuron: positive exactly at "w5" (token id 6), 0 elsewhere
    tokens = np.concatenate(table["token_ids"].to_list())
    acts = np.concatenate(table["activations"].to_list())
    assert (acts[tokens == 6] > 1).all() and np.abs(acts[tokens != 6]).max() < 1e-6
    # the same split again, whatever the run
    again = pl.DataFrame({"prompt_id": docs["prompt_id"]}).with_columns(
        split=document_split(pl.col("prompt_id"), 0.2, 0.25))
    assert dict(again.rows()) == dict(docs.select("prompt_id", "split").rows())


def test_refusals():
    with pytest.raises(CircuitAtlasError, match="--val and --test"):
        DatasetParams(neuron="L1/N1", val=0.5, test=0.6)
    with pytest.raises(CircuitAtlasError, match="--context"):
        DatasetParams(neuron="L1/N1", context=1)
