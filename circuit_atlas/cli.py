"""The ``circuit-atlas`` command: one subcommand group per stage.

Imports stay inside the commands so that ``--help`` never loads torch or dask.
Errors derived from :class:`CircuitAtlasError` print as one line and exit 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from circuit_atlas._version import __version__
from circuit_atlas.errors import CircuitAtlasError

LAKE_ENV = "CIRCUIT_ATLAS_LAKE"


class _Group(click.Group):
    """Turns our errors into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CircuitAtlasError as e:
            raise click.ClickException(str(e)) from e


lake_option = click.option(
    "--lake",
    "lake_path",
    envvar=LAKE_ENV,
    default="lake",
    show_default=True,
    show_envvar=True,
    help="Lake root: a local folder or an fsspec URL.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
atlas_corpus_option = click.option(
    "--corpus", "corpora", multiple=True,
    help="Corpus of the reduced tables, repeated for a joint reduce (default: the only "
         "reduced set).")


def _console():
    from rich.console import Console

    return Console()


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="circuit-atlas")
def cli() -> None:
    """Build a circuit atlas of an LLM's MLP neurons.

    Stages: import prompts, compute attribution graphs, reduce them with Dask into
    edge and neuron tables, analyse, cluster and label. Everything lives in one
    lake of Parquet files (--lake, or the CIRCUIT_ATLAS_LAKE variable).
    """


# lake ------------------------------------------------------------------------------


@cli.group(cls=_Group)
def lake() -> None:
    """Create, inspect and clean a lake."""


@lake.command("init")
@lake_option
def lake_init(lake_path: str) -> None:
    """Create a lake (or check that one exists) at --lake."""
    from circuit_atlas.lake import Lake

    opened = Lake.init(lake_path)
    click.echo(f"lake ready at {opened.url}")


@lake.command("info")
@lake_option
@json_option
def lake_info(lake_path: str, as_json: bool) -> None:
    """Corpora, models, shards, graphs, rows and bytes in a lake."""
    from rich.table import Table

    from circuit_atlas.lake import Lake

    info = Lake(lake_path).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console = _console()
    console.print(f"[bold]lake[/] {info['lake']}  (format {info['format_version']}, "
                  f"{info['created_by']})")
    corpora = Table("corpus", "prompts", "files", "bytes", title="prompt corpora",
                    title_justify="left")
    for name, c in info["corpora"].items():
        corpora.add_row(name, str(c["prompts"]), str(c["files"]), _human_bytes(c["bytes"]))
    console.print(corpora if info["corpora"] else "no corpora yet: `circuit-atlas prompts import`")
    if info["models"]:
        graphs = Table("model", "corpus", "shards", "graphs", "nodes", "edges", "bytes",
                       title="attribution graphs", title_justify="left")
        for entry in info["models"].values():
            for corpus, c in entry["corpora"].items():
                graphs.add_row(entry["model"], corpus, str(c["shards"]), str(c["graphs"]),
                               str(c["nodes"]), str(c["edges"]), _human_bytes(c["bytes"]))
        console.print(graphs)
    else:
        console.print("no graphs yet")
    for model, corpora_tables in info["tables"].items():
        for corpus, names in corpora_tables.items():
            console.print(f"tables of {model} / {corpus}: {', '.join(names)}")
    if info["uncommitted_shards"]:
        console.print(f"[yellow]{info['uncommitted_shards']} uncommitted shard(s)[/] "
                      "(in progress, or debris: `circuit-atlas lake cleanup`)")


@lake.command("files")
@lake_option
@click.argument("table")
@click.option("--model", default=None, help="Only this model (hub id or partition key).")
@click.option("--corpus", default=None, help="Only this corpus.")
@click.option("--version", "version", default=None,
              help="A derived table's earlier version: its number (negative counts back) "
                   "or id.")
def lake_files(lake_path: str, table: str, model: str | None, corpus: str | None,
               version: str | None) -> None:
    """The committed files of one snapshot of TABLE, one per line: what a reader
    without circuit-atlas reads (duckdb's read_parquet, spark, pandas)."""
    from circuit_atlas.lake import Lake

    parsed = int(version) if version and version.lstrip("-").isdigit() else version
    for path in Lake(lake_path).files(table, model, corpus, version=parsed):
        click.echo(path)


@lake.command("migrate")
@lake_option
def lake_migrate(lake_path: str) -> None:
    """Rewrite a lake of an older format in place as the current one (resumable)."""
    from circuit_atlas.lake.migrate import migrate

    report = migrate(lake_path)
    click.echo(f"migrated {lake_path}: {report.prompt_parts} prompt part(s), {report.shards} "
               f"shard(s), {len(report.tables)} table(s); removed {len(report.removed)} "
               "uncommitted item(s). The next reduce folds every shard again.")


@lake.command("cleanup")
@lake_option
@click.option("--min-age", type=float, default=3600.0, show_default=True,
              help="Seconds an uncommitted shard must be unchanged before it counts as debris "
                   "(writers on other nodes may still be busy). Shards whose writer on this "
                   "host is dead go regardless. 0 removes all debris.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
def lake_cleanup(lake_path: str, min_age: float, dry_run: bool) -> None:
    """Remove what killed jobs left (uncommitted shards, unpublished versions, scratch,
    temporary files) and the table versions superseded for longer than the lake's
    retention period."""
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    report = opened.cleanup(min_age_s=min_age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in report.removed:
        click.echo(f"{verb} {path}")
    for path in report.expired:
        click.echo(f"{verb} (retention of {opened.retention_s / 86400:g} days over) {path}")
    for path in report.in_progress:
        click.echo(f"kept (writer alive or recent) {path}")
    click.echo(f"{verb} {len(report.removed)} item(s) and {len(report.expired)} expired "
               f"version(s); kept {len(report.in_progress)} in progress")


# prompts ---------------------------------------------------------------------------


@cli.group(cls=_Group)
def prompts() -> None:
    """Import and list prompt corpora."""


@prompts.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--corpus", required=True, help="Corpus name, e.g. medical.")
@lake_option
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl", "yaml", "csv", "parquet",
                                                    "txt"]),
              help="File format; by default from the suffix.")
@click.option("--domain", help="Domain for prompts whose record has none.")
@click.option("--text-field", help="Key or column holding the prompt (default: prompt, then text).")
def prompts_import(files: tuple[str, ...], corpus: str, lake_path: str, fmt: str | None,
                   domain: str | None, text_field: str | None) -> None:
    """Import prompt FILES into a corpus (creating the lake if the folder is new).

    Accepts JSON, JSONL, YAML (a list of strings, or of mappings with a `prompt` or
    `text` key and optional `domain` and other fields), CSV, Parquet and plain text
    (one prompt per line). Ids are content hashes: importing twice adds nothing.
    """
    import os

    from circuit_atlas.lake import Lake, read_prompt_file

    # Parse every file before writing anything: a bad file leaves the lake untouched.
    parsed = [(f, read_prompt_file(f, fmt, text_field)) for f in files]
    opened = Lake.init(lake_path)
    for f, records in parsed:
        r = opened.import_prompts(records, corpus, source=os.path.basename(f), domain=domain)
        click.echo(f"{f}: {r.added} new prompt(s) in corpus {corpus!r}, "
                   f"{r.already_present} already there, {r.duplicates_in_input} repeated in file")


@prompts.command("list")
@lake_option
@click.option("--corpus", help="Show the prompts of this corpus (default: list corpora).")
@click.option("--limit", type=int, default=20, show_default=True, help="Prompts to show; 0 = all.")
@json_option
def prompts_list(lake_path: str, corpus: str | None, limit: int, as_json: bool) -> None:
    """List corpora with their sizes, or the prompts of one corpus."""
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    if corpus is None:
        info = opened.info()["corpora"]
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            for name, c in info.items():
                click.echo(f"{name}\t{c['prompts']} prompts")
        return
    frame = opened.scan("prompts", corpus=opened.check_corpus(corpus)).sort("prompt_id")
    if limit:
        frame = frame.head(limit)
    rows = frame.select("prompt_id", "domain", "source", "text").collect().to_dicts()
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table("prompt_id", "domain", "text", title=f"corpus {corpus}", title_justify="left")
    for row in rows:
        table.add_row(row["prompt_id"], row["domain"] or "", row["text"])
    _console().print(table)


# clusters --------------------------------------------------------------------------


def cluster_options(f=None, *, default: str = "local"):
    """The cluster choice every Dask command shares (SLURM flags override the
    jobqueue.slurm section of the Dask config)."""
    if f is None:
        return lambda g: cluster_options(g, default=default)
    extra = " 'none' runs in this process." if default == "none" else ""
    options = [
        click.option("--cluster", default=default, show_default=True,
                     help="'local' (a LocalCluster sized to this machine), 'slurm' "
                          "(dask-jobqueue), or a scheduler address tcp://host:port." + extra),
        click.option("--workers", type=int, help="Local workers (default: one per core)."),
        click.option("--worker-memory", help="Memory limit per local worker, e.g. 2GB."),
        click.option("--queue", "--partition", "queue", help="SLURM partition."),
        click.option("--account", help="SLURM account."),
        click.option("--cores", type=int, help="Cores per SLURM job."),
        click.option("--memory", help="Memory per SLURM job, e.g. 24GB."),
        click.option("--walltime", help="SLURM walltime, e.g. 01:00:00."),
        click.option("--jobs", type=int, help="SLURM jobs to start (default 1)."),
        click.option("--adapt-min", type=int, help="Adaptive SLURM: at least this many jobs."),
        click.option("--adapt-max", type=int, help="Adaptive SLURM: at most this many jobs."),
        click.option("--job-extra-directive", "job_extra_directives", multiple=True,
                     help="Extra #SBATCH line, e.g. --gres=gpu:1 (repeatable)."),
        click.option("--worker-extra-arg", "worker_extra_args", multiple=True,
                     help="Extra argument of the SLURM worker command (repeatable)."),
        click.option("--slurm-profile", help="Named SLURM settings: cpu-reduce, gpu-compute, "
                                             "or yours under circuit-atlas.slurm-profiles."),
        click.option("--local-directory", help="Worker scratch directory on the nodes."),
        click.option("--log-directory", help="Where SLURM job logs go."),
        click.option("--interface", help="Network interface of scheduler and workers, e.g. ib0."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# compute ---------------------------------------------------------------------------


@cli.command()
@click.option("--model", "model_spec", default="HuggingFaceTB/SmolLM2-135M-Instruct",
              show_default=True,
              help="Hub id (from the local cache), local folder, GGUF file, or 'smollm2' "
                   "for the embedded default.")
@click.option("--corpus", required=True, help="Corpus whose prompts to attribute.")
@lake_option
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float64", "bfloat16", "float16"]),
              help="Model and attribution precision; auto: bfloat16 where the device runs "
                   "it fast (measured once per process), else float32.")
@click.option("--candidates", default=500, show_default=True,
              help="Neurons kept as nodes: the top ones by |relevance|.")
@click.option("--last-positions", type=int, default=None,
              help="Only take candidates from the last K positions.")
@click.option("--max-logits", default=10, show_default=True, help="At most this many logits.")
@click.option("--logit-prob", default=0.95, show_default=True,
              help="Add logit targets until their probabilities sum to this.")
@click.option("--no-prune", is_flag=True, help="Keep the complete, unpruned graph.")
@click.option("--node-threshold", default=0.8, show_default=True,
              help="Share of influence the kept nodes carry.")
@click.option("--edge-threshold", default=0.98, show_default=True,
              help="Share of influence the kept edges carry.")
@click.option("--max-tokens", default=256, show_default=True, help="Truncate prompts to this.")
@click.option("--shard-size", default=32, show_default=True, help="Graphs per committed shard.")
@click.option("--batch-rows", default=256, show_default=True,
              help="Targets replayed together in one batch (memory vs. speed).")
@click.option("--prompt-batch", default=8, show_default=True,
              help="Prompts sharing one forward and relevance backward (memory vs. speed).")
@click.option("--limit", type=int, default=None, help="Only the first N prompts (by id).")
@cluster_options(default="none")
def graphs(model_spec: str, corpus: str, lake_path: str, device: str, dtype: str,
           candidates: int, last_positions: int | None, max_logits: int, logit_prob: float,
           no_prune: bool, node_threshold: float, edge_threshold: float, max_tokens: int,
           shard_size: int, batch_rows: int, prompt_batch: int, limit: int | None,
           **cluster: Any) -> None:
    """Compute RelP attribution graphs for a corpus and commit them to the lake.

    Prompts whose graphs are already committed for the same model and parameters
    are skipped, so a killed run resumes where it stopped.
    """
    from circuit_atlas.compute.attribution import AttributionParams
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import cluster_client, compute_graphs

    params = AttributionParams(
        max_logits=max_logits, logit_prob=logit_prob, candidates=candidates,
        last_positions=last_positions, prune=not no_prune, node_threshold=node_threshold,
        edge_threshold=edge_threshold)
    opened = Lake(lake_path)
    opened.check_corpus(corpus)
    kwargs = {"max_tokens": max_tokens, "shard_size": shard_size, "batch_rows": batch_rows,
              "prompt_batch": prompt_batch, "limit": limit}
    if cluster["cluster"] == "none":
        compute_graphs(opened, model_spec, corpus, params, device=device, dtype=dtype,
                       console=_console(), **kwargs)
        return
    gpus = 1 if device.startswith("cuda") and cluster["cluster"] == "slurm" else 0
    with cluster_client(**cluster, gpus=gpus, echo=click.echo) as client:
        compute_graphs(opened, model_spec, corpus, params, device=device, dtype=dtype,
                       console=_console(), client=client, **kwargs)


@cli.command("export-graph")
@lake_option
@click.option("--corpus", required=True, help="Corpus of the prompt.")
@click.option("--model", "model_spec", default="HuggingFaceTB/SmolLM2-135M-Instruct",
              show_default=True, help="Model whose graph to export (and whose tokenizer decodes).")
@click.option("--prompt-id", help="The prompt's id (see `prompts list`).")
@click.option("--text", help="Or the prompt's text.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (default: <corpus>-<prompt id>.json).")
def export_graph(lake_path: str, corpus: str, model_spec: str, prompt_id: str | None,
                 text: str | None, output: str | None) -> None:
    """Write one stored graph as circuit-tracer / Neuronpedia graph JSON."""
    from circuit_atlas.compute.export import graph_json
    from circuit_atlas.compute.models import load_tokenizer, resolve
    from circuit_atlas.lake import Lake
    from circuit_atlas.lake import prompt_id as hash_prompt

    if (prompt_id is None) == (text is None):
        raise click.UsageError("give exactly one of --prompt-id and --text")
    pid = prompt_id or hash_prompt(text)
    tokenizer = load_tokenizer(model_spec)
    data = graph_json(Lake(lake_path), resolve(model_spec)[0], corpus, pid,
                      lambda t: tokenizer.decode([t]))
    output = output or f"{corpus}-{pid}.json"
    with open(output, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    click.echo(f"wrote {output}: {len(data['nodes'])} nodes, {len(data['links'])} links")


model_option = click.option(
    "--model", "model_spec", default="HuggingFaceTB/SmolLM2-135M-Instruct", show_default=True,
    help="Hub id (local cache), folder, GGUF file, or 'smollm2' (embedded).")
device_option = click.option("--device", default="cpu", show_default=True,
                             help="torch device, e.g. cuda.")


def _load(model_spec: str, device: str, dtype: str, console, stage: str = "graphs"):
    from circuit_atlas.compute.models import load_model

    with console.status(f"loading {model_spec} ..."):
        return load_model(model_spec, device=device, dtype=dtype, stage=stage,
                          warn=console.print)


@cli.command()
@lake_option
@model_option
@device_option
@click.option("--k", default=20, show_default=True, help="Tokens per neuron, kind and sign.")
@click.option("--no-norm", is_flag=True,
              help="Skip the final/MLP norm weights (the seeds' raw W_U @ W_down formula).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Precision of the candidate search (candidates are re-scored in float32); "
                   "auto: bfloat16 where the device runs it fast, else float32.")
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (repeatable).")
@click.option("--corpus", "corpora", multiple=True,
              help="Only the neurons of this corpus's reduced neurons table (repeat for a "
                   "joint reduce); default: every neuron.")
def projections(lake_path: str, model_spec: str, device: str, k: int, no_norm: bool, dtype: str,
                layers: tuple[int, ...], corpora: tuple[str, ...]) -> None:
    """Static output and input projections of every neuron onto the vocabulary: the
    projections table (corpus 'static')."""
    from circuit_atlas.compute.projections import ProjectionParams
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import compute_projections

    console = _console()
    opened = Lake(lake_path)
    params = ProjectionParams(k=k, norm=not no_norm, dtype=dtype)
    model = _load(model_spec, device, "float32", console)
    compute_projections(opened, model, params, console, list(layers) or None,
                        corpora=list(corpora) or None)


def _neuron_ids(values: tuple[str, ...]) -> list[tuple[int, int]] | None:
    from circuit_atlas.analysis.profile import parse_neuron

    try:
        return [parse_neuron(v) for v in values] or None
    except CircuitAtlasError as e:
        raise click.BadParameter(str(e)) from e


@cli.command()
@lake_option
@model_option
@device_option
@click.option("--corpus", "corpora", multiple=True, required=True,
              help="Corpus whose prompts to use (repeat; tables go under corpus=<a>+<b>).")
@click.option("--neuron", "neurons", multiple=True,
              help="Evaluate this neuron (L12/N345 or 12:345) on every prompt (repeatable); "
                   "default: each graph's neurons on its own prompt.")
@click.option("--limit", type=int, default=None, help="Only the first N prompts (by id).")
@click.option("--batch", default=256, show_default=True,
              help="Neurons rerun together from the cached residual.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float64"]),
              help="Model precision; auto: float32 on every device (effects are differences "
                   "of logits, which bfloat16 rounds away).")
def effects(lake_path: str, model_spec: str, device: str, corpora: tuple[str, ...],
            neurons: tuple[str, ...], limit: int | None, batch: int, dtype: str) -> None:
    """Direct and indirect effects of neurons on the prompts' predictions: the effects
    and neuron_effects (direct effect ratio) tables."""
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import compute_effects

    console = _console()
    opened = Lake(lake_path)
    wanted = _neuron_ids(neurons)
    model = _load(model_spec, device, dtype, console, stage="effects")
    compute_effects(opened, model, list(corpora), console, neurons=wanted, limit=limit,
                    batch=batch)


# etl -------------------------------------------------------------------------------


@cli.command()
@lake_option
@click.option("--corpus", "corpora", multiple=True, required=True,
              help="Corpus to reduce; repeat to reduce several together.")
@click.option("--model", "model_spec", default="HuggingFaceTB/SmolLM2-135M-Instruct",
              show_default=True, help="Model whose graphs to reduce.")
@click.option("--min-count", default=1, show_default=True,
              help="Publish only edges seen at least this often (the seeds used 3).")
@click.option("--top-k", default=10, show_default=True, help="Token associations per neuron.")
@click.option("--chunk", default=64, show_default=True,
              help="Shards folded per task (bounds the memory of one task).")
@cluster_options
def reduce(lake_path: str, corpora: tuple[str, ...], model_spec: str, min_count: int,
           top_k: int, chunk: int, **cluster: Any) -> None:
    """Reduce committed graphs into the edges, neurons, neuron_tokens and neuron_corpora
    tables. A rerun folds only the shards committed since."""
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import reduce_tables

    opened = Lake(lake_path)
    reduce_tables(opened, model_spec, list(corpora), _console(), min_count=min_count,
                  top_k=top_k, chunk=chunk, cluster=cluster)


# analysis --------------------------------------------------------------------------

corpora_option = click.option(
    "--corpus", "corpora", multiple=True, required=True,
    help="Corpus of the reduced tables (repeat for a joint reduce of several).")


@cli.command()
@lake_option
@model_option
@corpora_option
@click.option("--k", default=20, show_default=True, help="Co-occurring neurons per neuron.")
@click.option("--min-count", default=2, show_default=True,
              help="Keep pairs found together in at least this many graphs.")
@click.option("--max-share", default=0.5, show_default=True,
              help="Neurons in more than this share of the graphs are hubs, left out.")
@click.option("--rank-by", default="jaccard", show_default=True,
              type=click.Choice(["jaccard", "npmi", "joint_count"]), help="Top-k order.")
@cluster_options
def cooccurrence(lake_path: str, model_spec: str, corpora: tuple[str, ...], k: int,
                 min_count: int, max_share: float, rank_by: str, **cluster: Any) -> None:
    """Neurons that appear in the same graphs: the cooccurrence table (top-k per
    neuron, with joint count, Jaccard and normalised PMI), on a Dask cluster."""
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import cooccurrence_table

    cooccurrence_table(Lake(lake_path), model_spec, list(corpora), _console(), cluster=cluster,
                       k=k, min_count=min_count, max_share=max_share, rank_by=rank_by)


@cli.command()
@lake_option
@model_option
@corpora_option
@click.option("--domain", required=True, help="The domain corpus (e.g. medical).")
@click.option("--baseline", required=True, help="The baseline corpus (e.g. general).")
def specificity(lake_path: str, model_spec: str, corpora: tuple[str, ...], domain: str,
                baseline: str) -> None:
    """Domain specificity of every neuron (smoothed score and log odds with a 95%
    interval) from a joint reduce of the domain and baseline corpora."""
    from circuit_atlas.analysis.specificity import write_specificity
    from circuit_atlas.compute.names import model_name
    from circuit_atlas.lake import Lake

    rows = write_specificity(Lake(lake_path), model_name(model_spec), list(corpora), domain,
                             baseline)
    _console().print(f"[green]specificity[/] {domain} against {baseline}: {rows:,} neurons")


@cli.command()
@lake_option
@model_option
@corpora_option
def roles(lake_path: str, model_spec: str, corpora: tuple[str, ...]) -> None:
    """Circuit role of every neuron with edges (feature detector, relay, integrator,
    output formatter, inhibitor, other): the roles table."""
    from circuit_atlas.analysis.roles import write_roles
    from circuit_atlas.compute.names import model_name
    from circuit_atlas.lake import Lake

    counts = write_roles(Lake(lake_path), model_name(model_spec), list(corpora))
    _console().print("[green]roles[/] " + ", ".join(
        f"{role} {n:,}" for role, n in sorted(counts.items(), key=lambda kv: -kv[1])))


@cli.command()
@click.argument("neuron")
@lake_option
@model_option
@atlas_corpus_option
@click.option("--top", default=10, show_default=True, help="Rows per section.")
@json_option
def profile(neuron: str, lake_path: str, model_spec: str, corpora: tuple[str, ...], top: int,
            as_json: bool) -> None:
    """Everything the lake knows about one neuron (L12/N345 or 12:345)."""
    from circuit_atlas.analysis.profile import neuron_profile, parse_neuron
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import print_profile, profile_tokenizer

    layer, index = parse_neuron(neuron)
    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)
    found = neuron_profile(opened, model, layer, index, corpus, top,
                           profile_tokenizer(model_spec))
    if as_json:
        click.echo(json.dumps(found, indent=1, default=str))
    else:
        print_profile(found, _console())


# slurm -----------------------------------------------------------------------------


@cli.group(cls=_Group)
def slurm() -> None:
    """SLURM helpers."""


@slurm.command("script")
@cluster_options(default="slurm")
@click.option("--gpus", default=0, show_default=True,
              help="GPUs per job (adds --gres=gpu:N and the worker resource GPU=N).")
def slurm_script(gpus: int, **cluster: Any) -> None:
    """Print the job script dask-jobqueue would submit for these settings (nothing
    is submitted), to check it before spending an allocation."""
    from circuit_atlas.etl.clusters import slurm_cluster

    keys = {"queue": "queue", "account": "account", "cores": "cores", "memory": "memory",
            "walltime": "walltime", "local_directory": "local_directory",
            "log_directory": "log_directory", "interface": "interface"}
    overrides = {k: cluster.get(v) for k, v in keys.items()}
    overrides["job_extra_directives"] = list(cluster["job_extra_directives"]) or None
    overrides["worker_extra_args"] = list(cluster["worker_extra_args"]) or None
    with slurm_cluster(cluster["slurm_profile"], gpus=gpus, **overrides) as sc:
        click.echo(sc.job_script())


# labels ----------------------------------------------------------------------------


@cli.group(cls=_Group)
def labels() -> None:
    """Neuron labels: import the ones you have."""


@labels.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@lake_option
@model_option
@corpora_option
@click.option("--pass", "pass_", default="prior", show_default=True,
              type=click.Choice(["prior", "output", "input"]),
              help="What the labels describe; prior: evidence for the output pass.")
def labels_import(file: str, lake_path: str, model_spec: str, corpora: tuple[str, ...],
                  pass_: str) -> None:
    """Add labels from CSV, JSON or JSONL (layer and neuron columns, or an id such as
    L12/N345; a label; optionally a description) to the labels table."""
    from circuit_atlas.analysis.labels import import_labels
    from circuit_atlas.compute.names import model_name
    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.layout import corpus_key

    n = import_labels(Lake(lake_path), model_name(model_spec), corpus_key(corpora), file, pass_)
    _console().print(f"[green]labels[/] {n:,} imported from {file} (pass {pass_})")


@cli.command()
@lake_option
@model_option
@atlas_corpus_option
@click.option("--pass", "passes", multiple=True, default=("output", "input"),
              show_default=True, type=click.Choice(["output", "input"]),
              help="Pass(es) to run, in this order.")
@click.option("--base-url", envvar="OPENAI_BASE_URL", show_envvar=True,
              help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM).")
@click.option("--llm", "llm_model", default="gpt-5-mini", show_default=True,
              help="Model name at the endpoint.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key.")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per request.")
@click.option("--max-retries", default=5, show_default=True,
              help="Retries with exponential backoff on 429, 5xx and timeouts.")
@click.option("--batch", is_flag=True, help="Use the Batch API (a batch per layer).")
@click.option("--poll", default=30.0, show_default=True, help="Batch polling interval, s.")
@click.option("--dry-run", is_flag=True,
              help="No LLM: write every assembled prompt to the label_prompts table.")
@click.option("--only-failed", is_flag=True, help="Ask again only where a reply failed.")
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (repeatable).")
@click.option("--per-layer", type=int, help="Only the N neurons of each layer in most graphs.")
@click.option("--price-in", default=0.0, show_default=True,
              help="USD per million prompt tokens, for the cost printed at the end.")
@click.option("--price-out", default=0.0, show_default=True,
              help="USD per million completion tokens.")
@click.option("--no-clusters", is_flag=True,
              help="Do not name the clusters (done by default when a clustering exists).")
@click.option("--cluster-method", default="infomap", show_default=True,
              type=click.Choice(["infomap", "leiden"]), help="Clustering whose modules to name.")
def label(lake_path: str, model_spec: str, corpora: tuple[str, ...], passes: tuple[str, ...],
          base_url: str | None, llm_model: str, api_key_env: str, concurrency: int,
          timeout: float, max_retries: int, batch: bool, poll: float, dry_run: bool,
          only_failed: bool, layers: tuple[int, ...], per_layer: int | None, price_in: float,
          price_out: float, no_clusters: bool, cluster_method: str) -> None:
    """Label every neuron twice with an LLM: the output pass (what it does; late layers
    first, showing its targets' labels) and the input pass (what triggers it; early
    layers first, showing its sources' labels). Resumable: a rerun asks only what is
    missing or failed."""
    from circuit_atlas.analysis.labeler import LLMSettings
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import label_neurons

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)
    settings = None if dry_run else LLMSettings(
        model=llm_model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
        timeout=timeout, max_retries=max_retries, price_in=price_in, price_out=price_out,
        batch=batch, poll_s=poll)
    console = _console()
    label_neurons(opened, model_spec, model, corpus, list(passes), settings, console,
                  layers=list(layers) or None, per_layer=per_layer, only_failed=only_failed)
    if settings is not None and not no_clusters and opened.table_manifest(
            model, corpus, "cluster_assignments") is not None:
        from circuit_atlas.analysis.labeler import label_clusters

        with console.status("naming the clusters ..."):
            report = label_clusters(opened, model, corpus, settings, cluster_method)
        console.print(f"[green]cluster labels[/] {cluster_method}: {report.ok:,} ok, "
                      f"{report.failed:,} failed, {report.skipped:,} already named; "
                      f"${report.cost(settings):.4f}")


@cli.command()
@lake_option
@model_option
@atlas_corpus_option
@click.option("--pass", "pass_", type=click.Choice(["output", "input"]), default=None,
              help="Only neurons with this pass's label.")
def browse(lake_path: str, model_spec: str, corpora: tuple[str, ...], pass_: str | None
           ) -> None:
    """Page through labelled neurons with their evidence (n/Enter next, b back,
    r random, g go to a neuron, l jump to a layer, q quit). No LLM calls."""
    from circuit_atlas.analysis.browse import browse as run
    from circuit_atlas.lake import Lake
    from circuit_atlas.pipeline import profile_tokenizer

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)

    def read(prompt: str) -> str:
        return click.prompt(prompt, default="", show_default=False, prompt_suffix="")

    run(opened, model, corpus, pass_, read, click.echo, profile_tokenizer(model_spec))


# use -------------------------------------------------------------------------------


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
                   "the seeds' columns, as `export duckdb` writes them).")
@model_option
@click.option("--corpus", "corpora", multiple=True,
              help="With --atlas: corpus of the reduced tables (default: the only set).")
@click.option("--method", default="infomap", show_default=True,
              type=click.Choice(["infomap", "leiden"]), help="With --atlas: clustering.")
def sql_cmd(query: str, lake_path: str, engine: str, fmt: str, output: str | None,
            limit: int, atlas: bool, model_spec: str, corpora: tuple[str, ...],
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

        views = atlas_tables(opened, *_atlas_key(opened, model_spec, corpora), method)
    if engine == "polars":
        df = opened.sql(query, views)
    else:
        import duckdb

        try:
            df = pl.from_arrow(opened.duckdb(views=views).sql(query).arrow())
        except duckdb.Error as e:
            raise LakeError(f"SQL: {str(e).strip().splitlines()[0]}") from e
    _write_frame(df, fmt, output, limit)


def _write_frame(df, fmt: str, output: str | None, limit: int) -> None:
    import polars as pl

    if fmt == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs --output FILE")
        df.write_parquet(output)
    elif fmt in ("csv", "json"):
        text = df.write_csv() if fmt == "csv" else df.write_json()
        if output:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            click.echo(text, nl=False)
    else:
        with pl.Config(tbl_rows=limit if limit > 0 else -1, tbl_cols=-1, fmt_str_lengths=60,
                       tbl_width_chars=200):
            click.echo(df if not output else "")
        if output:
            df.write_csv(output)


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
    _console().print(table)


@cli.group(cls=_Group)
def export() -> None:
    """Export the atlas: a DuckDB file, an HTML view, a network for Gephi."""


def _export_options(f):
    for option in reversed([
            lake_option, model_option,
            atlas_corpus_option,
            click.option("--method", default="infomap", show_default=True,
                         type=click.Choice(["infomap", "leiden"]),
                         help="Clustering whose assignments to export.")]):
        f = option(f)
    return f


def _atlas_key(lake, model_spec: str, corpora: tuple[str, ...]) -> tuple[str, str]:
    from circuit_atlas.analysis.profile import default_corpus
    from circuit_atlas.compute.names import model_name
    from circuit_atlas.lake.layout import corpus_key

    model = model_name(model_spec)
    return model, corpus_key(corpora) if corpora else default_corpus(lake, model)


@export.command("duckdb")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
def export_duckdb_cmd(path: str, lake_path: str, model_spec: str, corpora: tuple[str, ...],
                      method: str) -> None:
    """One DuckDB file with the neurons, edges, clusters and metadata tables (the
    seeds' columns): duckdb.connect(PATH) answers the seeds' queries."""
    from circuit_atlas.clustering.export import export_duckdb
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)
    counts = export_duckdb(opened, model, corpus, path, method)
    _console().print(f"[green]export[/] {path}: " + ", ".join(
        f"{t} {n:,} rows" for t, n in counts.items()))


@export.command("html")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
@click.option("--links", default=5, show_default=True, help="Strongest links kept per neuron.")
def export_html_cmd(path: str, lake_path: str, model_spec: str, corpora: tuple[str, ...],
                    method: str, links: int) -> None:
    """One self-contained HTML file: the clusters as a constellation to drill into,
    search by label, links above a threshold. Opens offline in any browser."""
    from circuit_atlas.clustering.html import export_html
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)
    counts = export_html(opened, model, corpus, path, method, links_per_neuron=links)
    _console().print(f"[green]export[/] {path}: {counts['neurons']:,} neurons, "
                     f"{counts['modules']:,} modules, {counts['links']:,} links")


@export.command("network")
@click.argument("path", type=click.Path(dir_okay=False))
@_export_options
@click.option("--format", "fmt", type=click.Choice(["gexf", "graphml"]), default=None,
              help="Default: from the file name's extension.")
@click.option("--min-count", default=1, show_default=True, help="Keep edges seen this often.")
def export_network_cmd(path: str, lake_path: str, model_spec: str, corpora: tuple[str, ...],
                       method: str, fmt: str | None, min_count: int) -> None:
    """The neuron network with labels and clusters as node attributes, for Gephi."""
    from circuit_atlas.clustering.export import export_network
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    model, corpus = _atlas_key(opened, model_spec, corpora)
    counts = export_network(opened, model, corpus, path, fmt or path.rsplit(".", 1)[-1],
                            method, min_count)
    _console().print(f"[green]export[/] {path}: {counts['nodes']:,} nodes, "
                     f"{counts['edges']:,} edges")


# clustering ------------------------------------------------------------------------


@cli.command("cluster")
@lake_option
@click.option("--corpus", "corpora", multiple=True, required=True,
              help="Corpus of the edges table (repeat for one reduced from several).")
@click.option("--model", "model_spec", default="HuggingFaceTB/SmolLM2-135M-Instruct",
              show_default=True, help="Model whose edges table to cluster.")
@click.option("--method", "methods", multiple=True, default=("infomap",), show_default=True,
              type=click.Choice(["infomap", "leiden"]), help="Method; repeat for both.")
@click.option("--min-count", default=5, show_default=True,
              help="Keep edges seen at least this often (the count column).")
@click.option("--top-k", type=int, default=None,
              help="Keep each neuron's K strongest outgoing edges (default: all).")
@click.option("--weight", default="mean_abs_weight_sq", show_default=True,
              type=click.Choice(["mean_abs_weight_sq", "mean_abs_weight", "weight_abs_sum",
                                 "count", "graph_count"]), help="Link weight.")
@click.option("--include-embeddings", is_flag=True, help="Add embedding (token) nodes.")
@click.option("--include-logits", is_flag=True, help="Add logit (token) nodes.")
@click.option("--seed", default=42, show_default=True, help="Random seed (same seed, same result).")
@click.option("--two-level", is_flag=True, help="One level of modules, no hierarchy.")
@click.option("--trials", default=1, show_default=True, help="Infomap trials (best kept).")
@click.option("--markov-time", default=1.0, show_default=True, help="Infomap Markov time.")
@click.option("--flow-model", default="undirected", show_default=True,
              type=click.Choice(["undirected", "directed", "undirdir", "outdirdir", "rawdir"]),
              help="Infomap flow model (see circuit_atlas.clustering.methods for why).")
@click.option("--objective", default="modularity", show_default=True,
              type=click.Choice(["modularity", "CPM"]), help="Leiden objective.")
@click.option("--resolution", default=1.0, show_default=True, help="Leiden resolution.")
@click.option("--levels", default=2, show_default=True, help="Leiden levels (recursive).")
@click.option("--report-only", is_flag=True, help="Only print the comparison report.")
@json_option
@cluster_options(default="none")
def cluster_cmd(lake_path: str, corpora: tuple[str, ...], model_spec: str,
                methods: tuple[str, ...], min_count: int, top_k: int | None, weight: str,
                include_embeddings: bool, include_logits: bool, seed: int, two_level: bool,
                trials: int, markov_time: float, flow_model: str, objective: str,
                resolution: float, levels: int, report_only: bool, as_json: bool,
                **cluster: Any) -> None:
    """Cluster the edges table into circuits (Infomap multi-level, or Leiden) and write
    the cluster_assignments and clusters tables; prints a comparison of the methods."""
    from circuit_atlas.clustering.network import network_params
    from circuit_atlas.clustering.run import compare_methods
    from circuit_atlas.compute.names import model_name
    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.pipeline import cluster_tables, print_comparison

    opened = Lake(lake_path)
    console = _console()
    if report_only:
        report = compare_methods(opened, model_name(model_spec), corpus_key(corpora))
        if not as_json:
            print_comparison(report, console)
    else:
        net = network_params(min_count, top_k, weight, include_embeddings, include_logits)
        params = {"seed": seed, "two_level": two_level, "trials": trials,
                  "markov_time": markov_time, "flow_model": flow_model,
                  "objective": objective, "resolution": resolution, "levels": levels}
        report = cluster_tables(opened, model_spec, list(corpora), list(dict.fromkeys(methods)),
                                net, params, console if not as_json else _quiet(),
                                cluster=cluster)
    if as_json:
        click.echo(json.dumps(report, indent=1))


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


# doctor and demo -------------------------------------------------------------------


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """What this machine gives the pipeline, to paste into a bug report: Python, torch
    and its devices, the CPU and the dtype --dtype auto picks per stage (measured),
    package versions, the model cache, SLURM and Chromium."""
    from circuit_atlas.doctor import diagnose, print_report

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_report(report, _console())



@cli.command()
@lake_option
@click.option("--limit", type=int, default=None, show_default="24",
              help="The first N prompts of each corpus (by id); the projections cover the "
                   "neurons their graphs reach.")
@click.option("--full", is_flag=True,
              help="Every prompt (40 per corpus) and the projections of every neuron.")
def demo(lake_path: str, limit: int, full: bool) -> None:
    """Run the pipeline on the built-in demo corpora (medical vs. general prompts)
    with the embedded SmolLM2 model on the CPU, and print the time of each stage."""
    from circuit_atlas.demo import DEMO_PROMPTS, run_demo

    run_demo(lake_path, _console(), limit=DEMO_PROMPTS if limit is None else limit, full=full)


def main() -> None:
    cli(prog_name="circuit-atlas")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
