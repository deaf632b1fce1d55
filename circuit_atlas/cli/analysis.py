"""cooccurrence, specificity, roles and profile: what the reduced tables say."""

from __future__ import annotations

import json
from typing import Any

import click

from circuit_atlas.analysis.params import CooccurrenceParams, RolesParams, SpecificityParams
from circuit_atlas.cli import cli, display
from circuit_atlas.cli.options import (
    cluster_options,
    corpora_option,
    json_option,
    lake_option,
    model_option,
    params_options,
    take_cluster,
    take_params,
)


@cli.command()
@lake_option
@model_option
@corpora_option()
@params_options(CooccurrenceParams)
@cluster_options()
def cooccurrence(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Neurons that appear in the same graphs: the cooccurrence table (top-k per
    neuron, with joint count, Jaccard and normalised PMI), on a Dask cluster."""
    from circuit_atlas.analysis.cooccurrence import run_cooccurrence

    params = take_params(CooccurrenceParams, options)
    display.run_stage(run_cooccurrence, display.console(), lake_path, model=model,
                      corpora=corpora, params=params, cluster=take_cluster(options))


@cli.command()
@lake_option
@model_option
@corpora_option()
@params_options(SpecificityParams)
def specificity(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Domain specificity of every neuron (smoothed score and log odds with a 95%
    interval) from a joint reduce of the domain and baseline corpora."""
    from circuit_atlas.analysis.specificity import run_specificity

    display.run_stage(run_specificity, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(SpecificityParams, options))


@cli.command()
@lake_option
@model_option
@corpora_option()
@params_options(RolesParams)
def roles(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Circuit role of every neuron with edges (feature detector, relay, integrator,
    output formatter, inhibitor, other): the roles table."""
    from circuit_atlas.analysis.roles import run_roles

    display.run_stage(run_roles, display.console(), lake_path, model=model, corpora=corpora,
                      params=take_params(RolesParams, options))


@cli.command()
@click.argument("neuron")
@lake_option
@model_option
@corpora_option()
@click.option("--top", default=10, show_default=True, help="Rows per section.")
@json_option
def profile(neuron: str, lake_path: str, model: str, corpora: tuple[str, ...], top: int,
            as_json: bool) -> None:
    """Everything the lake knows about one neuron (L12/N345 or 12:345)."""
    from circuit_atlas.analysis.profile import neuron_profile
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.neurons import parse_neuron
    from circuit_atlas.names import model_name

    layer, number = parse_neuron(neuron)
    opened, name = Lake(lake_path), model_name(model)
    found = neuron_profile(opened, name, layer, number, opened.reduced_corpus(name, corpora),
                           top, optional_tokenizer(model))
    if as_json:
        click.echo(json.dumps(found, indent=1, default=str))
    else:
        display.print_profile(found, display.console())
