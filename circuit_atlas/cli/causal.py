"""intervene and steer: the causal battery (torch)."""

from __future__ import annotations

import json
from typing import Any

import click

from circuit_atlas.cli import cli, display
from circuit_atlas.cli.options import (
    corpora_option,
    json_option,
    lake_option,
    model_option,
    params_options,
    take_params,
)
from circuit_atlas.compute.params import InterventionsParams, SteerParams

UNIT_NAMES = {"neurons": "neuron", "modules": "module"}


@cli.command()
@lake_option
@model_option
@corpora_option(required=True, help="Corpus whose prompts to use (repeat; tables go under "
                                    "corpus=<a>+<b>).")
@params_options(InterventionsParams, names=UNIT_NAMES)
def intervene(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """The causal battery: ablate, boost and patch neurons and whole cluster modules on
    every prompt, and measure the next-token distribution. Writes the interventions,
    neuron_causal (necessity, sufficiency, specificity per unit) and, with two modules
    or more, circuit_effects tables. A prompt record's "target", "distractor" and
    "counterfactual" fields are used where present."""
    from circuit_atlas.compute.battery import run_interventions

    display.run_stage(run_interventions, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(InterventionsParams, options))


@cli.command()
@click.argument("text")
@lake_option
@model_option
@corpora_option(help="Corpus whose modules and activation statistics to read (default: "
                     "the only reduced set).")
@params_options(SteerParams, names=UNIT_NAMES)
@json_option
def steer(text: str, lake_path: str, model: str, corpora: tuple[str, ...], as_json: bool,
          **options: Any) -> None:
    """Generate from TEXT greedily with a neuron or module held under an intervention at
    every step, printed beside the clean continuation."""
    from rich.table import Table

    from circuit_atlas.compute.steer import run_steer

    params = take_params(SteerParams, options)
    out = display.console()
    with display.stage_progress(out) as bars:
        result = run_steer(lake_path, model=model, text=text, corpora=corpora, params=params,
                           progress=bars)
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    table = Table(title=f"{result.unit}, {result.intervention}: {text!r}", show_lines=True)
    table.add_column("clean")
    table.add_column(f"steered ({result.intervention})")
    table.add_row(result.clean, result.steered)
    out.print(table)
