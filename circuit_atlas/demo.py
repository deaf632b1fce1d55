"""``circuit-atlas demo``: the whole pipeline on the built-in demo corpora.

The demo corpora are short completion prompts written for this project: a medical
corpus and a general baseline (the comparison the original atlas made between a medical
corpus and general web text). Each stage of the pipeline adds its step here.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import polars as pl
from rich.console import Console

from circuit_atlas.lake.neurons import neuron_label

DEMO_CORPORA = ("medical", "general")
# prompts per corpus by default: every stage in under 5 minutes on a 2-core AVX2-only
# CPU (bench/RESULTS.md, "The demo"); --full runs all 40
DEMO_PROMPTS = 24
# neurons the demo labels and scores through the embedded LLM (of the last layer): what
# fits the 5 minutes; circuit-atlas label / score do every neuron
LABEL_SLICE = 1  # neurons the demo labels, each by the input and negative passes


def demo_corpus_file(name: str) -> Path:
    """The packaged JSONL file of a demo corpus."""
    return Path(str(resources.files("circuit_atlas") / "data" / "demo" / f"{name}.jsonl"))


class StageClock:
    """Times the demo's stages; ``table()`` is the summary printed at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append((name, time.perf_counter() - t0))

    def table(self):
        from rich.table import Table

        total = time.perf_counter() - self.start
        table = Table("stage", "seconds", "share", title="time per stage",
                      title_justify="left")
        for name, seconds in self.rows:
            table.add_row(name, f"{seconds:.1f}", f"{seconds / total:.0%}")
        table.add_row("[bold]total[/]", f"[bold]{total:.1f}[/]", "")
        return table


def run_demo(lake_path: str, console: Console | None = None, model: str = "smollm2",
             limit: int | None = DEMO_PROMPTS, full: bool = False,
             label_slice: int = LABEL_SLICE) -> StageClock:
    """Every stage on the first ``limit`` prompts of each demo corpus, with the
    projections of the neurons their graphs reach; ``full``: every prompt and every
    neuron; ``label_slice`` neurons labelled and scored by the embedded LLM. Returns
    the stage timings (also printed)."""
    if full:
        limit = None
    from circuit_atlas.doctor import diagnose, summary
    from circuit_atlas.lake import Lake, read_prompt_file

    console = console or Console()
    clock = StageClock()
    lake = Lake.init(lake_path)
    console.rule(f"[bold]circuit-atlas demo[/] - lake at {lake.url}")
    with clock.stage("doctor"):
        console.print(summary(diagnose()), soft_wrap=True, markup=False)
    with clock.stage("prompts"):
        for corpus in DEMO_CORPORA:
            path = demo_corpus_file(corpus)
            report = lake.import_prompts(read_prompt_file(path), corpus,
                                         source=f"demo:{path.name}")
            console.print(f"[green]prompts[/] corpus {corpus!r}: {report.added} new, "
                          f"{report.already_present} already imported")
    from circuit_atlas.analysis.cooccurrence import run_cooccurrence
    from circuit_atlas.analysis.params import SpecificityParams
    from circuit_atlas.analysis.roles import run_roles
    from circuit_atlas.analysis.specificity import run_specificity
    from circuit_atlas.cli.display import print_comparison, run_stage
    from circuit_atlas.clustering.params import ClusteringParams
    from circuit_atlas.clustering.run import run_clustering
    from circuit_atlas.compute.activation_run import run_activations
    from circuit_atlas.compute.effects import run_effects
    from circuit_atlas.compute.graphs import run_graphs
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.compute.params import GraphsParams
    from circuit_atlas.compute.precision import auto_dtype
    from circuit_atlas.compute.projections import run_projections
    from circuit_atlas.etl.reduce import run_reduce

    with clock.stage("load model"), console.status(f"loading {model} ..."):
        # effects need float32 (and the projections re-score the real weights); the
        # graphs take bfloat16 where this CPU runs it fast
        exact = load_model(model, dtype="float32")
        fast = exact if auto_dtype("cpu", "graphs") == "float32" else load_model(model)
    corpora = list(DEMO_CORPORA)
    with clock.stage("graphs"):
        run_stage(run_graphs, console, lake, model=fast, corpora=corpora,
                  params=GraphsParams(limit=limit))
    with clock.stage("activations"):
        run_stage(run_activations, console, lake, model=fast, corpora=corpora)
    with clock.stage("reduce"):
        run_stage(run_reduce, console, lake, model=exact.name, corpora=corpora)
    with clock.stage("projections"):
        run_stage(run_projections, console, lake, model=exact,
                  corpora=None if full else corpora)
    with clock.stage("wiring"):
        from circuit_atlas.compute.wiring import run_wiring

        run_stage(run_wiring, console, lake, model=exact, corpora=corpora)
    with clock.stage("effects"):
        run_stage(run_effects, console, lake, model=exact, corpora=corpora)
    with clock.stage("cooccurrence"):
        run_stage(run_cooccurrence, console, lake, model=exact.name, corpora=corpora)
    with clock.stage("specificity, roles"):
        run_stage(run_specificity, console, lake, model=exact.name, corpora=corpora,
                  params=SpecificityParams(domain="medical", baseline="general"))
        run_stage(run_roles, console, lake, model=exact.name, corpora=corpora)
    with clock.stage("cluster"):
        # a few graphs (--limit) share few edges five times: keep every edge then
        few = limit is not None and limit < DEMO_PROMPTS
        report = run_stage(run_clustering, console, lake, model=exact.name, corpora=corpora,
                           params=ClusteringParams(methods=("infomap", "leiden"),
                                                   min_count=1 if few else 5))
        print_comparison(report.comparison, console)
    key = "+".join(sorted(DEMO_CORPORA))
    top = lake.table("specificity").sort("log_odds_low", descending=True).head(1).collect()
    neuron = neuron_label(top['layer'][0], top['neuron'][0])
    labelled = _label_slice(lake, exact, key, corpora, label_slice)
    with clock.stage("interventions"):
        _battery(lake, exact, key, corpora, (neuron, *labelled), console,
                 3 if few else BATTERY_PROMPTS)
    from circuit_atlas.clustering.export import export_duckdb
    from circuit_atlas.clustering.html import export_html
    from circuit_atlas.labeling.run import label_lake

    with clock.stage("label prompts"), console.status(
            "assembling the labeling prompts (dry run, no LLM) ..."):
        # the last layer's: every layer's costs ~20 s more here (circuit-atlas label
        # --dry-run writes them all)
        for pass_ in ("output", "input"):
            label_lake(lake, exact.name, key, pass_, None, tokenizer=exact.tokenizer,
                       layers=[exact.adapter.n_layers - 1])
    busiest = lake.table("neurons", exact.name, key).filter(
        pl.col("layer") == exact.adapter.n_layers - 1).sort("graph_count").tail(1).select(
        "layer", "neuron")
    example = lake.table("label_prompts").filter(pl.col("pass") == "output").join(
        busiest, on=["layer", "neuron"]).collect()
    console.rule("[bold]an output-pass labeling prompt (circuit-atlas label --dry-run)")
    console.print(example["user_message"][0], soft_wrap=True, markup=False)
    if label_slice > 0:
        with clock.stage("label, score (embedded LLM)"):
            _label_and_score(lake, exact, key, corpora, labelled, console)
    html = lake.path("clusters.html")
    from circuit_atlas.lake.neurons import parse_neuron
    from circuit_atlas.use.reports import choose_neurons, write_reports

    with clock.stage("exports"):
        export_html(lake, exact.name, key, html, tokenizer=exact.tokenizer)
        export_duckdb(lake, exact.name, key, lake.path("atlas.duckdb"))
        export_duckdb(lake, exact.name, key, lake.path("atlas-wiring.duckdb"),
                      edges_from="wiring")
        # report pages: the labelled neurons, the medical one and the three in most graphs
        pages = choose_neurons(lake, exact.name, key, [parse_neuron(neuron)], 3, True)
        write_reports(lake, exact.name, key, lake.path("reports"), pages,
                      tokenizer=exact.tokenizer)
    from circuit_atlas.use.params import TraceParams
    from circuit_atlas.use.supernodes import run_trace

    with clock.stage("trace"):
        traced = run_stage(run_trace, console, lake, model=exact, prompt=TRACE_PROMPT,
                           corpora=corpora, params=TraceParams(out=lake.path("trace.json")))
    queries = [
        "SELECT layer, count(*) AS neurons, avg(der_mean) AS der FROM neuron_effects "
        "GROUP BY layer ORDER BY layer",
        "SELECT layer, neuron, domain_count, baseline_count, specificity FROM specificity "
        "WHERE log_odds_low > 0 ORDER BY log_odds_low DESC LIMIT 10",
        "SELECT method, count(*) AS modules, max(size) AS largest FROM clusters "
        "WHERE level = 1 GROUP BY method",
    ]
    for q in queries:  # they must work on every demo lake
        lake.sql(q)
    console.rule("[bold]the atlas")
    console.print(f"browser view: {html}", soft_wrap=True)
    console.print(f"neuron report pages ({len(pages)}, circuit-atlas export reports): "
                  f"{lake.path('reports/index.html')}", soft_wrap=True)
    console.print(f"DuckDB file:  {lake.path('atlas.duckdb')}", soft_wrap=True)
    console.print(f"the same atlas with weight-based edges, every neuron (export duckdb "
                  f"--edges wiring): {lake.path('atlas-wiring.duckdb')}", soft_wrap=True)
    console.print(f"profile of the most medical-specific neuron: circuit-atlas profile {neuron} "
                  f"--lake {lake.url}", soft_wrap=True)
    console.print(f'steer generation with it: circuit-atlas steer "{TRACE_PROMPT}" '
                  f"--neuron {neuron} --scale 8 --lake {lake.url}", soft_wrap=True)
    console.print(f"a new prompt's graph grouped by the atlas's clusters (circuit-atlas trace, "
                  f"circuit-tracer graph JSON): {traced.out}, its supernode graph: "
                  f"{traced.html}", soft_wrap=True)
    console.print("SQL, e.g.:")
    for q in queries:
        console.print(f'  circuit-atlas sql --lake {lake.url} "{q}"', soft_wrap=True)
    console.print(clock.table())
    return clock


BATTERY_PROMPTS = 12  # prompts of the demo's causal battery
TRACE_PROMPT = "Insulin is produced by the"  # the new prompt the demo traces
DEMO_DESCRIPTION = 120  # characters of a label's description in the demo: a sentence


def _label_slice(lake, model, key: str, corpora: list[str], n: int) -> list[str]:
    """The ``n`` neurons of the last layer the demo labels, twice: what drives each one
    up (the input pass) and what drives it most negative (the negative pass). Of those
    that activate positively somewhere (the input label's scorers need such contexts)
    and whose negative side is strong (the negative pass labels only those), the ones
    in the most graphs."""
    from circuit_atlas.analysis.exemplars import layer_extremes
    from circuit_atlas.labeling.evidence import strong_negative

    layer = model.adapter.n_layers - 1
    both = layer_extremes(lake, model.name, key, layer).filter(
        (pl.col("max") > 0) & strong_negative())
    chosen = (lake.table("neurons", model.name, key)
              .filter((pl.col("layer") == layer)
                      & pl.col("neuron").is_in(sorted(both["neuron"].to_list())))
              .sort(["graph_count", "neuron"], descending=[True, False]).head(n)
              .select("neuron").collect()["neuron"].to_list())
    return [neuron_label(layer, x) for x in chosen]


def _battery(lake, model, key: str, corpora: list[str], neurons: tuple[str, ...],
             console: Console, prompts: int) -> None:
    """A small causal battery on ``prompts`` prompts: ``neurons`` (the most
    medical-specific one and the ones the demo labels), the three neurons in the most
    graphs and the two largest Infomap modules, mean-ablated and boosted x4."""
    from circuit_atlas.cli.display import run_stage
    from circuit_atlas.compute.battery import run_interventions
    from circuit_atlas.compute.params import InterventionsParams

    modules = (lake.table("clusters", model.name, key)
               .filter((pl.col("method") == "infomap") & (pl.col("level") == 1)
                       & (pl.col("size") >= 3))
               .sort("size", descending=True).head(2).collect()["cluster_path"].to_list())
    run_stage(run_interventions, console, lake, model=model, corpora=corpora,
              params=InterventionsParams(neurons=neurons, top=3, modules=tuple(modules),
                                         limit=prompts))


def _label_and_score(lake, model, key: str, corpora: list[str], neurons: list[str],
                     console: Console) -> None:
    """Label ``neurons`` (input and negative passes) and score the labels, through the embedded
    OpenAI-compatible server with the real openai client, and print the scores."""
    from rich.table import Table

    from circuit_atlas.cli.display import run_stage
    from circuit_atlas.compute.negatives import run_negatives
    from circuit_atlas.compute.params import NegativesParams
    from circuit_atlas.labeling.client import LLMSettings
    from circuit_atlas.labeling.run import label_lake
    from circuit_atlas.labeling.scoring import score_lake
    from circuit_atlas.labeling.serve import Engine, Server
    from circuit_atlas.lake.labels import known_labels, latest_ok, with_scores
    from circuit_atlas.lake.neurons import parse_neuron

    layer = model.adapter.n_layers - 1
    ids = [parse_neuron(x)[1] for x in neurons]
    with Server(Engine(model.model, model.tokenizer, model.name), port=0) as server:
        console.print(f"[green]serve[/] {model.name} at {server.url} (circuit-atlas serve)")
        # short descriptions: the 135M model writes to the cap, and every character is a
        # decode step that reads the whole model
        settings = LLMSettings(model=model.name, base_url=server.url, concurrency=8,
                               timeout=900, max_retries=1, description_chars=DEMO_DESCRIPTION)
        # what drives each neuron up and what drives it most negative; the output pass
        # would add as much again (every decode step reads the whole model; the output
        # labels' intervention check is in the tests)
        for pass_ in ("input", "negative"):
            with console.status(f"labelling {len(ids)} neurons of layer {layer} ({pass_} "
                                "pass) ..."):
                labels = label_lake(lake, model.name, key, pass_, settings, layers=[layer],
                                    tokenizer=model.tokenizer, neurons=ids)
            console.print(f"[green]label[/] {pass_} pass, layer {layer}: {labels.ok} ok, "
                          f"{labels.failed} failed, {labels.skipped} already labelled; "
                          f"{labels.seconds:.1f} s")
        run_stage(run_negatives, console, lake, model=model, corpora=corpora,
                  params=NegativesParams(layers=(layer,)))
        with console.status("scoring the labels (detection, fuzzing, simulation) ..."):
            report = score_lake(lake, model.name, key, settings, layers=[layer],
                                tokenizer=model.tokenizer, sim_contexts=1)
        console.print(str(report), soft_wrap=True, markup=False)
    scored = latest_ok(known_labels(lake, model.name, key))
    if scored is None or scored.filter(pl.col("layer") == layer).is_empty():
        return
    scored = with_scores(lake, model.name, key, scored.filter(
        (pl.col("layer") == layer) & pl.col("pass").is_in(["input", "negative"])))
    table = Table("neuron", "pass", "label", "detection", "fuzzing", "simulation",
                  title=f"labels by {model.name} and their scores (label_scores)",
                  title_justify="left")
    for r in scored.sort("neuron", "pass", descending=[False, True]).iter_rows(named=True):
        table.add_row(neuron_label(r["layer"], r["neuron"]), r["pass"], r["label"],
                      *(f"{r[s]:.2f}" if r[s] is not None else "-"
                        for s in ("detection", "fuzzing", "simulation")))
    console.print(table)
    from circuit_atlas.labeling.report import scored_labels, write_report

    if lake.table_manifest(model.name, key, "label_scores") is not None:
        page = write_report(scored_labels(lake, model.name, key), lake.path("label-report"),
                            f"Label scores: {model.name}, {key} (demo slice)")
        console.print(f"label report (circuit-atlas report labels): {page}", soft_wrap=True)
    console.print("A 135M model's labels score near chance (0.5 for detection and fuzzing, "
                  "0 for simulation): the scorers say so. "
                  "With --base-url and --llm, circuit-atlas label and score run the same "
                  "passes against vLLM or OpenAI.", soft_wrap=True)
