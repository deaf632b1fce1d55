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
from circuit_atlas.selfreport.params import (
    DatasetParams,
    EvalParams,
    ScanParams,
    TrainParams,
    TransferParams,
)


@cli.group("self-report")
def self_report() -> None:
    """Self-report: which neurons the model could learn to report (scan), their data
    (dataset), the model trained to report one against baselines (train), a run
    evaluated again from its checkpoint (eval), and one head shared by many neurons
    scored on neurons it never trained on (transfer)."""


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


@self_report.command()
@lake_option
@model_option
@corpora_option(help="The corpus to take texts from.")
@params_options(DatasetParams)
def dataset(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Cut a corpus's texts into windows with one neuron's (or several neurons')
    activation at every token, split train / val / test by document, into the
    selfreport_dataset table."""
    from circuit_atlas.selfreport.dataset import run_dataset

    display.run_stage(run_dataset, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(DatasetParams, options))


@self_report.command()
@lake_option
@model_option
@corpora_option(help="The corpus of the dataset.")
@params_options(TrainParams)
def train(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Train a regression head (and with --unfreeze last:N the model's last blocks) to
    report the dataset's neuron; print its test R² beside the linear probe, the bag of
    tokens and the mean; write selfreport_metrics and selfreport_results."""
    from circuit_atlas.selfreport.trainer import run_train

    display.run_stage(run_train, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(TrainParams, options))


@self_report.command("eval")
@lake_option
@model_option
@corpora_option(help="The corpus of the dataset.")
@params_options(EvalParams)
def eval_(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Evaluate a training run again from its checkpoint (its best epoch, its own
    configuration) on the test split beside the baselines."""
    from circuit_atlas.selfreport.trainer import run_eval

    display.run_stage(run_eval, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(EvalParams, options))


@self_report.command()
@lake_option
@model_option
@corpora_option(help="The corpus of the dataset (of several neurons).")
@params_options(TransferParams)
def transfer(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Train one head, told which neuron by its input weights (or a learned vector), on
    some of the dataset's neurons; score it on every neuron's test documents, those it
    never trained on included, beside each neuron's own linear probe, its mean and the
    nearest trained neuron's probe; write selfreport_transfer."""
    from circuit_atlas.selfreport.transfer import run_transfer

    display.run_stage(run_transfer, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(TransferParams, options))
