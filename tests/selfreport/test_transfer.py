"""One head shared by many neurons: told a neuron by its input weights, it reports
neurons it never trained on (on a tiny random model every neuron of a layer computes
the same function of its own weights, so it can); nothing of a held-out neuron reaches
training; the scores equal per-neuron fits done one by one; the several-neuron dataset
equals one-neuron datasets."""

import dataclasses

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.selfreport import evaluate as ev
from circuit_atlas.selfreport.dataset import run_dataset
from circuit_atlas.selfreport.params import DatasetParams, TransferParams
from circuit_atlas.selfreport.transfer import run_transfer

PARAMS = TransferParams(read_layer=1, lr=3e-3, width=128, epochs=20)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(model, lake root): a tiny random model with 256 neurons per layer, and a
    dataset of every neuron of its layer 1."""
    from tests.factories import tiny_model_dir
    from tests.labeling.test_scoring import corpus

    root = tmp_path_factory.mktemp("transfer")
    model = tiny_model_dir(root / "tiny", seed=1, d=16, neurons=256, n_layers=2)
    lake = Lake.init(root / "lake")
    lake.import_prompts([{"text": t} for t in corpus(200)], "c")
    run_dataset(lake, model=model, corpora="c", params=DatasetParams(
        neuron="L1/*", context=8, val=0.15, test=0.25))
    return model, str(lake.root)


def test_the_shared_head_reports_neurons_it_never_trained_on(wide, tmp_path):
    model, root = wide
    plots = tmp_path / "plots"
    args = ["self-report", "transfer", "--lake", root, "--model", model, "--corpus", "c",
            "--read-layer", "1", "--lr", "0.003", "--width", "128", "--epochs", "20",
            "--plots", str(plots)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "self-report transfer c (weights, 192 trained, 64 held out" in result.output
    for name in ("learning.png", "neurons.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Lake(root).table("selfreport_transfer").filter(pl.col("split") == "test").collect()
    med = {(role, m): r for role, m, r in table.group_by("role", "method").agg(
        pl.col("r2").median()).rows()}
    # measured: held out 0.71 (their own probes 0.17), trained 0.78 (probes 0.21)
    assert med["held out", "self-report"] > 0.5
    assert med["held out", "self-report"] > med["held out", "linear probe"] + 0.3
    assert med["trained", "self-report"] > 0.5
    assert med["held out", "self-report"] > med["held out", "nearest neuron"] + 0.3
    assert abs(med["trained", "mean"]) < 0.05
    assert set(table.filter(pl.col("role") == "trained")["method"]) == {
        "self-report", "linear probe", "mean"}
    manifest = Lake(root).table_manifest("tiny", "c", "selfreport_transfer")["inputs"]
    run = manifest["runs"]["weights"]
    held = {tuple(r) for r in table.filter(pl.col("role") == "held out").select(
        "layer", "neuron").unique().rows()}
    assert len(held) == 64 and len(run["held_out_neurons"]) == 64
    assert len(run["learning"]) == 20 and run["width"] == 128
    # a learned vector per neuron: one head for many, trained neurons only
    report = run_transfer(root, model=model, corpora="c", params=dataclasses.replace(
        PARAMS, identity="embedding", held_out="0"))
    assert report.held_out == 0 and report.medians["trained"]["self-report"] > 0.4
    both = Lake(root).table("selfreport_transfer").collect()
    assert set(both["identity"]) == {"weights", "embedding"}  # the runs side by side


def test_held_out_activations_never_reach_training(wide):
    """The head's predictions do not change when the held-out neurons' training and
    validation activations are replaced by noise (same seed: bit for bit)."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.selfreport.trainer import SPLITS, features
    from circuit_atlas.selfreport.transfer import (
        Many,
        held_out_neurons,
        identity_vectors,
        train_transfer,
    )

    model, root = wide
    table = Lake(root).table("selfreport_dataset", "tiny", "c").collect()
    neurons = sorted(set(table.select("layer", "neuron").iter_rows()))[:80]
    data = {s: Many.of(table.filter(pl.col("split") == s), neurons) for s in SPLITS}
    params = dataclasses.replace(PARAMS, epochs=3)
    held = set(held_out_neurons(neurons, params))
    trained = np.array([i for i, n in enumerate(neurons) if n not in held])
    out = np.array([i for i, n in enumerate(neurons) if n in held])
    loaded = load_model(model, dtype="float32")
    frozen = {s: features(loaded, data[s].windows, 1) for s in SPLITS}
    ident = identity_vectors(loaded.adapter, neurons)
    first, _ = train_transfer(frozen, data, ident, trained, params)
    rng = np.random.default_rng(1)
    for s in ("train", "val"):
        data[s].targets[:, out] = rng.normal(size=(len(data[s].targets), len(out)))
    second, _ = train_transfer(frozen, data, ident, trained, params)
    for s in ("val", "test"):
        np.testing.assert_array_equal(first[s], second[s])


def test_scores_equal_fits_one_neuron_at_a_time(wide):
    """Each neuron's linear-probe and mean scores equal a ridge fit on that neuron alone
    and numpy; the nearest neuron is the most alike in cosine of the input weights."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.selfreport.trainer import SPLITS, features
    from circuit_atlas.selfreport.transfer import Many, identity_vectors, nearest_trained

    model, root = wide
    run_transfer(root, model=model, corpora="c", params=dataclasses.replace(
        PARAMS, epochs=1))
    table = Lake(root).table("selfreport_transfer").filter(
        (pl.col("identity") == "weights") & (pl.col("split") == "test")).collect()
    data_table = Lake(root).table("selfreport_dataset", "tiny", "c").collect()
    neurons = sorted(set(data_table.select("layer", "neuron").iter_rows()))
    loaded = load_model(model, dtype="float32")
    for layer, neuron in neurons[:5]:
        data = {s: Many.of(data_table.filter(pl.col("split") == s), [(layer, neuron)])
                for s in SPLITS}
        frozen = {s: features(loaded, data[s].windows, 1) for s in SPLITS}
        fit, _ = ev.fit_ridge({s: (frozen[s], data[s].targets[:, 0]) for s in SPLITS})
        got = table.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron))
        by = {m: r for m, r in got.select("method", "r2").rows()}
        assert by["linear probe"] == pytest.approx(ev.r2(data["test"].targets[:, 0],
                                                         fit["test"]), abs=1e-6)
        mean = np.full(len(data["test"].targets), data["train"].targets[:, 0].mean())
        assert by["mean"] == pytest.approx(ev.r2(data["test"].targets[:, 0], mean), abs=1e-9)
    ident = identity_vectors(loaded.adapter, neurons[:6])
    trained = np.array([0, 2, 4])
    near = nearest_trained(ident, trained)
    cos = ident @ ident.T / np.outer(*(2 * [np.linalg.norm(ident, axis=1)]))
    for k in range(6):
        options = [t for t in trained if t != k]
        assert near[k] == max(options, key=lambda t: cos[k, t])
    blk = loaded.adapter.blocks[1]
    raw = np.concatenate([(blk.gate[3] * blk.mlp_norm).numpy(),
                          (blk.up[3] * blk.mlp_norm).numpy()])
    np.testing.assert_allclose(ident[3] / np.linalg.norm(ident[3]),
                               raw / np.linalg.norm(raw), rtol=1e-5)


def test_a_dataset_of_several_neurons_equals_one_neuron_datasets(planted, tmp_path):
    import shutil

    model, root = planted
    lake = tmp_path / "lake"
    shutil.copytree(root, lake)
    run_dataset(lake, model=model, corpora="c", params=DatasetParams(
        neuron="L1/N9", context=6))
    one = Lake(lake).table("selfreport_dataset", "tiny", "c").collect()
    from circuit_atlas.selfreport.scanner import run_scan

    run_scan(lake, model=model, corpora="c")
    report = run_dataset(lake, model=model, corpora="c", params=DatasetParams(
        neuron="L1/N9, L0/N3,top:2", context=6))
    many = Lake(lake).table("selfreport_dataset", "tiny", "c").collect()
    best = Lake(lake).table("selfreport_candidates", "tiny", "c").sort("rank").head(2).select(
        "layer", "neuron").collect().rows()
    want = sorted({(1, 9), (0, 3), *best})
    assert sorted(set(many.select("layer", "neuron").iter_rows())) == want
    assert report.neurons == [f"L{a}/N{b}" for a, b in want]
    mine = many.filter((pl.col("layer") == 1) & (pl.col("neuron") == 9)).sort("window_id")
    assert mine.drop("activations").equals(one.sort("window_id").drop("activations"))
    for a, b in zip(mine["activations"], one.sort("window_id")["activations"], strict=True):
        np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    with pytest.raises(CircuitAtlasError, match="transfer needs a dataset of several"):
        run_dataset(lake, model=model, corpora="c", params=DatasetParams(
            neuron="L1/N9", context=6))
        run_transfer(lake, model=model, corpora="c")


def test_refusals(wide, tmp_path):
    model, root = wide
    with pytest.raises(CircuitAtlasError, match="--held-out 0"):
        TransferParams(identity="embedding")
    with pytest.raises(CircuitAtlasError, match="--held-out: a share"):
        TransferParams(held_out="1.5")
    with pytest.raises(CircuitAtlasError, match="L1/N999: not in the dataset"):
        run_transfer(root, model=model, corpora="c", params=TransferParams(
            held_out="L1/N3,L1/N999"))
    with pytest.raises(CircuitAtlasError, match="self-report scan first"):
        Lake.init(tmp_path / "empty").import_prompts([{"text": "w1 w2 w3"}], "c")
        run_dataset(tmp_path / "empty", model=model, corpora="c", params=DatasetParams(
            neuron="top:3"))
    with pytest.raises(CircuitAtlasError, match="the model has 2 layers"):
        run_dataset(tmp_path / "empty", model=model, corpora="c", params=DatasetParams(
            neuron="L5/*"))
