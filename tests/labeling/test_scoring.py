"""Label scoring on planted neurons: a tiny float64 model whose neuron L1/N7 fires
exactly at the token w5 (and L1/N9 at w6), with a real word-level tokenizer, through
the activations stage, the hard negatives (checked against a hooked Hugging Face
forward) and the three scorers over HTTP with the real openai client against a
deterministic scorer (tests/llm_server.py) that judges excerpts by the token a label
quotes: a true label scores 1 and a false one near chance. Metrics against
scipy and hand counts; faults, resume, logprobs and their refusal."""

import datetime as dt
import json

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from circuit_atlas.compute.activation_run import run_activations
from circuit_atlas.compute.negatives import run_negatives
from circuit_atlas.compute.params import ActivationsParams, NegativesParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling import metrics
from circuit_atlas.labeling.params import ScoreParams
from circuit_atlas.labeling.scorers import value_probs
from circuit_atlas.labeling.scoring import run_label_scores
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import append_labels
from circuit_atlas.lake.schemas import LABELS
from tests.factories import WORDS, tiny_model_dir
from tests.llm_server import LLMServer

PLANTED = {7: ("w5", 0), 9: ("w6", 1)}  # neuron of layer 1: (its token, its residual dim)
NEGATIVE = {11: ("w7", 2), 13: ("w8", 3)}  # neurons that go negative at their token


def plant(path: str) -> str:
    """Rewire the tiny model so that L1/N7 and L1/N9 read only a residual dimension that
    nothing but their token's embedding writes: each fires at its token and is exactly 0
    everywhere else; L1/N11 and L1/N13 likewise, but negative at their token (the up
    projection's sign turned)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        planted = [(n, w, d, 2.0) for n, (w, d) in PLANTED.items()] + [
            (n, w, d, -2.0) for n, (w, d) in NEGATIVE.items()]
        for neuron, word, dim, up in planted:
            emb[:, dim] = 0
            emb[tok.convert_tokens_to_ids(word), dim] = 3.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[dim] = 0
                layer.mlp.down_proj.weight[dim] = 0
            mlp = model.model.layers[1].mlp
            mlp.gate_proj.weight[neuron] = 0
            mlp.gate_proj.weight[neuron, dim] = 4.0
            mlp.up_proj.weight[neuron] = 0
            mlp.up_proj.weight[neuron, dim] = up
    model.save_pretrained(path)
    return path


def corpus(n: int = 160, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    plain = [w for w in WORDS if w not in ("w5", "w6")]
    out = []
    for _ in range(n):
        words = list(rng.choice(plain, size=int(rng.integers(8, 13))))
        for word, share in (("w5", 0.4), ("w6", 0.25)):
            if rng.random() < share:
                words.insert(int(rng.integers(1, len(words))), word)
        out.append(" ".join(words))
    return out


def planted_lake(root, n: int = 80, k: int = 16, sample_tokens: int = 1 << 14,
                 extra_words: tuple[str, ...] = ()):
    """(model folder, lake) of the planted tiny model with the activation statistics of
    ``n`` texts of :func:`corpus` in corpus "c" (``extra_words``: more tokens)."""
    model = plant(tiny_model_dir(root / "tiny", seed=3, extra_words=extra_words))
    lake = Lake.init(root / "lake")
    lake.import_prompts([{"text": t} for t in corpus(n)], "c")
    run_activations(lake, model=model, corpora="c", params=ActivationsParams(
        k=k, context=16, dtype="float64", sample_tokens=sample_tokens))
    return model, lake


def label_rows(rows: list[tuple[int, int, str, str]], labeler: str) -> pl.DataFrame:
    now = dt.datetime.now(dt.UTC).isoformat()
    return pl.DataFrame(
        [{"layer": a, "neuron": b, "pass": p, "label": text, "description": None, "type": None,
          "interpretability": None, "labeler": labeler, "prompt_hash": None, "status": "ok",
          "error": None, "created_at": now} for a, b, p, text in rows],
        schema=pl.from_arrow(LABELS.schema.empty_table()).schema)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, lake = planted_lake(tmp_path_factory.mktemp("planted"), 160, 64, 1 << 16)
    append_labels(lake, "tiny", "c", label_rows([
        (1, 7, "input", 'fires on the token "w5"'),  # true
        (1, 7, "prior", 'fires on the token "w6"'),  # false: w6 is N9's token
        (1, 9, "input", 'fires on the token "w6"'),  # true
    ], "test"))
    report = run_negatives(lake, model=model, corpora="c",
                           params=NegativesParams(dtype="float64"))
    return model, lake, report


@pytest.fixture
def lake(planted, tmp_path):
    import shutil

    shutil.copytree(planted[1].root, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def params(server, **kw):
    return ScoreParams(base_url=server.url, llm="fake-scorer", concurrency=4, timeout=5,
                       max_retries=1, **kw)


def scores(lake) -> pl.DataFrame:
    return lake.table("label_scores").filter(pl.col("status") == "ok").collect()


def headline(df: pl.DataFrame, neuron: int, pass_: str, scorer: str) -> float | None:
    return df.filter((pl.col("neuron") == neuron) & (pl.col("pass") == pass_)
                     & (pl.col("scorer") == scorer))["score"].item()


def test_negatives_silence_the_neuron_and_hard_ones_activate_partners(planted, lake):
    from tests.compute.test_activation_run import hooked_activations

    model_dir, _, report = planted
    assert report.neurons == 2 and report.kept > 0
    hard = lake.table("negatives").collect()
    assert set(hard["neuron"]) == {7, 9} and set(hard["source"]) == {"layer", "random"}
    counts = hard.group_by("neuron", pl.col("source") == "random").len()["len"]
    assert (counts <= 5).all() and len(counts) == 4
    windows = lake.table("exemplar_windows").select("window_id", "token_ids", "skip").collect()
    mx = dict(lake.table("activation_stats").filter(pl.col("layer") == 1).select(
        "neuron", "max").collect().iter_rows())
    from circuit_atlas.compute.models import load_model

    model = load_model(model_dir, dtype="float64")
    held = {p for p in lake.scan("prompts").select("prompt_id").collect()["prompt_id"]
            if int(p[:8], 16) % 5 == 0}
    for row in hard.join(windows, on="window_id").iter_rows(named=True):
        # the stored activations are those of a plain hooked forward, and stay below a
        # tenth of the neuron's largest at every counted token; the partner fires there
        h = hooked_activations(model, tuple(row["token_ids"]))
        np.testing.assert_allclose(row["acts"], h[1][:, row["neuron"]], rtol=1e-5, atol=1e-6)
        assert max(row["acts"][row["skip"]:]) < 0.1 * mx[row["neuron"]]
        word = PLANTED[row["neuron"]][0]
        assert WORDS.index(word) + 1 not in row["token_ids"][row["skip"]:]
        assert row["partner_neuron"] != row["neuron"]
        assert row["prompt_id"] in held


def test_true_labels_score_one_and_false_labels_near_chance(planted, lake):
    with LLMServer() as server:
        report = run_label_scores(lake, model=planted[0], corpora="c", params=params(server))
    assert report.failed == 0 and report.ok == 9 and report.negatives
    df = scores(lake)
    for neuron in (7, 9):
        assert headline(df, neuron, "input", "detection") == 1.0
        assert headline(df, neuron, "input", "fuzzing") == 1.0
        assert headline(df, neuron, "input", "simulation") > 0.9
    assert headline(df, 7, "prior", "detection") < 0.7
    assert headline(df, 7, "prior", "fuzzing") <= 0.6
    sim = headline(df, 7, "prior", "simulation")
    assert sim is None or sim < 0.3
    det = df.filter(pl.col("scorer") == "detection")
    assert (det["hard_negatives"] > 0).all() and (det["positives"] > 0).all()
    m = json.loads(det.filter(pl.col("neuron") == 7).sort("pass")["metrics"][0])
    assert m["logprobs"] is True and m["hard_negative_accuracy"] == 1.0
    # every excerpt the scorer read is from a held-out text
    texts = dict(lake.scan("prompts").select("prompt_id", "text").collect().iter_rows())
    held = {t.replace(" ", "") for p, t in texts.items() if int(p[:8], 16) % 5 == 0}
    for r in server.requests:
        if r["pass"] == "detection":
            for line in r["prompt"].split("Excerpts:\n")[1].split("\n"):
                excerpt = line.split(". ", 1)[1]
                assert any(excerpt in t for t in held), excerpt


def test_negative_labels_are_scored_on_the_most_negative_contexts(planted, lake):
    """A label of the negative pass: its positives are the neuron's most negative
    held-out contexts, its negatives stay above a tenth of its most negative activation;
    the true one scores 1, the false one (N13 goes negative at w8, not w7) near chance."""
    from tests.compute.test_activation_run import hooked_activations

    append_labels(lake, "tiny", "c", label_rows([
        (1, 11, "negative", 'fires on the token "w7"'),  # true
        (1, 13, "negative", 'fires on the token "w7"'),  # false
    ], "test"))
    run_negatives(lake, model=planted[0], corpora="c", params=NegativesParams(dtype="float64"))
    with LLMServer() as server:
        report = run_label_scores(lake, model=planted[0], corpora="c",
                                  params=params(server, passes=("negative",)))
    assert report.failed == 0 and report.ok == 6
    df = scores(lake)
    assert set(df["polarity"]) == {-1} and set(df["pass"]) == {"negative"}
    assert headline(df, 11, "negative", "detection") == 1.0
    assert headline(df, 11, "negative", "fuzzing") == 1.0
    assert headline(df, 11, "negative", "simulation") > 0.9
    assert headline(df, 13, "negative", "detection") < 0.7
    assert headline(df, 13, "negative", "fuzzing") <= 0.6
    stats_ = dict(lake.table("activation_stats").filter(pl.col("layer") == 1).select(
        "neuron", "min").collect().iter_rows())
    assert stats_[11] < 0 and stats_[13] < 0
    from circuit_atlas.compute.models import load_model

    model = load_model(planted[0], dtype="float64")
    windows = lake.table("exemplar_windows").select("window_id", "token_ids", "skip").collect()
    negatives = lake.table("negatives").filter(pl.col("neuron").is_in([11, 13])).collect()
    assert len(negatives) > 0
    for row in negatives.join(windows, on="window_id").iter_rows(named=True):
        h = hooked_activations(model, tuple(row["token_ids"]))
        np.testing.assert_allclose(row["acts"], h[1][:, row["neuron"]], rtol=1e-5, atol=1e-6)
        assert min(row["acts"][row["skip"]:]) > 0.1 * stats_[row["neuron"]]


def test_best_of_n_keeps_the_candidate_that_scores_best(planted, lake):
    """Four samples (seeds 0..3, temperature 1) of which three are distinct; each is
    scored by detection on held-out contexts and the true one is kept, the others
    recorded as candidates with their scores."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.labeling.client import LLMSettings
    from circuit_atlas.labeling.evidence import prompt_hash
    from circuit_atlas.labeling.run import BestOf, LabelReport
    from circuit_atlas.labeling.templates import SYSTEM

    msgs = [{"role": "system", "content": SYSTEM["input"]},
            {"role": "user", "content": "Neuron L1/N7 (layer 1 of 3)."}]
    best = BestOf(samples=4, select_by="detection")
    report = LabelReport("input")
    with LLMServer() as server:
        server.candidates["L1/N7"] = ['fires on the token "w6"', 'fires on the token "w5"',
                                      'fires on the token "w6"', 'fires on the token "w9"']
        settings = LLMSettings(model="fake-llm", base_url=server.url, concurrency=4,
                               timeout=5, max_retries=1)
        best.run(lake, "tiny", "c", "input", 1, [(7, msgs, prompt_hash(msgs))], settings,
                 report, optional_tokenizer(planted[0]), lambda done, total: None)
        sampled = [r["sampling"] for r in server.requests if r["pass"] == "input"]
    assert sorted(x["seed"] for x in sampled) == [0, 1, 2, 3]
    assert all(x["temperature"] == 1.0 for x in sampled)
    assert report.ok == 1 and best.scored == 3 and best.unjudged == 0
    from circuit_atlas.labeling.journal import fold_journals

    fold_journals(lake, "tiny", "c")
    rows = lake.table("labels").filter(pl.col("neuron") == 7).collect()
    kept = rows.filter((pl.col("status") == "ok") & (pl.col("labeler") == "fake-llm"))
    assert kept["label"].to_list() == ['fires on the token "w5"']
    assert sorted(rows.filter(pl.col("status") == "candidate")["label"]) == [
        'fires on the token "w6"', 'fires on the token "w9"']
    det = scores(lake).filter((pl.col("neuron") == 7) & (pl.col("labeler") == "fake-llm"))
    by_label = dict(det.select("label", "score").iter_rows())
    assert by_label['fires on the token "w5"'] == 1.0
    assert max(by_label.values()) == by_label['fires on the token "w5"'] and len(by_label) == 3


def test_best_of_n_on_the_negative_side_before_any_negatives_exist(planted, lake):
    """N11 has no label yet, so no negatives: detection may not judge it, the next
    scorer does, and the true negative label is kept."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.labeling.client import LLMSettings
    from circuit_atlas.labeling.evidence import prompt_hash
    from circuit_atlas.labeling.journal import fold_journals
    from circuit_atlas.labeling.run import BestOf, LabelReport
    from circuit_atlas.labeling.templates import SYSTEM

    msgs = [{"role": "system", "content": SYSTEM["negative"]},
            {"role": "user", "content": "Neuron L1/N11 (layer 1 of 3)."}]
    best = BestOf(samples=2, select_by="detection")
    with LLMServer() as server:
        server.candidates["L1/N11"] = ['fires on the token "w8"', 'fires on the token "w7"']
        settings = LLMSettings(model="fake-llm", base_url=server.url, concurrency=4,
                               timeout=5, max_retries=1)
        best.run(lake, "tiny", "c", "negative", 1, [(11, msgs, prompt_hash(msgs))], settings,
                 LabelReport("negative"), optional_tokenizer(planted[0]), lambda d, t: None)
    fold_journals(lake, "tiny", "c")
    kept = lake.table("labels").filter((pl.col("neuron") == 11) & (pl.col("status") == "ok")
                                       ).collect()
    assert kept["label"].to_list() == ['fires on the token "w7"'] and best.unjudged == 0
    assert set(scores(lake).filter(pl.col("neuron") == 11)["polarity"]) == {-1}


def test_best_of_n_refuses_what_it_cannot_do():
    from circuit_atlas.labeling.params import LabelParams

    with pytest.raises(CircuitAtlasError, match="at least 1"):
        LabelParams(samples=0)
    with pytest.raises(CircuitAtlasError, match="Batch API"):
        LabelParams(samples=3, batch=True)
    assert LabelParams().best_of() is None and LabelParams(samples=3).best_of().samples == 3


def test_the_commands_find_negatives_and_score(planted, lake):
    from click.testing import CliRunner

    from circuit_atlas.cli import cli

    runner = CliRunner()
    found = runner.invoke(cli, ["negatives", "--lake", str(lake.root), "--model", planted[0],
                                "--corpus", "c", "--dtype", "float64", "--layer", "1"])
    assert found.exit_code == 0, found.output
    assert "negatives c:" in found.output
    with LLMServer() as server:
        scored = runner.invoke(cli, ["score", "--lake", str(lake.root), "--model", planted[0],
                                     "--corpus", "c", "--base-url", server.url, "--llm", "s",
                                     "--scorer", "detection"])
    assert scored.exit_code == 0, scored.output
    assert "3 ok" in scored.output and set(scores(lake)["scorer"]) == {"detection"}


def test_a_rerun_asks_nothing_and_faults_are_retried_or_recorded(planted, lake):
    with LLMServer() as server:
        server.faults['detection:fires on the token "w5"'] = ["malformed"]  # then valid
        # two labels say "w6": each is asked twice, then recorded as failed
        server.faults['fuzzing:fires on the token "w6"'] = ["short"] * 4
        first = run_label_scores(lake, model=planted[0], corpora="c", params=params(server))
        assert first.ok == 7 and first.failed == 2
        failed = lake.table("label_scores").filter(pl.col("status") == "failed").collect()
        assert len(failed) == 2 and all("answers for" in e for e in failed["error"])
        n = len(server.requests)
        again = run_label_scores(lake, model=planted[0], corpora="c", params=params(server))
        # the failed ones are asked again, nothing else is
        assert again.skipped == 7 and again.ok == 2 and len(server.requests) == n + 2


def test_an_endpoint_without_logprobs_is_asked_without(planted, lake):
    with LLMServer() as server:
        server.refuse_logprobs = True
        report = run_label_scores(lake, model=planted[0], corpora="c",
                                  params=params(server, scorers=("simulation",)))
    assert report.ok == 3 and report.failed == 0
    m = [json.loads(x) for x in scores(lake)["metrics"]]
    assert all(x["logprobs"] is False for x in m)


def test_scoring_needs_labels_and_exemplars(tmp_path):
    lake = Lake.init(tmp_path / "lake")
    with pytest.raises(CircuitAtlasError, match="no exemplars"):
        run_label_scores(lake, model="tiny", corpora="c", params=ScoreParams(
            base_url="http://127.0.0.1:9/v1"))


def test_metrics_equal_scipy_and_hand_counts():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    said = np.array([1, 0, 1, 0, 1, 0, 0, 1], bool)
    # recall 3/4, specificity 3/4; tp 3, fp 1, fn 1
    assert metrics.balanced_accuracy(truth, said) == 0.75
    assert metrics.f1(truth, said) == 2 * 3 / (2 * 3 + 1 + 1)
    assert metrics.accuracy(truth, said) == 6 / 8
    score = np.array([0.9, 0.2, 0.8, 0.3, 0.8, 0.1, 0.3, 0.7])
    u = stats.mannwhitneyu(score[truth], score[~truth]).statistic
    assert metrics.auc(truth, score) == pytest.approx(u / 16)
    x, y = np.random.default_rng(0).normal(size=(2, 50))
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert metrics.pearson(np.zeros(5), np.arange(5)) is None
    assert metrics.balanced_accuracy(np.ones(3, bool), np.ones(3, bool)) is None
    assert metrics.auc(np.ones(3, bool), np.arange(3)) is None


def test_expected_values_from_logprobs_line_up_with_the_answers():
    tok = [{"token": '{"', "logprob": 0.0, "top_logprobs": []},
           {"token": "3", "logprob": np.log(0.5), "top_logprobs": [
               {"token": "3", "logprob": np.log(0.5)}, {"token": "5", "logprob": np.log(0.25)},
               {"token": "x", "logprob": np.log(0.25)}]},
           {"token": ",", "logprob": 0.0, "top_logprobs": []},
           {"token": " 0", "logprob": 0.0, "top_logprobs": []}]
    numbers = {str(v): float(v) for v in range(11)}
    got, used = value_probs(tok, numbers, 2)
    assert used and got == pytest.approx([(3 * 0.5 + 5 * 0.25) / 0.75, 0.0])
    assert value_probs(tok, numbers, 3) is None  # the tokens do not spell 3 answers
    # "10" split over two tokens keeps its sampled value; the others their expectation
    split = [*tok, {"token": ",1", "logprob": 0.0, "top_logprobs": []},
             {"token": "0]", "logprob": 0.0, "top_logprobs": []}]
    got, used = value_probs(split, numbers, 3)
    assert used and got[2] == 10.0
