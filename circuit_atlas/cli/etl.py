"""reduce and slurm: the Dask reductions and the SLURM helpers."""

from __future__ import annotations

from typing import Any

import click

from circuit_atlas.cli import Group, cli, display
from circuit_atlas.cli.options import (
    cluster_options,
    corpora_option,
    lake_option,
    model_option,
    params_options,
    take_cluster,
    take_params,
)
from circuit_atlas.etl.params import ReduceParams


@cli.command()
@lake_option
@corpora_option(required=True, help="Corpus to reduce (repeat to reduce several into one "
                                    "table set, corpus=<a>+<b>).")
@model_option
@params_options(ReduceParams)
@cluster_options()
def reduce(lake_path: str, corpora: tuple[str, ...], model: str, **options: Any) -> None:
    """Reduce the committed graph shards into the edges, neurons, neuron_corpora and
    neuron_tokens tables. A rerun folds only the shards committed since."""
    from circuit_atlas.etl.reduce import run_reduce

    params = take_params(ReduceParams, options)
    display.run_stage(run_reduce, display.console(), lake_path, model=model, corpora=corpora,
                      params=params, cluster=take_cluster(options))


@cli.group(cls=Group)
def slurm() -> None:
    """SLURM helpers."""


@slurm.command("script")
@cluster_options(default="slurm")
@click.option("--gpus", default=0, show_default=True,
              help="GPUs per job (adds --gres=gpu:N and the worker resource GPU=N).")
def slurm_script(gpus: int, **options: Any) -> None:
    """Print the job script dask-jobqueue would submit for these settings (nothing
    is submitted), to check it before spending an allocation."""
    from circuit_atlas.etl.clusters import slurm_cluster

    with slurm_cluster(gpus=gpus, **take_cluster(options).slurm_overrides()) as sc:
        click.echo(sc.job_script())
