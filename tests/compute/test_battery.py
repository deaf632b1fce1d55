"""The causal battery stage on a tiny model with a planted neuron that copies one token
into the logits of another: found necessary, sufficient and specific for it, a decoy
not; patching, the tables, the summary against numpy, steering against teacher-forced
interventions, and the commands."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from circuit_atlas import CircuitAtlasError
from circuit_atlas.cli import cli
from circuit_atlas.compute import ActivationsParams, run_activations
from circuit_atlas.compute.battery import Intervention, run_interventions, summarise
from circuit_atlas.compute.interventions import Edits, clean_pass, rerun
from circuit_atlas.compute.models import load_model
from circuit_atlas.compute.params import InterventionsParams, SteerParams
from circuit_atlas.compute.steer import run_steer
from circuit_atlas.lake import Lake
from tests.factories import WORDS, tiny_model_dir

TRIGGER, TARGET, DIM, PLANTED, DECOY = "w10", "w20", 0, 7, 9
SCALE = 0.1  # the planted write: a strong vote, not the whole residual (which a norm rescales)


def plant(model) -> None:
    """L1/N7 reads a residual dimension that only the trigger's embedding writes, and
    writes the target's unembedding direction: it copies "trigger here" into "target
    next". The decoy L1/N9 fires exactly alike and writes next to nothing."""
    ids = {w: i + 1 for i, w in enumerate(WORDS)}
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, DIM] = 0
        emb[ids[TRIGGER], DIM] = 3.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[DIM] = 0
            layer.mlp.down_proj.weight[DIM] = 0
        mlp = model.model.layers[1].mlp
        for neuron in (PLANTED, DECOY):  # both fire on the trigger, alike
            mlp.gate_proj.weight[neuron] = 0
            mlp.gate_proj.weight[neuron, DIM] = 4.0
            mlp.up_proj.weight[neuron] = 0
            mlp.up_proj.weight[neuron, DIM] = 2.0
        mlp.down_proj.weight[:, DECOY] *= 1e-4  # the decoy writes (almost) nothing
        direction = model.lm_head.weight[ids[TARGET]].clone()
        direction[DIM] = 0
        mlp.down_proj.weight[:, PLANTED] = direction / direction.norm() * SCALE


def records(n: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    plain = [w for w in WORDS if w not in (TRIGGER, TARGET)]
    out = []
    for _ in range(n):
        words = list(rng.choice(plain, size=int(rng.integers(4, 8))))
        out.append({"text": " ".join([*words, TRIGGER]),
                    "meta": {"target": TARGET, "distractor": "w30",
                             "counterfactual": " ".join([*words, "w11"])}})
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("battery")
    path = tiny_model_dir(root / "tiny", seed=2, plant=plant)
    lake = Lake.init(root / "lake")
    lake.import_prompts(records(), "c")
    lake.import_prompts([{"text": " ".join(WORDS[i:i + 9])} for i in range(0, 50, 3)], "c")
    run_activations(lake, model=path, corpora="c",
                    params=ActivationsParams(k=8, context=16, dtype="float64"))
    return path, lake


def causal(lake) -> dict[str, dict]:
    return {r["unit"]: r for r in lake.table("neuron_causal").collect().to_dicts()}


def test_planted_neuron_necessary_sufficient_specific_decoy_not(planted):
    path, lake = planted
    report = run_interventions(lake, model=path, corpora="c", params=InterventionsParams(
        neurons=(f"L1/N{PLANTED}", f"L1/N{DECOY}"), ablate="zero", boost=4,
        dtype="float64"))
    assert report.units == 2 and report.prompts == 27
    rows = lake.table("interventions").collect()
    assert len(rows) == 2 * (27 * 2 + 10)  # zero, boost on all; patch where a counterfactual is
    mine = rows.filter(pl.col("distractor_token").is_not_null())
    assert mine["logit_diff_delta"].null_count() == 0
    s = causal(lake)
    p, d = s[f"L1/N{PLANTED}"], s[f"L1/N{DECOY}"]
    # on the trigger prompts (whose target is given) the planted neuron is the answer
    trig = rows.filter((pl.col("unit") == f"L1/N{PLANTED}")
                       & pl.col("distractor_token").is_not_null())
    zero = trig.filter(pl.col("intervention") == "zero")
    assert (zero["prob_delta"] < -0.5 * zero["prob_clean"]).all()
    assert zero["top1_flip"].all()
    assert (trig.filter(pl.col("intervention") == "patch")["top1_flip"]).all()
    boost = trig.filter(pl.col("intervention") == "boost")
    assert (boost["logit_diff_delta"] > 0.2).all() and (boost["predicted_delta"] > 0).all()
    # elsewhere a trigger inside a prompt moves the last position through attention only,
    # not always toward the target: sufficiency over every prompt the boost moves is lower
    assert 0.5 < p["sufficiency"] < 1 and p["boost"] == "boost x4"
    assert p["flip_rate"] >= 10 / 27 and p["necessity"] > 0.3 and p["ablation"] == "zero"
    deltas = np.array(boost["moved_deltas"].to_list())
    assert deltas.shape == (10, 10) and (deltas[:, :5] > 0).all() and (deltas[:, 5:] < 0).all()
    assert boost["specificity"].min() > 0.5
    # the decoy: nothing it does changes the answer
    assert d["flip_rate"] == 0 and abs(d["necessity"]) < 0.05
    drows = rows.filter((pl.col("unit") == f"L1/N{DECOY}")
                        & pl.col("distractor_token").is_not_null())
    assert drows["logit_diff_delta"].abs().max() < 0.1 * boost["logit_diff_delta"].min()


def test_summary_against_numpy(planted):
    _, lake = planted
    if lake.optional_table("interventions", "tiny", "c") is None:
        pytest.skip("needs the battery run")
    rows = lake.table("interventions").collect()
    s = summarise(rows).to_dicts()
    for r in s:
        me = rows.filter(pl.col("unit") == r["unit"])
        abl = me.filter(pl.col("intervention") == "zero")
        rel = -abl["prob_delta"].to_numpy() / abl["prob_clean"].to_numpy()
        assert r["necessity"] == pytest.approx(rel.mean(), rel=1e-6)
        assert r["necessity_rate"] == pytest.approx(
            np.mean(abl["prob_delta"].to_numpy() <= -0.1 * abl["prob_clean"].to_numpy()))
        boo = me.filter((pl.col("intervention") == "boost") & (pl.col("kl") > 1e-6))
        assert r["sufficiency"] == pytest.approx(np.mean(boo["predicted_delta"].to_numpy() > 0))
        assert r["specificity"] == pytest.approx(boo["specificity"].to_numpy().mean(), rel=1e-6)
        pat = me.filter(pl.col("intervention") == "patch")
        assert r["patch_flip_rate"] == pytest.approx(pat["top1_flip"].to_numpy().mean())


def test_mean_ablation_reads_activation_statistics(planted, tmp_path):
    path, lake = planted
    run_interventions(lake, model=path, corpora="c", params=InterventionsParams(
        neurons=(f"L1/N{PLANTED}",), ablate="mean", boost=0, boost_quantile=100,
        patch=False, positions="last", limit=3, dtype="float64"))
    s = causal(lake)[f"L1/N{PLANTED}"]
    assert s["ablation"] == "mean" and s["boost"] == "set max" and s["patch_kl"] is None
    stats = lake.table("activation_stats").filter(
        (pl.col("layer") == 1) & (pl.col("neuron") == PLANTED)).collect().row(0, named=True)
    # mean ablation at the last position equals setting that value by hand
    model = load_model(path, dtype="float64")
    row = lake.table("interventions").filter(pl.col("intervention") == "mean").collect().row(
        0, named=True)
    text = lake.table("prompts").filter(pl.col("prompt_id") == row["prompt_id"]).collect()[
        "text"][0]
    tokens = model.tokenizer(text, return_tensors="pt").input_ids
    clean = clean_pass(model.adapter, tokens)
    T = clean.length
    edits = Edits(row=np.array([0]), layer=np.array([1]), neuron=np.array([PLANTED]),
                  mult=torch.zeros(1, dtype=torch.float64),
                  add=torch.full((1, T), stats["mean"], dtype=torch.float64),
                  where=(torch.arange(T) == T - 1)[None], rows=1)
    logits, _ = rerun(model.adapter, clean, edits)
    assert row["logit_delta"] == pytest.approx(
        float(logits[0, row["target_token"]] - clean.logits[row["target_token"]]), rel=1e-5)
    # no statistics: a clear error, nothing written
    bare = Lake.init(tmp_path / "bare")
    bare.import_prompts(records(2), "c")
    with pytest.raises(CircuitAtlasError, match="activation statistics"):
        run_interventions(bare, model=path, corpora="c", params=InterventionsParams(
            neurons=("L1/N7",), dtype="float64"))
    assert bare.optional_table("interventions", "tiny", "c") is None
    with pytest.raises(CircuitAtlasError, match="no units"):
        run_interventions(bare, model=path, corpora="c", params=InterventionsParams(
            ablate="zero", dtype="float64"))


def test_steering_equals_teacher_forced_interventions(planted):
    path, lake = planted
    model = load_model(path, dtype="float64")
    text = "w1 w2 w3"
    params = SteerParams(neurons=(f"L1/N{PLANTED}",), value=400.0, max_new_tokens=6,
                         dtype="float64")
    out = run_steer(lake.root, model=model, text=text, params=params)
    again = run_steer(lake.root, model=model, text=text, params=params)
    assert out.steered_tokens == again.steered_tokens  # greedy: deterministic
    target_id = WORDS.index(TARGET) + 1
    assert out.steered_tokens[0] == target_id != out.clean_tokens[0]
    prompt = model.tokenizer(text, return_tensors="pt").input_ids[0].tolist()
    for t, want in enumerate(out.steered_tokens):
        tokens = torch.tensor([prompt + out.steered_tokens[:t]])
        clean = clean_pass(model.adapter, tokens)
        T = clean.length
        edits = Edits(row=np.array([0]), layer=np.array([1]), neuron=np.array([PLANTED]),
                      mult=torch.zeros(1, dtype=torch.float64),
                      add=torch.full((1, T), 400.0, dtype=torch.float64),
                      where=torch.ones(1, T, dtype=torch.bool), rows=1)
        logits, _ = rerun(model.adapter, clean, edits)
        assert int(logits[0].argmax()) == want
        if t == 0:
            assert int(clean.logits.argmax()) == out.clean_tokens[0]
    with pytest.raises(CircuitAtlasError, match="choose one"):
        SteerParams(value=1.0, ablate="zero")
    with pytest.raises(CircuitAtlasError, match="patching"):
        from circuit_atlas.compute.steer import steer
        from circuit_atlas.lake.units import neuron_unit
        steer(model, text, neuron_unit(1, 7), Intervention("patch"))


def test_commands(planted):
    path, lake = planted
    runner = CliRunner()
    result = runner.invoke(cli, ["intervene", "--lake", str(lake.root), "--model", path,
                                 "--corpus", "c", "--neuron", f"L1/N{PLANTED}",
                                 "--ablate", "zero", "--limit", "4", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    assert "necessity" in result.output and f"L1/N{PLANTED}" in result.output
    result = runner.invoke(cli, ["steer", "w1 w2 w3", "--lake", str(lake.root), "--model", path,
                                 "--neuron", f"L1/N{PLANTED}", "--value", "400", "--json",
                                 "--max-new-tokens", "3", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    assert got["steered"].split()[0] == TARGET and got["intervention"] == "set 400"
    bad = runner.invoke(cli, ["intervene", "--lake", str(lake.root), "--model", path,
                              "--corpus", "c", "--neuron", "L9/N1", "--dtype", "float64"])
    assert bad.exit_code != 0 and "out of range" in bad.output


def test_intervention_check_of_output_labels(planted, tmp_path):
    """The boost of the planted neuron raises the target: its output label naming the
    target picks its own token set, the same label on the decoy picks the planted
    neuron's set, which is a decoy there."""
    import datetime as dt
    import shutil

    from circuit_atlas.labeling.client import LLMSettings
    from circuit_atlas.labeling.scoring import score_lake
    from circuit_atlas.lake.causal import boost_tokens
    from circuit_atlas.lake.labels import append_labels
    from circuit_atlas.lake.schemas import LABELS
    from tests.llm_server import LLMServer

    path, base = planted
    shutil.copytree(base.root, tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    others = (3, 20, 30)
    run_interventions(lake, model=path, corpora="c", params=InterventionsParams(
        neurons=tuple(f"L1/N{n}" for n in (PLANTED, DECOY, *others)), ablate="none",
        boost=4, patch=False, positions="last", dtype="float64"))
    raised = {r["neuron"]: r["tokens"] for r in boost_tokens(lake, "tiny", "c").to_dicts()}
    target_id = WORDS.index(TARGET) + 1
    assert target_id in raised[PLANTED] and target_id not in raised[DECOY]
    now = dt.datetime.now(dt.UTC).isoformat()
    labels = pl.DataFrame(
        [{"layer": 1, "neuron": n, "pass": "output", "label": f'raises "{TARGET}"',
          "description": None, "type": None, "interpretability": None, "labeler": "test",
          "prompt_hash": None, "status": "ok", "error": None, "created_at": now}
         for n in (PLANTED, DECOY)], schema=pl.from_arrow(LABELS.schema.empty_table()).schema)
    append_labels(lake, "tiny", "c", labels)
    model = load_model(path, dtype="float64")
    with LLMServer() as server:
        settings = LLMSettings(model="fake-scorer", base_url=server.url, concurrency=2,
                               timeout=5, max_retries=1)
        report = score_lake(lake, "tiny", "c", settings, tokenizer=model.tokenizer)
    assert report.ok == 2 and report.failed == 0
    rows = {r["neuron"]: r for r in lake.table("label_scores").collect().to_dicts()}
    assert rows[PLANTED]["scorer"] == "intervention" and rows[PLANTED]["score"] == 1.0
    assert rows[DECOY]["score"] == 0.0
    assert json.loads(rows[PLANTED]["metrics"])["chance"] == 0.25
