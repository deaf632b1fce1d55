"""sql, tables and export: the atlas for SQL, DuckDB, browsers and Gephi."""

from __future__ import annotations

import json
from typing import Any

import click

from circuit_atlas.cli import Group, cli, display
from circuit_atlas.cli.options import (
    corpora_option,
    json_option,
    lake_option,
    model_option,
    params_options,
    take_params,
)
from circuit_atlas.use.params import InvestigateParams, ReportsParams, TraceParams

method_option = click.option("--method", default="infomap", show_default=True,
                             type=click.Choice(["infomap", "leiden"]),
                             help="Clustering whose assignments to use.")


def _atlas_key(lake, model: str, corpora: tuple[str, ...]) -> tuple[str, str]:
    from circuit_atlas.names import model_name

    name = model_name(model)
    return name, lake.reduced_corpus(name, corpora)


@cli.command("sql")
@click.argument("query")
@lake_option
@click.option("--engine", default="polars", show_default=True,
              type=click.Choice(["polars", "duckdb"]), help="SQL engine.")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "csv", "json", "parquet"]), help="Output format.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this file (required for parquet).")
@click.option("--limit", default=50, show_default=True,
              help="Rows to print in table format (0: all).")
@click.option("--atlas", is_flag=True,
              help="Query the atlas tables instead (neurons, edges, clusters, metadata with "
                   "the original atlas's columns, as `export duckdb` writes them).")
@model_option
@corpora_option(help="With --atlas: corpus of the reduced tables (default: the only set).")
@method_option
def sql_cmd(query: str, lake_path: str, engine: str, fmt: str, output: str | None,
            limit: int, atlas: bool, model: str, corpora: tuple[str, ...],
            method: str) -> None:
    """Run SQL over every table of the lake (derived tables by name; the per-graph
    tables as prompts, graphs, graph_nodes, graph_edges), or with --atlas over the
    atlas tables."""
    import polars as pl

    from circuit_atlas.errors import LakeError
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    views = None
    if atlas:
        from circuit_atlas.clustering.export import atlas_tables

        views = atlas_tables(opened, *_atlas_key(opened, model, corpora), method)
    if engine == "polars":
        df = opened.sql(query, views)
    else:
        import duckdb

        try:
            df = pl.from_arrow(opened.duckdb(views=views).sql(query).arrow())
        except duckdb.Error as e:
            raise LakeError(f"SQL: {str(e).strip().splitlines()[0]}") from e
    display.write_frame(df, fmt, output, limit)


@cli.command()
@lake_option
@json_option
def tables(lake_path: str, as_json: bool) -> None:
    """List the lake's tables with their columns and row counts."""
    import polars as pl

    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.query import frames

    rows = []
    for name, lf in frames(Lake(lake_path)).items():
        schema = lf.collect_schema()
        n = lf.select(pl.len()).collect().item()
        rows.append({"table": name, "rows": n,
                     "columns": [f"{c} {t}" for c, t in schema.items()]})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table("table", "rows", "columns")
    for r in rows:
        table.add_row(r["table"], f"{r['rows']:,}", ", ".join(r["columns"]))
    display.console().print(table)


@cli.group(cls=Group)
def export() -> None:
    """Export the atlas: a DuckDB file, an HTML view, a network for Gephi."""


def _export_options(f):
    for option in reversed([
            lake_option, model_option, corpora_option(), method_option]):
        f = option(f)
    return f


@export.command("duckdb")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
@click.option("--edges", "edges_from", default="relp", show_default=True,
              type=click.Choice(["relp", "wiring"]),
              help="Where the edges table comes from: the reduced RelP edges, or the "
                   "weight-based wiring (circuit-atlas wiring; then every neuron is in the "
                   "neurons table, and no graph is needed).")
def export_duckdb_cmd(path: str, lake_path: str, model: str, corpora: tuple[str, ...],
                      method: str, edges_from: str) -> None:
    """One DuckDB file with the neurons, edges, clusters and metadata tables (the
    original atlas's columns): duckdb.connect(PATH) answers the original atlas's queries."""
    from circuit_atlas.clustering.export import export_duckdb
    from circuit_atlas.lake import Lake, LakeError

    opened = Lake(lake_path)
    try:
        model, corpus = _atlas_key(opened, model, corpora)
    except LakeError:
        if edges_from != "wiring":
            raise
        # a wiring atlas needs no reduced set: one without (or of several, none named)
        # has every neuron and no statistics
        from circuit_atlas.names import model_name

        model, corpus = model_name(model), None
    counts = export_duckdb(opened, model, corpus, path, method, edges_from)
    display.console().print(f"[green]export[/] {path}: " + ", ".join(
        f"{t} {n:,} rows" for t, n in counts.items()))


@export.command("html")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
@click.option("--links", default=5, show_default=True, help="Strongest links kept per neuron.")
def export_html_cmd(path: str, lake_path: str, model: str, corpora: tuple[str, ...],
                    method: str, links: int) -> None:
    """One self-contained HTML file: the clusters as a constellation to drill into,
    search by label, links above a threshold. Opens offline in any browser."""
    from circuit_atlas.clustering.html import export_html
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    given = model
    model, corpus = _atlas_key(opened, model, corpora)
    counts = export_html(opened, model, corpus, path, method, links_per_neuron=links,
                         tokenizer=optional_tokenizer(given))
    display.console().print(f"[green]export[/] {path}: {counts['neurons']:,} neurons, "
                     f"{counts['modules']:,} modules, {counts['links']:,} links")


@export.command("network")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
@click.option("--format", "fmt", type=click.Choice(["gexf", "graphml"]), default=None,
              help="Default: from the file name's extension.")
@click.option("--min-count", default=1, show_default=True, help="Keep edges seen this often.")
def export_network_cmd(path: str, lake_path: str, model: str, corpora: tuple[str, ...],
                       method: str, fmt: str | None, min_count: int) -> None:
    """The neuron network with labels and clusters as node attributes, for Gephi."""
    from circuit_atlas.clustering.export import export_network
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model, corpora)
    counts = export_network(opened, model, corpus, path, fmt or path.rsplit(".", 1)[-1],
                            method, min_count)
    display.console().print(f"[green]export[/] {path}: {counts['nodes']:,} nodes, "
                     f"{counts['edges']:,} edges")


@export.command("reports")
@lake_option
@model_option
@corpora_option()
@params_options(ReportsParams, names={"neurons": "neuron"})
def export_reports_cmd(lake_path: str, model: str, corpora: tuple[str, ...],
                       **options: Any) -> None:
    """One self-contained HTML page per neuron (its labels and scores, exemplars with the
    activating tokens marked, the activation histogram, projections, upstream and
    downstream neurons with their labels and links, its cluster, effects and causal
    results) and an index.html with search and filters. Opens offline."""
    from circuit_atlas.use.reports import run_reports

    display.run_stage(run_reports, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(ReportsParams, options))


@cli.command("trace")
@click.argument("prompt")
@lake_option
@model_option
@corpora_option(help="The atlas whose clusters group the graph (default: the only "
                     "reduced set).")
@params_options(TraceParams)
def trace_cmd(prompt: str, lake_path: str, model: str, corpora: tuple[str, ...],
              **options: Any) -> None:
    """The attribution graph of a new PROMPT, its neurons grouped into supernodes by the
    atlas's cluster modules (named by their labels), written as circuit-tracer /
    Neuronpedia graph JSON that opens grouped in their viewers; prints how much of the
    graph's influence the supernodes hold and how much link weight the supernode graph
    keeps."""
    from circuit_atlas.use.supernodes import run_trace

    display.run_stage(run_trace, display.console(), lake_path, model=model, prompt=prompt,
                      corpora=corpora, params=take_params(TraceParams, options))


@cli.command("investigate")
@click.argument("neuron")
@lake_option
@model_option
@corpora_option(help="The atlas the agent reads (default: the only reduced set).")
@params_options(InvestigateParams)
def investigate_cmd(neuron: str, lake_path: str, model: str, corpora: tuple[str, ...],
                    **options: Any) -> None:
    """Let an LLM agent (any OpenAI-compatible endpoint with tool calling) investigate
    NEURON (L12/N345): it reads the atlas (profile, exemplars, labels, neighbours,
    clusters, SQL), states hypotheses, runs prompts of its own design through the model
    and reads the neuron's activation, ablates or boosts it, and ends with a verdict and
    a confidence. Every step is journaled (a killed run resumes); the record goes to the
    investigations table and the neuron's report page."""
    from circuit_atlas.use.investigate import run_investigate

    display.run_stage(run_investigate, display.console(), lake_path, model=model,
                      neuron=neuron, corpora=corpora,
                      params=take_params(InvestigateParams, options))


@cli.command("mcp")
@lake_option
@click.option("--model", "model", default=None,
              help="The atlas's model (default: the only model in the lake).")
@corpora_option()
@click.option("--transport", default="stdio", show_default=True,
              type=click.Choice(["stdio", "http"]),
              help="stdio (an agent starts this command) or streamable HTTP.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP: address.")
@click.option("--port", default=8765, show_default=True, help="HTTP: port (path /mcp).")
@click.option("--interventions", default=0, show_default=True,
              help="Offer the activations, trace, intervene and steer tools (they run "
                   "the model), this many calls in all (0: not offered).")
@click.option("--embedding-model", default=None,
              help="Semantic label search with this model of an OpenAI-compatible "
                   "embeddings endpoint (default: substring and regex search only).")
@click.option("--embedding-base-url", default=None,
              help="The embeddings endpoint, e.g. http://localhost:8000/v1 (default: the "
                   "OPENAI_BASE_URL variable, else OpenAI; circuit-atlas serve has one).")
@click.option("--embedding-api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding its API key.")
def mcp_cmd(lake_path: str, model: str | None, corpora: tuple[str, ...], transport: str,
            host: str, port: int, interventions: int, embedding_model: str | None,
            embedding_base_url: str | None, embedding_api_key_env: str) -> None:
    """Serve the atlas to agents over the Model Context Protocol: tools sql,
    profile, search_labels, neighbours, cluster and exemplars, each answer citing the
    tables and versions it read; the resource atlas://tables. With --interventions N,
    also activations, trace (the graph is stored in the traces corpus), intervene and
    steer on new prompts (N calls in all)."""
    import os

    from circuit_atlas.labeling.client import EmbeddingSettings
    from circuit_atlas.use.mcp import run_mcp

    embeddings = None if embedding_model is None else EmbeddingSettings(
        embedding_model, embedding_base_url or os.environ.get("OPENAI_BASE_URL"),
        embedding_api_key_env)
    run_mcp(lake_path, model=model, corpora=corpora, transport=transport, host=host,
            port=port, interventions=interventions, embeddings=embeddings)
