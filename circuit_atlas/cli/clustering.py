"""cluster: circuits from the edges table (Infomap, Leiden)."""

from __future__ import annotations

import json
from typing import Any

import click

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
from circuit_atlas.clustering.params import ClusteringParams


@cli.command("cluster")
@lake_option
@corpora_option()
@model_option
@params_options(ClusteringParams, names={"methods": "method"})
@click.option("--report-only", is_flag=True, help="Only print the comparison report.")
@json_option
@cluster_options(default="none")
def cluster_cmd(lake_path: str, corpora: tuple[str, ...], model: str, report_only: bool,
                as_json: bool, **options: Any) -> None:
    """Cluster the edges table into circuits (Infomap multi-level, or Leiden) and write
    the cluster_assignments and clusters tables; prints a comparison of the methods."""
    from circuit_atlas.clustering.run import compare_methods, run_clustering
    from circuit_atlas.lake import Lake
    from circuit_atlas.names import model_name

    params = take_params(ClusteringParams, options)
    out = display.console(quiet=as_json)
    if report_only:
        opened, name = Lake(lake_path), model_name(model)
        report = compare_methods(opened, name, opened.reduced_corpus(name, corpora))
    else:
        report = display.run_stage(run_clustering, out, lake_path, model=model,
                                   corpora=corpora, params=params,
                                   cluster=take_cluster(options)).comparison
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        display.print_comparison(report, out)
