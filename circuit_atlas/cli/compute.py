"""graphs, activations, negatives, export-graph, projections, wiring, effects: the
compute stages (torch)."""

from __future__ import annotations

import json
from typing import Any

import click

from circuit_atlas.cli import cli, display
from circuit_atlas.cli.options import (
    cluster_options,
    corpora_option,
    lake_option,
    model_option,
    params_options,
    take_cluster,
    take_params,
)
from circuit_atlas.compute.params import (
    ActivationsParams,
    EffectsParams,
    GraphsParams,
    NegativesParams,
    ProjectionsParams,
    WiringParams,
)


@cli.command()
@model_option
@corpora_option(required=True, help="Corpus whose prompts to attribute (repeatable).")
@lake_option
@params_options(GraphsParams)
@cluster_options(default="none")
def graphs(model: str, corpora: tuple[str, ...], lake_path: str, **options: Any) -> None:
    """Compute RelP attribution graphs for a corpus and commit them to the lake.

    Prompts whose graphs are already committed for the same model and parameters
    are skipped, so a killed run resumes where it stopped. With --cluster, one Dask
    task per shard (on SLURM with --device cuda, a GPU per job).
    """
    from circuit_atlas.compute.graphs import run_graphs

    params = take_params(GraphsParams, options)
    display.run_stage(run_graphs, display.console(), lake_path, model=model, corpora=corpora,
                      params=params, cluster=take_cluster(options))


@cli.command()
@model_option
@corpora_option(required=True, help="Corpus whose texts to run (repeatable).")
@lake_option
@params_options(ActivationsParams)
@cluster_options(default="none")
def activations(model: str, corpora: tuple[str, ...], lake_path: str, **options: Any) -> None:
    """Every neuron's exemplars (top and bottom contexts, with its activation at every
    token) and activation statistics over a corpus, forward passes only.

    Texts are cut into windows of --context tokens; shards of --shard-tokens are
    committed as they finish, so a killed run resumes, and a rerun after adding
    texts runs and merges only the new ones. Writes the exemplars, exemplar_windows,
    activation_stats, activation_samples (quantile samples) and token_activations
    (mean activation per token in context) tables of each corpus.
    """
    from circuit_atlas.compute.activation_run import run_activations

    params = take_params(ActivationsParams, options)
    display.run_stage(run_activations, display.console(), lake_path, model=model,
                      corpora=corpora, params=params, cluster=take_cluster(options))


@cli.command()
@model_option
@corpora_option()
@lake_option
@params_options(NegativesParams, names={"layers": "layer"})
def negatives(model: str, corpora: tuple[str, ...], lake_path: str, **options: Any) -> None:
    """Negatives for label scoring: held-out contexts on which each labelled neuron stays
    below a tenth of its largest activation, hard ones (the top contexts of its cluster
    mates or co-occurring neurons) and random ones, found by one forward pass over
    them. Writes the negatives table of each corpus of the atlas; run it after the
    activations stage and labeling, before circuit-atlas score."""
    from circuit_atlas.compute.negatives import run_negatives

    display.run_stage(run_negatives, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(NegativesParams, options))


@cli.command("export-graph")
@lake_option
@click.option("--corpus", required=True, help="Corpus of the prompt.")
@model_option
@click.option("--prompt-id", help="The prompt's id (see `prompts list`).")
@click.option("--text", help="Or the prompt's text.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (default: <corpus>-<prompt id>.json).")
def export_graph(lake_path: str, corpus: str, model: str, prompt_id: str | None,
                 text: str | None, output: str | None) -> None:
    """Write one stored graph as circuit-tracer / Neuronpedia graph JSON."""
    from circuit_atlas.compute.export import graph_json
    from circuit_atlas.compute.models import load_tokenizer, resolve
    from circuit_atlas.lake import Lake
    from circuit_atlas.lake import prompt_id as hash_prompt

    if (prompt_id is None) == (text is None):
        raise click.UsageError("give exactly one of --prompt-id and --text")
    pid = prompt_id or hash_prompt(text)
    tokenizer = load_tokenizer(model)
    data = graph_json(Lake(lake_path), resolve(model)[0], corpus, pid,
                      lambda t: tokenizer.decode([t]))
    output = output or f"{corpus}-{pid}.json"
    with open(output, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    click.echo(f"wrote {output}: {len(data['nodes'])} nodes, {len(data['links'])} links")


@cli.command()
@lake_option
@model_option
@params_options(ProjectionsParams, names={"layers": "layer"})
@corpora_option(help="Only the neurons of this corpus's reduced neurons table (repeat for a "
                     "joint reduce); default: every neuron.")
def projections(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Static output and input projections of every neuron onto the vocabulary: the
    projections table (corpus 'static')."""
    from circuit_atlas.compute.projections import run_projections

    display.run_stage(run_projections, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(ProjectionsParams, options))


@cli.command()
@lake_option
@model_option
@params_options(WiringParams)
@corpora_option(help="Corpus whose exemplar windows give the operating points and whose RelP "
                     "edges the wiring is compared with (repeat for a joint reduce); "
                     "default: the weight-only point, no comparison.")
def wiring(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Weight-based wiring of every neuron: its strongest excitatory and inhibitory
    upstream and downstream connections through the residual stream, from the weights
    alone (the wiring table; export duckdb --edges wiring makes an atlas of it)."""
    from circuit_atlas.compute.wiring import run_wiring

    display.run_stage(run_wiring, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(WiringParams, options))


@cli.command()
@lake_option
@model_option
@corpora_option(required=True, help="Corpus whose prompts to use (repeat; tables go under "
                                    "corpus=<a>+<b>).")
@params_options(EffectsParams, names={"neurons": "neuron"})
def effects(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Direct and indirect effects of neurons on the prompts' predictions: the effects
    and neuron_effects (direct effect ratio) tables."""
    from circuit_atlas.compute.effects import run_effects
    from circuit_atlas.errors import CircuitAtlasError
    from circuit_atlas.lake.neurons import parse_neuron

    params = take_params(EffectsParams, options)
    try:
        [parse_neuron(n) for n in params.neurons]
    except CircuitAtlasError as e:
        raise click.BadParameter(str(e), param_hint="--neuron") from e
    display.run_stage(run_effects, display.console(), lake_path, model=model, corpora=corpora,
                      params=params)
