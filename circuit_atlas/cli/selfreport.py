"""self-report: train the model to report its own neuron activations (its steps)."""

from __future__ import annotations

from typing import Any

from circuit_atlas.cli import cli, display
from circuit_atlas.cli.options import (
    corpora_option,
    lake_option,
    model_option,
    params_options,
    take_params,
)
from circuit_atlas.selfreport.params import ScanParams


@cli.group("self-report")
def self_report() -> None:
    """Self-report: which neurons the model could learn to report (scan), and more
    steps to come."""


@self_report.command()
@lake_option
@model_option
@corpora_option(help="The corpus whose activation statistics to rank (default: the only "
                     "one).")
@params_options(ScanParams)
def scan(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Rank every neuron as a self-report target (variance, selectivity, kurtosis, label
    score) into the selfreport_candidates table, and print the best."""
    from circuit_atlas.lake import Lake
    from circuit_atlas.names import model_name
    from circuit_atlas.selfreport.scanner import run_scan

    report = display.run_stage(run_scan, display.console(), lake_path, model=model,
                               corpora=corpora, params=take_params(ScanParams, options))
    table = Lake(lake_path).table("selfreport_candidates", model_name(model),
                                  report.corpus).sort("rank").head(10).collect()
    display.write_frame(table, "table", None, 10)
