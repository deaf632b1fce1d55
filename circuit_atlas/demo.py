"""``circuit-atlas demo``: the whole pipeline on the built-in demo corpora.

The demo corpora are short completion prompts written for this project: a medical
corpus and a general baseline (the comparison the seeds made between a medical
corpus and general web text). Each stage of the pipeline adds its step here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import polars as pl
from rich.console import Console

DEMO_CORPORA = ("medical", "general")


def demo_corpus_file(name: str) -> Path:
    """The packaged JSONL file of a demo corpus."""
    return Path(str(resources.files("circuit_atlas") / "data" / "demo" / f"{name}.jsonl"))


def run_demo(lake_path: str, console: Console | None = None, model: str = "smollm2",
             limit: int | None = None) -> None:
    from circuit_atlas.lake import Lake, read_prompt_file

    console = console or Console()
    lake = Lake.init(lake_path)
    console.rule(f"[bold]circuit-atlas demo[/] - lake at {lake.url}")
    for corpus in DEMO_CORPORA:
        path = demo_corpus_file(corpus)
        report = lake.import_prompts(read_prompt_file(path), corpus, source=f"demo:{path.name}")
        console.print(f"[green]prompts[/] corpus {corpus!r}: {report.added} new, "
                      f"{report.already_present} already imported")
    from circuit_atlas.analysis.roles import write_roles
    from circuit_atlas.analysis.specificity import write_specificity
    from circuit_atlas.clustering.network import network_params
    from circuit_atlas.compute.attribution import AttributionParams
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.compute.projections import ProjectionParams
    from circuit_atlas.pipeline import (
        cluster_tables,
        compute_effects,
        compute_graphs,
        compute_projections,
        cooccurrence_table,
        reduce_tables,
    )

    with console.status(f"loading {model} ..."):
        loaded = load_model(model)
    for corpus in DEMO_CORPORA:
        compute_graphs(lake, loaded, corpus, AttributionParams(), console, limit=limit)
    reduce_tables(lake, loaded.name, list(DEMO_CORPORA), console)
    # a quick look (--limit) projects the first and last layers only
    last = loaded.adapter.n_layers - 1
    compute_projections(lake, loaded, ProjectionParams(), console,
                        None if limit is None else [0, last])
    compute_effects(lake, loaded, list(DEMO_CORPORA), console)
    cooccurrence_table(lake, loaded.name, list(DEMO_CORPORA), console)
    rows = write_specificity(lake, loaded.name, list(DEMO_CORPORA), "medical", "general")
    console.print(f"[green]specificity[/] medical against general: {rows:,} neurons")
    counts = write_roles(lake, loaded.name, list(DEMO_CORPORA))
    console.print("[green]roles[/] " + ", ".join(f"{r} {n:,}" for r, n in sorted(
        counts.items(), key=lambda kv: -kv[1])))
    # a few graphs (--limit) share few edges five times: keep every edge then
    cluster_tables(lake, loaded.name, list(DEMO_CORPORA), ["infomap", "leiden"],
                   network_params(min_count=5 if limit is None else 1), {}, console)
    from circuit_atlas.analysis.labeler import label_lake
    from circuit_atlas.clustering.export import export_duckdb
    from circuit_atlas.clustering.html import export_html

    key = "+".join(sorted(DEMO_CORPORA))
    with console.status("assembling the labeling prompts (dry run, no LLM) ..."):
        for pass_ in ("output", "input"):
            label_lake(lake, loaded.name, key, pass_, None, tokenizer=loaded.tokenizer)
    busiest = lake.table("neurons", loaded.name, key).filter(
        pl.col("layer") == loaded.adapter.n_layers - 1).sort("graph_count").tail(1).select(
        "layer", neuron="index")
    example = lake.table("label_prompts").filter(pl.col("pass") == "output").join(
        busiest, on=["layer", "neuron"]).collect()
    console.rule("[bold]an output-pass labeling prompt (circuit-atlas label --dry-run)")
    console.print(example["user_message"][0], soft_wrap=True, markup=False)
    html = lake.path("clusters.html")
    export_html(lake, loaded.name, key, html)
    export_duckdb(lake, loaded.name, key, lake.path("atlas.duckdb"))
    top = lake.table("specificity").sort("log_odds_low", descending=True).head(1).collect()
    neuron = f"L{top['layer'][0]}/N{top['neuron'][0]}"
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
    console.print(f"DuckDB file:  {lake.path('atlas.duckdb')}", soft_wrap=True)
    console.print(f"profile of the most medical-specific neuron: circuit-atlas profile {neuron} "
                  f"--lake {lake.url}", soft_wrap=True)
    console.print("SQL, e.g.:")
    for q in queries:
        console.print(f'  circuit-atlas sql --lake {lake.url} "{q}"', soft_wrap=True)
