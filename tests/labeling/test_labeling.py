"""Labeling over HTTP with the real openai client against tests/llm_server.py: layer
order, evidence between layers, faults, resume after a kill, the Batch API, the
dry run and the terminal browser."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.labeling import LLMSettings, label_lake
from circuit_atlas.lake import Lake
from tests.factories import MODEL, N_LAYERS, prompts_of, write_edge_table, write_shard
from tests.llm_server import LLMServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, client):
    """A small reduced lake (4 layers, a few neurons each) to copy per test."""
    lake = Lake.init(tmp_path_factory.mktemp("lab") / "lake")
    for s in range(3):
        write_shard(lake, "c", prompts_of(6, f"s{s}"), seed=s, neurons=5)
    reduce_lake(lake, MODEL, ["c"], client)
    # real attribution edges run forward only; the factory's random ones do not
    forward = lake.table("edges").filter(pl.col("src_layer") < pl.col("tgt_layer")).drop(
        "model", "corpus").collect()
    write_edge_table(lake, forward, MODEL, "c")
    return lake


@pytest.fixture
def lake(reduced, tmp_path):
    import shutil

    shutil.copytree(reduced.root, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def settings(server, **kw):
    return LLMSettings(model="fake-llm", base_url=server.url, concurrency=4, timeout=2,
                       max_retries=2, **kw)


def neurons_of(lake):
    return set(lake.table("neurons").filter(pl.col("layer").is_between(0, N_LAYERS - 1))
               .select("layer", "neuron").collect().iter_rows())


def ok_labels(lake, pass_=None):
    df = lake.table("labels").filter(pl.col("status") == "ok").collect()
    if pass_:
        df = df.filter(pl.col("pass") == pass_)
    return df


def layer_of(nid: str) -> int:
    return int(re.match(r"L(\d+)/", nid).group(1))


def test_both_passes_in_layer_order_with_neighbour_labels(lake):
    with LLMServer() as server:
        for pass_ in ("output", "input"):
            report = label_lake(lake, MODEL, "c", pass_, settings(server))
            assert report.failed == 0 and report.ok == len(neurons_of(lake))
        out_layers = [layer_of(n) for n in server.answered("output")]
        in_layers = [layer_of(n) for n in server.answered("input")]
        assert out_layers == sorted(out_layers, reverse=True)  # late to early
        assert in_layers == sorted(in_layers)  # early to late
        # an output prompt shows its downstream neurons' output labels, an input prompt
        # its upstream neurons' output labels (all of the output pass exists by then)
        edges = lake.table("edges").filter(
            pl.col("src_layer").is_between(0, N_LAYERS - 1)
            & pl.col("tgt_layer").is_between(0, N_LAYERS - 1)).collect()
        # (the factory's random edges also run within and back across layers; real ones
        # go forward: the pass order guarantees the labels of the later layers for the
        # output pass, and of every layer for the input pass, which follows it)
        shown = 0
        for r in server.requests:
            me = layer_of(re.search(r"Neuron (L\d+/N\d+)", r["prompt"]).group(1))
            for other in re.findall(r"- (L\d+/N\d+) \(", r["prompt"]):
                label = f'"output label of {other}"'
                if r["pass"] == "input" or layer_of(other) > me:
                    assert label in r["prompt"], (r["prompt"], other)
                    shown += r["pass"] == "output"
            assert "None" not in r["prompt"]
        assert shown > 0 and len(edges) > 0
    for pass_ in ("output", "input"):
        got = set(ok_labels(lake, pass_).select("layer", "neuron").iter_rows())
        assert got == neurons_of(lake)
    assert (ok_labels(lake)["labeler"] == "fake-llm").all()


def test_faults_are_retried_or_recorded_then_only_failed(lake):
    ids = sorted(neurons_of(lake))
    a, b, c, d, e = (f"L{x}/N{y}" for x, y in ids[:5])
    with LLMServer(hang_s=4) as server:
        server.faults = {a: ["429", "500"], b: ["hang"], c: ["malformed"],
                         d: ["invalid", "invalid"], e: ["500"] * 3}
        report = label_lake(lake, MODEL, "c", "output", settings(server))
        assert report.failed == 2 and report.ok == len(ids) - 2
        rows = lake.table("labels").collect()
        failed = {f"L{r['layer']}/N{r['neuron']}": r["error"]
                  for r in rows.filter(pl.col("status") == "failed").iter_rows(named=True)}
        assert set(failed) == {d, e}
        assert "invalid reply" in failed[d] and "type" in failed[d]
        assert "InternalServerError" in failed[e]
        assert rows.filter(pl.col("status") == "failed")["label"].is_null().all()
        assert report.prompt_tokens > 0
        n_before = len(server.requests)
        again = label_lake(lake, MODEL, "c", "output", settings(server), only_failed=True)
        assert again.ok == 2 and again.skipped == len(ids) - 2
        assert {r["neuron"] for r in server.requests[n_before:]} == {d, e}
        # a plain rerun asks nothing: everything has an ok label
        n_before = len(server.requests)
        assert label_lake(lake, MODEL, "c", "output", settings(server)).asked == 0
        assert len(server.requests) == n_before


def test_killed_run_resumes_to_the_same_table(lake, reduced, tmp_path):
    import shutil

    shutil.copytree(reduced.root, tmp_path / "whole")
    whole = Lake(tmp_path / "whole")
    with LLMServer() as server:
        label_lake(whole, MODEL, "c", "output", settings(server))
        total = len(neurons_of(lake))
        server.requests.clear()
        server.delay_s = 0.15
        script = textwrap.dedent(f"""
            from circuit_atlas.labeling import LLMSettings, label_lake
            from circuit_atlas.lake import Lake
            label_lake(Lake({str(lake.root)!r}), {MODEL!r}, "c", "output",
                       LLMSettings(model="fake-llm", base_url={server.url!r}, concurrency=2,
                                   timeout=5, max_retries=2))
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        deadline = time.time() + 120
        while len(server.answered()) < total // 2 and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = list(server.answered())
        assert 0 < len(first) < total
        server.delay_s = 0
        report = label_lake(lake, MODEL, "c", "output", settings(server))
        second = server.answered()[len(first):]
        recorded = {f"L{r['layer']}/N{r['neuron']}" for r in ok_labels(lake).iter_rows(
            named=True)} - set(second)
        assert recorded and not recorded & set(second)  # no recorded neuron asked again
        assert report.skipped == len(recorded)
    cols = ["layer", "neuron", "pass", "label", "description", "type", "interpretability",
            "prompt_hash", "status"]
    resumed = ok_labels(lake).select(cols).sort("layer", "neuron")
    straight = ok_labels(whole).select(cols).sort("layer", "neuron")
    assert resumed.equals(straight)


def test_batch_api(lake):
    ids = sorted(neurons_of(lake))
    with LLMServer() as server:
        victim = f"L{ids[0][0]}/N{ids[0][1]}"
        server.faults = {victim: ["invalid"]}  # in the batch: asked again directly
        report = label_lake(lake, MODEL, "c", "output", settings(server, batch=True,
                                                                   poll_s=0.01))
        assert report.ok == len(ids) and report.failed == 0
        assert len(server.batches) == N_LAYERS
        assert all(b["status"] == "completed" for b in server.batches.values())
        assert report.cost(settings(server, batch=True, price_in=1, price_out=1)) == \
            pytest.approx((report.prompt_tokens + report.completion_tokens) / 2e6)


def test_dry_run_cli_and_browser(lake):
    runner = CliRunner()
    base = ["--lake", lake.url, "--model", MODEL]
    out = runner.invoke(cli, ["label", *base, "--dry-run"])
    assert out.exit_code == 0, out.output
    prompts = lake.table("label_prompts").collect()
    assert len(prompts) == 2 * len(neurons_of(lake))
    assert not prompts["user_message"].str.contains("None").any()
    assert not prompts["user_message"].str.contains("Output projection").any()  # not computed here
    with LLMServer() as server:
        env = {"OPENAI_API_KEY": ""}
        out = runner.invoke(cli, ["label", *base, "--base-url", server.url, "--llm", "fake",
                                  "--price-in", "2", "--price-out", "8"], env=env)
        assert out.exit_code == 0, out.output
        assert "completion tokens" in out.output and "$" in out.output
    layer, neuron = sorted(neurons_of(lake))[3]
    keys = f"n\nb\ng\nL{layer}/N{neuron}\nl\n{N_LAYERS - 1}\nr\nzz\nq\n"
    out = runner.invoke(cli, ["browse", *base], input=keys)
    assert out.exit_code == 0, out.output
    pages = re.findall(r"\[\d+/\d+\] (L\d+/N\d+)", out.output)
    first, second = sorted(neurons_of(lake))[:2]
    assert pages[:4] == [f"L{first[0]}/N{first[1]}", f"L{second[0]}/N{second[1]}",
                         f"L{first[0]}/N{first[1]}", f"L{layer}/N{neuron}"]
    assert layer_of(pages[4]) == N_LAYERS - 1
    assert f"OUTPUT: output label of L{layer}/N{neuron}" in out.output
    assert "evidence (output pass)" in out.output and "n/Enter next" in out.output


def test_cluster_labels_from_member_labels(lake, tmp_path):
    from circuit_atlas.clustering.export import atlas_tables
    from circuit_atlas.clustering.methods import method_params
    from circuit_atlas.clustering.network import network_params
    from circuit_atlas.clustering.run import cluster_lake
    from circuit_atlas.labeling import label_clusters

    cluster_lake(lake, MODEL, "c", "leiden", network_params(min_count=1),
                 method_params("leiden", resolution=0.5))
    with LLMServer() as server:
        with pytest.raises(CircuitAtlasError, match="no output labels"):
            label_clusters(lake, MODEL, "c", settings(server), "leiden")
        label_lake(lake, MODEL, "c", "output", settings(server))
        report = label_clusters(lake, MODEL, "c", settings(server), "leiden")
        named = lake.table("cluster_labels").collect()
        labelled = set(ok_labels(lake, "output").select("layer", "neuron").iter_rows())
        members = lake.table("cluster_assignments").collect().filter(
            pl.struct("layer", "neuron").map_elements(lambda r: (r["layer"], r["neuron"])
                                                      in labelled, return_dtype=pl.Boolean))
        tops = members.group_by("top_cluster").len().filter(pl.col("len") >= 3)
        assert report.ok == len(named) >= len(tops) > 0
        top_named = named.filter(~pl.col("cluster_path").str.contains(":"))
        assert sorted(int(p) for p in top_named["cluster_path"]) == sorted(tops["top_cluster"])
        assert (named["coherence"] == 0.75).all()
        assert label_clusters(lake, MODEL, "c", settings(server), "leiden").asked == 0
    clusters = atlas_tables(lake, MODEL, "c", "leiden")["clusters"]
    assert clusters["label"].drop_nulls().len() == len(named)


def test_cluster_names_are_journaled_so_a_killed_run_asks_none_again(lake, monkeypatch):
    """Names answered before a kill (here: the run dies right after the last answer,
    before anything is folded into the table) are in the journal: the next run folds
    them and asks the LLM nothing."""
    from circuit_atlas.clustering.methods import method_params
    from circuit_atlas.clustering.network import network_params
    from circuit_atlas.clustering.run import cluster_lake
    from circuit_atlas.labeling import label_clusters
    from circuit_atlas.labeling import run as labeling_run

    cluster_lake(lake, MODEL, "c", "leiden", network_params(min_count=1),
                 method_params("leiden", resolution=0.5))
    real = labeling_run.fold_journals
    calls = []

    def killed_before_the_fold(lake_, model, corpus, table="labels"):
        if table == "cluster_labels":
            calls.append(1)
            if len(calls) == 2:  # the fold after the answers
                raise KeyboardInterrupt
        return real(lake_, model, corpus, table)

    with LLMServer() as server:
        label_lake(lake, MODEL, "c", "output", settings(server))
        monkeypatch.setattr(labeling_run, "fold_journals", killed_before_the_fold)
        with pytest.raises(KeyboardInterrupt):
            label_clusters(lake, MODEL, "c", settings(server), "leiden")
        asked = len(server.requests)
        assert lake.table_manifest(MODEL, "c", "cluster_labels") is None  # nothing folded
        monkeypatch.setattr(labeling_run, "fold_journals", real)
        report = label_clusters(lake, MODEL, "c", settings(server), "leiden")
        assert report.asked == 0 and report.skipped > 0 and len(server.requests) == asked
    assert lake.table("cluster_labels").collect().height == report.skipped


def test_the_labeler_sees_no_held_out_text_and_reads_our_evidence_as_it_is(demo_run):
    """On the demo lake: the exemplars of the labeling prompts come from the texts
    outside the held-out split (kept for scoring), the held-out reader returns only
    those; the prompts say when the graph evidence is thin and no longer tell the
    labeler that embedding edges carry no sign."""
    from circuit_atlas.analysis.exemplars import exemplar_dicts, held_out, read_exemplars
    from circuit_atlas.compute.models import load_tokenizer
    from circuit_atlas.names import DEFAULT_MODEL

    lake, corpus = Lake(demo_run[0]), "general+medical"
    for split, want in (("shown", False), ("held_out", True)):
        rows = read_exemplars(lake, DEFAULT_MODEL, corpus, 29, None, 5, split=split)
        flags = rows.select(held_out(pl.col("prompt_id"))).to_series()
        assert flags.len() > 0 and (flags == want).all(), split
    prompts = lake.table("label_prompts").filter(pl.col("layer") == 29).collect()
    inputs = dict(zip(prompts.filter(pl.col("pass") == "input")["neuron"],
                      prompts.filter(pl.col("pass") == "input")["user_message"], strict=True))
    held = read_exemplars(lake, DEFAULT_MODEL, corpus, 29, list(inputs), 5, split="held_out")
    shown = read_exemplars(lake, DEFAULT_MODEL, corpus, 29, list(inputs), 40, split="shown")
    tok = load_tokenizer(DEFAULT_MODEL)
    seen = {e["text"] for e in exemplar_dicts(shown, tok)}
    checked = 0
    for n, part in held.partition_by("neuron", as_dict=True).items():
        for e in exemplar_dicts(part, tok):
            if e["sign"] > 0 and e["text"] not in seen:
                assert repr(e["text"]) not in inputs[n[0]]
                checked += 1
    assert checked > 10
    messages = prompts["user_message"]
    assert not messages.str.contains("importance, not sign").any()
    thin = lake.table("neurons", DEFAULT_MODEL, corpus).filter(
        (pl.col("layer") == 29) & (pl.col("graph_count") < 5)).collect()["neuron"]
    assert len(thin) > 0
    assert all("Caution: it appears in only" in inputs[n] for n in thin if n in inputs)


def test_label_hygiene_records_non_labels_and_never_shows_them(lake):
    """Replies whose label is reasoning text, a non-answer or an essay are asked once
    more, then recorded as failed with the reason; no such text is ever a label."""
    from circuit_atlas.lake.labels import current_labels
    from tests.llm_server import HYGIENE

    ids = sorted(neurons_of(lake))
    victims = {f"L{x}/N{y}": kind for (x, y), kind in zip(ids, HYGIENE, strict=False)}
    with LLMServer() as server:
        server.faults = {nid: [kind, kind] for nid, kind in victims.items()}
        report = label_lake(lake, MODEL, "c", "input", settings(server))
    assert report.failed == len(victims)
    rows = lake.table("labels").collect()
    failed = {f"L{r['layer']}/N{r['neuron']}": r["error"]
              for r in rows.filter(pl.col("status") == "failed").iter_rows(named=True)}
    assert set(failed) == set(victims)
    for nid, kind in victims.items():
        assert {"reasoning": "reasoning text", "nonanswer": "non-answer",
                "essay": "words"}[kind] in failed[nid]
    shown = current_labels(lake, MODEL, "c")
    assert not shown["label"].is_in(list(HYGIENE.values())).any()


@pytest.mark.parametrize(("label", "ok"), [
    ("medical drug names", True), ("closing parenthesis", True), ("  commas.  ", True),
    ("", False), ("Let me think: commas", False), ("The neuron fires on commas", False),
    ("What could this be?", False), ("no clear pattern", False), ("Unclear", False),
    ("fires on " + "very " * 20 + "long things", False), ("line one\nline two", False),
    ('fires on the token "w5"', True), ('"drug names"', "drug names")])
def test_clean_label(label, ok):
    from circuit_atlas.labeling.replies import clean_label

    if isinstance(ok, str):  # what the label becomes
        assert clean_label(label) == ok
    elif ok:
        assert clean_label(label) == " ".join(label.split()).strip(" .")
    else:
        with pytest.raises(ValueError):
            clean_label(label)


def test_priority_order_is_strength_times_unlabelled_neighbours(lake):
    """``--order priority`` picks and asks first the neurons of highest strength times
    (1 + neighbours without a label of the pass), computed here by hand from the edges."""
    from collections import defaultdict

    from circuit_atlas.labeling.evidence import Atlas, priority

    edges = lake.table("edges").collect()
    strength, nbrs = defaultdict(float), defaultdict(set)
    for r in edges.iter_rows(named=True):
        a, b = (r["src_layer"], r["src_neuron"]), (r["tgt_layer"], r["tgt_neuron"])
        if not (0 <= a[0] < N_LAYERS and 0 <= b[0] < N_LAYERS):
            continue
        for x, y in ((a, b), (b, a)):
            strength[x] += r["weight_abs_sum"]
            nbrs[x].add(y)

    def want(layer, labelled):
        got = {n: strength[(layer, n)] * (1 + len(nbrs[(layer, n)] - labelled))
               for (lay, n) in neurons_of(lake) if lay == layer}
        return sorted(got, key=lambda n: (-got[n], n))

    atlas = Atlas.open(lake, MODEL, "c")
    assert priority(atlas, 1, None, "output")["neuron"].to_list() == want(1, set())
    with LLMServer() as server:
        one_at_a_time = settings(server)
        one_at_a_time.concurrency = 1  # asked in the order chosen
        label_lake(lake, MODEL, "c", "output", one_at_a_time, per_layer=2, order="priority")
        asked = [tuple(map(int, re.match(r"L(\d+)/N(\d+)", n).groups()))
                 for n in server.answered("output")]
    labelled = set(asked)
    for layer in range(N_LAYERS):  # late to early: each layer sees the later ones' labels
        done = {x for x in labelled if x[0] > layer}
        assert [n for lay, n in asked if lay == layer] == want(layer, done)[:2]


def test_an_input_only_run_on_a_clustered_atlas_names_no_cluster(demo_run, tmp_path):
    """Clusters are named from output labels: a run of the input pass alone says so and
    succeeds instead of failing at the end."""
    import shutil

    from circuit_atlas.labeling import LabelParams, run_labels
    from circuit_atlas.names import DEFAULT_MODEL
    from circuit_atlas.stage import Progress

    shutil.copytree(demo_run[0], tmp_path / "lake")
    said = []

    class Said(Progress):
        def message(self, text):
            said.append(text)

    with LLMServer() as server:
        report = run_labels(tmp_path / "lake", model=DEFAULT_MODEL, params=LabelParams(
            passes=("input",), layers=(28,), per_layer=1, base_url=server.url,
            llm="fake-llm", max_retries=1, timeout=5), progress=Said())
    assert report.passes[0].ok == 1 and report.clusters is None
    assert any("clusters not named" in m for m in said)


def test_the_negative_pass_prompt_leads_with_the_most_negative_evidence():
    from circuit_atlas.labeling.templates import SYSTEM, input_prompt, messages

    ev = {"neuron": "L3/N7", "layer": 3, "n_layers": 4, "appearances": 9,
          "exemplars": [(5.0 - i, f"up{i}") for i in range(5)],
          "negative_exemplars": [(-4.0 + i, f"down{i}") for i in range(5)],
          "token_means": [("hi", 2.0)], "static_corr": (0.5, 40),
          "activating": [("a", 1.0)], "suppressing": [("s", -1.0)]}
    up, down = input_prompt(ev), input_prompt(ev, -1)
    assert up.index("up4") < up.index("down0") and "down2" not in up
    assert down.index("down4") < down.index("up0") and "up2" not in down
    assert down.index("tokens that suppress it") < down.index("tokens that activate it")
    assert up.index("tokens that activate it") < up.index("tokens that suppress it")
    assert messages("negative", ev)[0]["content"] == SYSTEM["negative"]
    assert messages("negative", ev)[1]["content"] == down
    assert "NEGATIVE" in SYSTEM["negative"] and "TRIGGERS" in SYSTEM["input"]
