"""doctor and demo: what this machine gives the pipeline, and the pipeline end to end."""

from __future__ import annotations

import json

import click

from circuit_atlas.cli import cli, display
from circuit_atlas.cli.options import json_option, lake_option


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
        print_report(report, display.console())



@cli.command()
@lake_option
@click.option("--limit", type=int, default=None, show_default="24",
              help="The first N prompts of each corpus (by id); the projections cover the "
                   "neurons their graphs reach.")
@click.option("--full", is_flag=True,
              help="Every prompt (40 per corpus) and the projections of every neuron.")
@click.option("--label-neurons", type=int, default=None, show_default="1",
              help="Neurons of the last layer labelled (input and negative passes) and "
                   "scored by the embedded LLM.")
def demo(lake_path: str, limit: int, full: bool, label_neurons: int | None) -> None:
    """Run the pipeline on the built-in demo corpora (medical vs. general prompts)
    with the embedded SmolLM2 model on the CPU, and print the time of each stage."""
    from circuit_atlas.demo import DEMO_PROMPTS, LABEL_SLICE, run_demo

    run_demo(lake_path, display.console(), limit=DEMO_PROMPTS if limit is None else limit,
             full=full, label_slice=LABEL_SLICE if label_neurons is None else label_neurons)
