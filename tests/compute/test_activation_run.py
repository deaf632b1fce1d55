"""The activations stage end to end on a tiny float64 model with a real word-level
tokenizer: its exemplars and statistics equal a brute force over every activation of
a hooked Hugging Face forward (the MLP's own gate and up projections, not our
down_proj hook), with ties, overlapping windows and texts shorter than a window;
several shards merge to what one shard gives; a second run adds new texts only and
equals a run from scratch; a killed job resumes and commits every text once; Dask
workers give what this process gives."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import torch

from circuit_atlas.compute.activation_run import plan_texts, run_activations
from circuit_atlas.compute.exemplars import BIN_EDGES
from circuit_atlas.compute.models import load_model
from circuit_atlas.compute.params import ActivationsParams
from circuit_atlas.lake import Lake, model_key
from circuit_atlas.lake.activation_shards import activation_shards
from tests.factories import WORDS, tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAMS = ActivationsParams(k=4, context=6, stride=4, shard_tokens=40, batch_tokens=30,
                           dtype="float64")


def texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 15)))) for _ in range(n)]
    # exact ties: a window repeated inside a text, and a text that begins as another does
    out += ["w1 w2 w3 w4 w5 w6 " * 3, "w1 w2 w3 w4 w5 w6 w7 w8"]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=3)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype="float64")


def new_lake(path, prompts):
    lake = Lake.init(path)
    lake.import_prompts([{"text": t} for t in prompts], "c")
    return lake


def hooked_activations(model, tokens: tuple[int, ...]) -> list[np.ndarray]:
    """Per layer (T, n): act_fn(gate_proj(x)) * up_proj(x) from the input x of each
    MLP, read by a forward hook on the MLP module of a plain Hugging Face forward."""
    out = {}
    hooks = []
    for i, layer in enumerate(model.model.model.layers):
        mlp = layer.mlp

        def hook(m, args, _out, i=i):
            x = args[0]
            out[i] = (m.act_fn(m.gate_proj(x)) * m.up_proj(x))[0].double().numpy()
        hooks.append(mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return [out[i] for i in range(len(out))]


def brute_force(model, lake, params):
    """(exemplars, stats) by sorting every counted activation of every neuron."""
    rows = lake.scan("prompts").select("prompt_id", "text").sort("prompt_id").collect().rows()
    windows = [w for _, ws in plan_texts(model.tokenizer, rows, params) for w in ws]
    per_layer = {}
    for w in windows:
        for layer, a in enumerate(hooked_activations(model, w.tokens)):
            keep = np.arange(len(w.tokens)) >= w.skip
            per_layer.setdefault(layer, []).append(
                (a[keep], np.full(keep.sum(), w.window), np.flatnonzero(keep), a))
    ex, stats, full = [], [], {}
    for w in windows:
        for layer, a in enumerate(hooked_activations(model, w.tokens)):
            full[(w.window, layer)] = a
    docs = {w.window: (w.doc, w.start) for w in windows}
    for layer, parts in per_layer.items():
        a = np.concatenate([p[0] for p in parts]).astype(np.float32)
        win = np.concatenate([p[1] for p in parts])
        pos = np.concatenate([p[2] for p in parts])
        for n in range(a.shape[1]):
            for sign in (1, -1):
                order = np.lexsort((pos, win, -sign * a[:, n].astype(np.float64)))[:params.k]
                for rank, i in enumerate(order):
                    ex.append((layer, n, sign, rank, float(a[i, n]), int(win[i]),
                               docs[win[i]][0], docs[win[i]][1], int(pos[i]),
                               full[(win[i], layer)][:, n]))
        a64 = np.concatenate([p[0] for p in parts])
        hist = np.stack([np.bincount(np.searchsorted(BIN_EDGES.astype(np.float32),
                                                     a[:, n], side="right"),
                                     minlength=len(BIN_EDGES) + 1) for n in range(a.shape[1])])
        stats.append((layer, a64, hist))
    cols = ["layer", "neuron", "sign", "rank", "activation", "window_id", "prompt_id", "start",
            "position", "acts"]
    return pl.DataFrame([dict(zip(cols, r, strict=True)) for r in ex]), stats


def exemplars(lake):
    return (lake.table("exemplars").drop("model", "corpus")
            .sort("layer", "neuron", "sign", "rank", descending=[False, False, True, False])
            .collect())


def test_exemplars_and_statistics_equal_a_brute_force_over_a_hooked_forward(tmp_path, model):
    lake = new_lake(tmp_path / "lake", texts(0, 25))
    report = run_activations(lake, model=model, corpora="c", params=PARAMS)
    assert report.runs[0].shards > 1  # several shards were merged
    want, stats = brute_force(model, lake, PARAMS)
    want = want.sort("layer", "neuron", "sign", "rank", descending=[False, False, True, False])
    got = exemplars(lake)
    assert got.height == want.height
    for c in ("layer", "neuron", "sign", "rank", "window_id", "prompt_id", "start", "position"):
        assert got[c].to_list() == want[c].to_list(), c
    np.testing.assert_allclose(got["activation"].to_numpy(), want["activation"].to_numpy(),
                               rtol=1e-6, atol=1e-7)
    for a, b in zip(got["acts"].to_list(), want["acts"].to_list(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    table = lake.table("activation_stats").sort("layer", "neuron").collect()
    for layer, a, hist in stats:
        t = table.filter(pl.col("layer") == layer)
        assert (t["count"] == len(a)).all()
        np.testing.assert_allclose(t["mean"].to_numpy(), a.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(t["std"].to_numpy(), a.std(0), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(t["min"].to_numpy(), a.min(0), rtol=1e-6)
        np.testing.assert_allclose(t["max"].to_numpy(), a.max(0), rtol=1e-6)
        np.testing.assert_allclose(t["frac_positive"].to_numpy(), (a > 0).mean(0))
        assert np.array_equal(np.stack(t["hist"].to_list()), hist)
        q = np.stack(t["quantiles"].to_list())
        assert (np.diff(q, axis=1) >= -1e-6).all()  # quantiles ascend
        assert (q[:, 4] >= a.min(0) - 1e-6).all() and (q[:, 4] <= a.max(0) + 1e-6).all()
    # a repeated window ties exactly: its copies sit side by side, first by window id
    ties = got.filter(pl.col("prompt_id") == got["prompt_id"].mode()[0])
    assert ties.height > 0


def test_new_texts_merge_into_what_a_run_from_scratch_gives(tmp_path, model):
    first, more = texts(1, 12), texts(2, 12)
    lake = new_lake(tmp_path / "lake", first)
    run_activations(lake, model=model, corpora="c", params=PARAMS)
    before = len(activation_shards(lake, model.name, "c"))
    lake.import_prompts([{"text": t} for t in more], "c")
    again = run_activations(lake, model=model, corpora="c", params=PARAMS).runs[0]
    assert again.skipped == len(set(first)) and again.merged == len(
        activation_shards(lake, model.name, "c")) - before  # only the new shards
    scratch = new_lake(tmp_path / "scratch", first + more)
    run_activations(scratch, model=model, corpora="c", params=PARAMS)
    a, b = exemplars(lake), exemplars(scratch)
    assert a.drop("acts", "activation").equals(b.drop("acts", "activation"))
    np.testing.assert_allclose(a["activation"].to_numpy(), b["activation"].to_numpy(), rtol=1e-9)
    sa = lake.table("activation_stats").sort("layer", "neuron").collect()
    sb = scratch.table("activation_stats").sort("layer", "neuron").collect()
    assert sa.select("count", "hist", "min", "max").equals(sb.select("count", "hist", "min", "max"))
    np.testing.assert_allclose(sa["mean"].to_numpy(), sb["mean"].to_numpy(), rtol=1e-9, atol=1e-12)
    for table, key in (("activation_samples", ["layer", "neuron", "bin", "rank"]),
                       ("token_activations", ["layer", "neuron", "rank"])):
        ta = lake.table(table).drop("model", "corpus").sort(key).collect()
        tb = scratch.table(table).drop("model", "corpus").sort(key).collect()
        assert ta.height > 0
        assert ta.drop("acts", "activation", "mean", strict=False).equals(
            tb.drop("acts", "activation", "mean", strict=False)), table
    # and a third run finds nothing to do
    third = run_activations(lake, model=model, corpora="c", params=PARAMS).runs[0]
    assert (third.texts, third.merged) == (0, 0)


def test_dask_workers_give_what_this_process_gives(tmp_path, model, model_dir, client):
    local = new_lake(tmp_path / "local", texts(3, 10))
    run_activations(local, model=model, corpora="c", params=PARAMS)
    dist = new_lake(tmp_path / "dask", texts(3, 10))
    run_activations(dist, model=model_dir, corpora="c", params=PARAMS, cluster=client)
    a, b = exemplars(local), exemplars(dist)
    assert a.drop("acts", "activation").equals(b.drop("acts", "activation"))


@pytest.mark.timeout(300)
def test_a_killed_job_rerun_commits_every_text_once(tmp_path, model_dir, model):
    prompts = texts(4, 30)
    lake = new_lake(tmp_path / "lake", prompts)
    cmd = [sys.executable, "-m", "circuit_atlas.cli", "activations", "--lake", lake.url,
           "--corpus", "c", "--model", model_dir, "--dtype", "float64", "--k", "4",
           "--context", "6", "--stride", "4", "--shard-tokens", "20"]
    # killed as soon as it has committed a shard, while it writes the next ones
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not activation_shards(lake, model.name, "c"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tables = lake.derived_tables().get(model_key(model.name), {}).get("c", [])
    assert "activation_stats" not in tables  # killed before the merge
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    committed = [p for s in activation_shards(lake, model.name, "c")
                 for p in s.record["prompt_ids"]]
    assert sorted(committed) == sorted(set(committed))  # each text once
    assert len(committed) == lake.scan("prompts").collect().height
    lake.cleanup(min_age_s=0)  # the killed writers' files go; committed shards stay
    names = {s.shard for s in activation_shards(lake, model.name, "c")}
    dirs = {d.rsplit("shard=", 1)[1] for d in lake.fs.glob(lake.path("activations/*/*/shard=*"))}
    assert dirs == names
    whole = new_lake(tmp_path / "whole", prompts)
    run_activations(whole, model=model, corpora="c", params=ActivationsParams(
        k=4, context=6, stride=4, shard_tokens=20, dtype="float64"))
    assert exemplars(lake).drop("acts", "activation").equals(
        exemplars(whole).drop("acts", "activation"))


def test_a_corrupt_shard_or_state_stops_the_run_with_an_error_naming_it(tmp_path, model):
    from circuit_atlas.compute.activation_run import commit_texts
    from circuit_atlas.errors import LakeError

    def truncate(path: str) -> bytes:
        keep = open(path, "rb").read()  # noqa: SIM115
        with open(path, "r+b") as f:
            f.truncate(100)
        return keep

    # a shard committed, corrupted before any merge read it
    lake = new_lake(tmp_path / "lake", texts(5, 6))
    rows = lake.scan("prompts").select("prompt_id", "text").sort("prompt_id").collect().rows()
    shard = commit_texts(lake, model, "c", plan_texts(model.tokenizer, rows[:3], PARAMS), PARAMS)
    keep = truncate(lake.path(shard.file("activation_state")))
    with pytest.raises(LakeError, match="activation_state.parquet"):
        run_activations(lake, model=model, corpora="c", params=PARAMS)
    assert lake.optional_table("activation_stats", model.name, "c") is None
    with open(lake.path(shard.file("activation_state")), "wb") as f:
        f.write(keep)
    run_activations(lake, model=model, corpora="c", params=PARAMS)
    # the merged state a later run resumes from, corrupted
    manifest = lake.table_manifest(model.name, "c", "activation_stats")
    truncate(lake.path(manifest["inputs"]["state"][0]))
    lake.import_prompts([{"text": "w1 w5 w6 w7 w8 w9"}], "c")
    with pytest.raises(LakeError, match="layer-000.parquet"):
        run_activations(lake, model=model, corpora="c", params=PARAMS)
    assert lake.table_manifest(model.name, "c", "activation_stats")["version"] == manifest[
        "version"]  # nothing published


def test_quantile_samples_and_token_means_equal_a_brute_force(tmp_path, model):
    """Each sample is its (neuron, bin)'s smallest keys among the positions in that bin
    (bins from the deciles of a brute-force state), and its activations are the hooked
    forward's; token means and their rank correlation with the static input projection
    (computed through the model's own norm and MLP modules) match numpy and scipy."""
    from scipy.stats import spearmanr

    from circuit_atlas.compute.exemplars import from_positions
    from circuit_atlas.compute.samples import BINS, MIN_COUNT, SAMPLES, _keys, bounds

    lake = new_lake(tmp_path / "lake", texts(6, 30))
    run_activations(lake, model=model, corpora="c", params=PARAMS)
    rows = lake.scan("prompts").select("prompt_id", "text").sort("prompt_id").collect().rows()
    windows = [w for _, ws in plan_texts(model.tokenizer, rows, PARAMS) for w in ws]
    samples = lake.table("activation_samples").drop("model", "corpus").collect()
    tokens_table = lake.table("token_activations").collect()
    stats = lake.table("activation_stats").sort("layer", "neuron").collect()
    for layer in (0, 2):
        acts, where, toks, full = [], [], [], {}
        for w in windows:
            a = hooked_activations(model, w.tokens)[layer]
            full[w.window] = a
            acts.append(a[w.skip:])
            where += [(w.window, p) for p in range(w.skip, len(w.tokens))]
            toks += list(w.tokens[w.skip:])
        a = np.concatenate(acts).astype(np.float32)
        where, toks = np.array(where), np.array(toks)
        edges, zero = bounds(from_positions(a, where[:, 0], where[:, 1]))
        key = _keys(torch.as_tensor(where[:, 0]), torch.as_tensor(where[:, 1]), a.shape[1],
                    "cpu").numpy()
        mine = samples.filter(pl.col("layer") == layer)
        assert mine["bin"].n_unique() == BINS  # near zero and every decile
        for n in range(a.shape[1]):
            col = a[:, n]
            decile = np.array([np.searchsorted(edges[n], v, side="right") for v in col])
            group = np.where(np.abs(col) <= zero[n], -1, np.where(col > zero[n], decile, -2))
            got = mine.filter(pl.col("neuron") == n).sort("bin", "rank")
            want = []
            for b in range(-1, BINS - 1):
                inside = np.flatnonzero(group == b)
                for i in inside[np.argsort(key[inside, n], kind="stable")][:SAMPLES]:
                    want.append((b, int(where[i, 0]), int(where[i, 1]), float(col[i])))
            assert [(r[0], r[1], r[2]) for r in want] == list(zip(
                got["bin"], got["window_id"], got["position"], strict=True)), (layer, n)
            np.testing.assert_allclose(got["activation"], [r[3] for r in want], rtol=1e-6,
                                       atol=1e-7)
            for wid, acts_row in zip(got["window_id"], got["acts"], strict=True):
                np.testing.assert_allclose(acts_row, full[wid][:, n], rtol=1e-5, atol=1e-6)
        # token means, against numpy; the static projection through the model's modules
        ids, counts = np.unique(toks, return_counts=True)
        frequent = ids[counts >= MIN_COUNT]
        means = np.stack([a[toks == t].astype(np.float64).mean(0) for t in frequent])
        blk = model.model.model.layers[layer]
        with torch.no_grad():
            x = blk.post_attention_layernorm(model.model.model.embed_tokens(
                torch.as_tensor(frequent))[:, None, :])
            static = (blk.mlp.act_fn(blk.mlp.gate_proj(x)) * blk.mlp.up_proj(x))[:, 0].numpy()
        layer_stats = stats.filter(pl.col("layer") == layer)
        assert (layer_stats["corr_tokens"] == len(frequent)).all()
        rho = np.array([spearmanr(means[:, n], static[:, n]).statistic
                        for n in range(a.shape[1])])
        assert np.isfinite(rho).all() and len(frequent) > 5
        np.testing.assert_allclose(layer_stats["static_rank_corr"].to_numpy(), rho, atol=1e-9)
        top = tokens_table.filter((pl.col("layer") == layer) & (pl.col("neuron") == 0)
                                  ).sort("rank")
        order = np.argsort(-means[:, 0], kind="stable")[:top.height]
        assert top["token_id"].to_list() == frequent[order].tolist()
        np.testing.assert_allclose(top["mean"], means[order, 0], rtol=1e-5)
        np.testing.assert_allclose(top["static"], static[order, 0], rtol=1e-5, atol=1e-7)
