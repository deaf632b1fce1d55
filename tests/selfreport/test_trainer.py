"""Self-report training on the planted tiny model: the regression head and the model
trained from its last block report the planted neuron on held-out documents (R² > 0.9),
as the linear probe does, and the bag of tokens as far as the neuron is a function of
the token; the metrics are exact against numpy; a rerun with the same seed repeats."""

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.selfreport import evaluate as ev
from circuit_atlas.selfreport.params import DatasetParams, TrainParams
from circuit_atlas.selfreport.trainer import run_train


@pytest.fixture(scope="module")
def dataset(planted):
    from circuit_atlas.selfreport.dataset import run_dataset

    model, root = planted
    run_dataset(root, model=model, corpora="c", params=DatasetParams(
        neuron="L1/N7", context=8, val=0.15, test=0.25))
    return model, root


def results(root):
    return Lake(root).table("selfreport_results").filter(pl.col("split") == "test").collect()


def test_the_planted_neuron_is_reported_on_held_out_documents(dataset, tmp_path):
    model, root = dataset
    plots = tmp_path / "plots"
    # the head reads the residual entering the neuron's block: the planted direction is
    # there, so the probe (and the head, trained to it) read the neuron off linearly
    args = ["self-report", "train", "--lake", root, "--model", model, "--corpus", "c",
            "--read-layer", "1", "--epochs", "60", "--lr", "0.05", "--patience", "5",
            "--plots", str(plots)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for name in ("learning.png", "predicted.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "self-report train c L1/N7 (regression, head" in result.output
    report = run_train(root, model=model, corpora="c", params=TrainParams(
        unfreeze="last:1", epochs=30, lr=1e-2))
    assert report.results["self-report"] > 0.9
    test = results(root)
    test = test.filter(pl.col("head") == "regression")
    r2 = {(r["method"], r["unfreeze"]): r["r2"] for r in test.iter_rows(named=True)}
    assert r2["self-report", "head"] > 0.9 and r2["linear probe", "head"] > 0.9
    assert r2["self-report", "last:1"] > 0.9
    assert r2["bag of tokens", "head"] > 0.8  # the neuron is a function of its token
    assert abs(r2["mean", "head"]) < 0.05
    manifest = Lake(root).table_manifest("tiny", "c", "selfreport_results")["inputs"]
    assert {"L1/N7 regression head", "L1/N7 regression last:1"} <= set(manifest["runs"])
    assert manifest["runs"]["L1/N7 regression head"]["read_layer"] == 1
    metrics = Lake(root).table("selfreport_metrics").collect()
    assert set(metrics["unfreeze"]) == {"head", "last:1"}
    assert (metrics["windows_per_s"] > 0).all()


def test_a_rerun_with_the_same_seed_repeats(dataset):
    model, root = dataset
    params = TrainParams(unfreeze="last:1", epochs=3, lr=1e-2, seed=7)
    first = run_train(root, model=model, corpora="c", params=params)
    metrics = Lake(root).table("selfreport_metrics").filter(
        pl.col("unfreeze") == "last:1").collect()
    second = run_train(root, model=model, corpora="c", params=params)
    again = Lake(root).table("selfreport_metrics").filter(
        pl.col("unfreeze") == "last:1").collect()
    assert first.results == second.results
    assert metrics["val_loss"].to_list() == again["val_loss"].to_list()


def test_metrics_equal_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    p = y + rng.normal(scale=0.5, size=500)
    assert ev.r2(y, p) == pytest.approx(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert ev.pearson(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1])
    # ridge for several targets at once, each with its own penalty, against the closed
    # form (X'X + penalty n I) w = X'y on centred data, solved target by target
    x = rng.normal(size=(400, 5))
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    y = np.stack([x @ w + 4.0, x @ w + rng.normal(scale=8, size=400),
                  rng.normal(size=400)], 1)
    splits = {"train": (x[:300], y[:300]), "val": (x[300:], y[300:])}
    preds, chosen = ev.fit_ridges(splits)
    assert chosen[0] == min(ev.PENALTIES)  # noiseless: the least penalty wins
    np.testing.assert_allclose(preds["val"][:, 0], y[300:, 0], atol=1e-3)
    xc, yc = x[:300] - x[:300].mean(0), y[:300] - y[:300].mean(0)
    for k in range(3):
        want = np.linalg.solve(xc.T @ xc + chosen[k] * 300 * np.eye(5), xc.T @ yc[:, k])
        fit = (x[300:] - x[:300].mean(0)) @ want + y[:300, k].mean()
        np.testing.assert_allclose(preds["val"][:, k], fit, rtol=1e-9, atol=1e-9)
        one, penalty = ev.fit_ridge({s: (a, b[:, k]) for s, (a, b) in splits.items()})
        assert penalty == chosen[k]
        np.testing.assert_allclose(one["val"], preds["val"][:, k], rtol=1e-12)


def test_refusals(dataset, tmp_path):
    model, root = dataset
    with pytest.raises(CircuitAtlasError, match="holds L1/N7, not L1/N9"):
        run_train(root, model=model, corpora="c", params=TrainParams(neuron="L1/N9"))
    with pytest.raises(CircuitAtlasError, match="self-report dataset --neuron"):
        Lake.init(tmp_path / "empty")
        run_train(tmp_path / "empty", model=model, corpora="c")
    for bad in ("lora", "lora:0", "last:x", "all"):
        with pytest.raises(CircuitAtlasError, match="head, last:N or lora:R"):
            TrainParams(unfreeze=bad)


@pytest.mark.parametrize("unfreeze", ["last:1", "lora:2"])
def test_a_resumed_run_ends_where_one_straight_through_does(dataset, tmp_path, unfreeze):
    """Two epochs, stopped, resumed to five from the checkpoint: the same metrics and
    test scores as five epochs in one go (same seed), whole blocks or adapters."""
    model, root = dataset

    def run(epochs, folder, resume=False):
        report = run_train(root, model=model, corpora="c", params=TrainParams(
            unfreeze=unfreeze, epochs=epochs, lr=1e-2, seed=3, patience=10,
            checkpoints=str(folder), resume=resume))
        rows = Lake(root).table("selfreport_metrics").filter(
            pl.col("unfreeze") == unfreeze).sort("epoch").collect()
        return report.results, rows["val_loss"].to_list()

    straight = run(5, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(5, tmp_path / "b", resume=True)
    assert resumed == straight
    # evaluated again from its checkpoint, with nothing but the folder: the same scores
    result = CliRunner().invoke(cli, ["self-report", "eval", "--lake", root, "--model", model,
                                      "--corpus", "c", "--checkpoints", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"self-report eval c L1/N7 (regression, {unfreeze}, 5 epochs)" in result.output
    again = results(root).filter((pl.col("unfreeze") == unfreeze)
                                 & (pl.col("method") == "self-report"))
    assert again["r2"].to_list() == [straight[0]["self-report"]]
    with pytest.raises(CircuitAtlasError, match="another run .*lr"):
        run_train(root, model=model, corpora="c", params=TrainParams(
            unfreeze=unfreeze, epochs=6, lr=1e-3, seed=3, patience=10,
            checkpoints=str(tmp_path / "b"), resume=True))
    with pytest.raises(CircuitAtlasError, match="no checkpoint"):
        run_train(root, model=model, corpora="c", params=TrainParams(
            checkpoints=str(tmp_path / "none"), resume=True))
    with pytest.raises(CircuitAtlasError, match="--resume needs --checkpoints"):
        TrainParams(resume=True)


def test_the_classification_head_reads_the_bins(dataset):
    """Quantile bins of a neuron at 0 on most tokens collapse to the distinct values: the
    planted neuron's bins are 'quiet' and 'firing', and the head tells them apart on
    held-out documents."""
    model, root = dataset
    report = run_train(root, model=model, corpora="c", params=TrainParams(
        head="classification", read_layer=1, epochs=40, lr=0.05, patience=5))
    assert report.head == "classification" and report.results["self-report"] > 0.9
    test = results(root).filter((pl.col("head") == "classification")
                                & (pl.col("method") == "self-report")).row(0, named=True)
    assert test["accuracy"] > 0.97 and test["macro_f1"] > 0.9


def test_bins_and_f1_equal_a_count():
    train = np.array([0.0] * 90 + [5.0, 6.0, 7.0, 8.0, 9.0] * 2)
    from circuit_atlas.selfreport.trainer import quantile_edges

    edges = quantile_edges(train, 10)
    assert edges[0] == 0.0 and len(edges) == len(set(edges))
    true = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, p 2, t 2 -> 0.5; class 1: tp 2, p 3, t 2 -> 0.8; class 2: 0
    assert ev.macro_f1(true, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_the_token_head_answers_in_digits(tmp_path):
    """The verbal self-report: after each window, a question; the model (its last two
    blocks trained) answers with the digit of the planted neuron's bin at the window's
    last token. On held-out documents every answer parses and names the right bin; a
    tokenizer without digit tokens is refused."""
    from circuit_atlas.selfreport.dataset import run_dataset
    from tests.factories import WORDS, tiny_model_dir
    from tests.labeling.test_scoring import plant

    model = plant(tiny_model_dir(tmp_path / "tiny", seed=3,
                                 extra_words=tuple(str(d) for d in range(10))))
    lake = Lake.init(tmp_path / "lake")
    rng = np.random.default_rng(0)
    plain = [w for w in WORDS if w not in ("w5", "w6")]
    lake.import_prompts([{"text": " ".join("w5" if rng.random() < 0.3 else
                                           str(rng.choice(plain)) for _ in range(12))}
                         for _ in range(120)], "c")
    run_dataset(lake, model=model, corpora="c", params=DatasetParams(
        neuron="L1/N7", context=3, val=0.15, test=0.25))
    report = run_train(lake, model=model, corpora="c", params=TrainParams(
        head="token", bins=2, unfreeze="last:2", epochs=30, lr=1e-2, patience=5))
    test = {r["method"]: r for r in Lake(lake.root).table("selfreport_results").filter(
        pl.col("split") == "test").collect().iter_rows(named=True)}
    got = test["self-report"]
    assert got["parse_rate"] == 1.0 and got["accuracy"] > 0.95 and got["macro_f1"] > 0.95
    assert report.results["self-report"] > 0.85
    assert test["mean"]["parse_rate"] == 1.0 and test["mean"]["macro_f1"] < 0.6
    from transformers import AutoTokenizer

    from circuit_atlas.selfreport.trainer import answer_tokens

    assert len(answer_tokens(AutoTokenizer.from_pretrained(model), 10)) == 10
    no_digits = AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path / "plain", seed=3))
    with pytest.raises(CircuitAtlasError, match="no single token for the digit 0"):
        answer_tokens(no_digits, 2)
    with pytest.raises(CircuitAtlasError, match="--unfreeze last:N"):
        TrainParams(head="token")


def test_lora_adapters_equal_the_merged_weights(tmp_path):
    """A rank-r adapter starts as the identity change (B = 0: the model's logits
    unchanged), and with A and B set its forward equals the model with each weight
    replaced by W + 2 B A (the merged form); only the adapters have gradients, 2r(in+out)
    numbers per linear map."""
    import torch
    from transformers import AutoModelForCausalLM

    from circuit_atlas.selfreport.lora import LoRALinear, attach
    from tests.factories import tiny_model_dir

    folder = tiny_model_dir(tmp_path / "tiny", seed=5)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64)
    merged = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64)
    ids = torch.tensor([[3, 5, 7, 2, 9, 4]])
    before = model(input_ids=ids).logits
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    params = attach(model.model.layers, 2)
    assert torch.equal(model(input_ids=ids).logits, before)
    linears = [m for m in model.model.layers.modules() if isinstance(m, LoRALinear)]
    assert len(linears) == 7 * len(model.model.layers)  # q k v o, gate up down
    assert sum(p.numel() for p in params) == sum(
        2 * (m.base.in_features + m.base.out_features) for m in linears)
    with torch.no_grad():
        for m in linears:
            m.b.normal_()
            m.a.data = m.a.data.double()
            m.b.data = m.b.data.double()
        names = {id(m): n for n, m in model.model.layers.named_modules()}
        for m in linears:
            target = merged.model.layers.get_submodule(names[id(m)])
            target.weight += 2.0 * m.b @ m.a
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits,
                               rtol=1e-10, atol=1e-10)
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if ".a" not in n[-2:]
               and ".b" not in n[-2:])


def test_lora_reports_the_planted_neuron_and_leaves_the_weights(dataset):
    """Adapters on every block, the head reading the last hidden state: the planted
    neuron reported on held-out documents; the model's own weights are the same after."""
    import dataclasses

    import torch

    from circuit_atlas.compute.models import load_model
    from circuit_atlas.selfreport.lora import LoRALinear
    from circuit_atlas.selfreport.trainer import SPLITS, Data, train

    model, root = dataset
    table = Lake(root).table("selfreport_dataset", "tiny", "c").collect()
    data = {s: Data.of(table.filter(pl.col("split") == s).sort("window_id")) for s in SPLITS}
    loaded = load_model(model, dtype="float32")
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    params = TrainParams(unfreeze="lora:4", epochs=60, lr=1e-2, patience=5)
    preds, _ = train(loaded, data, params)
    # measured 0.88 (the last block whole: 0.96); the frozen model's last hidden state
    # read by the head alone, same budget: 0.35
    alone, _ = train(load_model(model, dtype="float32"), data,
                     dataclasses.replace(params, unfreeze="head"))
    lora, head = (ev.r2(data["test"].targets, p["test"]) for p in (preds, alone))
    assert lora > 0.8 and lora > head + 0.3
    assert any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    after = dict(loaded.model.named_parameters())
    for name, w in weights.items():
        kept = name.replace(".weight", ".base.weight") if name not in after else name
        assert torch.equal(after[kept], w), name
    report = run_train(root, model=model, corpora="c", params=params)
    r2 = {(r["method"], r["unfreeze"]): r["r2"] for r in results(root).iter_rows(named=True)}
    assert report.results["self-report"] == r2["self-report", "lora:4"]


@pytest.mark.parametrize(("unfreeze", "read_layer"), [("last:1", -1), ("last:2", -1),
                                                      ("last:2", 2), ("last:1", 3)])
def test_skipping_the_frozen_blocks_reads_what_the_whole_model_does(planted, unfreeze,
                                                                    read_layer):
    """With last:N the residual entering the first trained block is computed once and
    the blocks before it skipped: the reads and logits equal a full forward's, and after
    a step on the trained blocks they still do (the swap leaves the model whole)."""
    import torch

    from circuit_atlas.compute.activations import padded
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.selfreport.dataset import corpus_windows
    from circuit_atlas.selfreport.trainer import Reader, _trainable, hidden

    model, root = planted
    loaded = load_model(model, dtype="float64")
    texts = Lake(root).scan("prompts", corpus="c").select("prompt_id", "text").collect().rows()
    windows = corpus_windows(loaded.tokenizer, texts[:10], 5)
    params = TrainParams(unfreeze=unfreeze, read_layer=read_layer)
    blocks = _trainable(loaded, params)
    reader = Reader(loaded, params, windows)
    assert reader.first == 3 - params.blocks
    group = windows[:7]  # windows of several lengths: padding handed over too
    ids = padded(group, "cpu")
    for _ in range(2):
        torch.testing.assert_close(reader.read(group), hidden(loaded, ids, read_layer),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(reader.logits(group),
                                   loaded.model(input_ids=ids).logits, rtol=1e-10,
                                   atol=1e-10)
        reader.read(group).sum().backward()
        assert any(p.grad is not None for p in blocks)
        with torch.no_grad():
            for p in blocks:
                if p.grad is not None:
                    p -= 0.01 * p.grad
                p.grad = None
    assert not any(type(m).__name__ == "_Given" for m in loaded.model.modules())
