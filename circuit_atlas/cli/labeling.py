"""label, score, serve, labels import and browse: neuron labels from an LLM, their scores,
an embedded LLM server, labels from a file, on screen."""

from __future__ import annotations

from typing import Any

import click

from circuit_atlas.cli import Group, cli, display
from circuit_atlas.cli.options import (
    corpora_option,
    lake_option,
    model_option,
    params_options,
    take_params,
)
from circuit_atlas.labeling.params import LabelParams, ScoreParams, ServeParams


@cli.command()
@lake_option
@model_option
@corpora_option()
@params_options(LabelParams, names={"passes": "pass", "layers": "layer",
                                    "name_clusters": "clusters"})
def label(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Label every neuron with an LLM: the output pass (what it does; late layers first,
    showing its targets' labels), the input pass (what drives its activation up; early
    layers first, showing its sources' labels) and the negative pass (what drives it
    most negative, where that side is strong), then name the clusters. Resumable: a
    rerun asks only what is missing or failed."""
    from circuit_atlas.labeling.run import run_labels

    display.run_stage(run_labels, display.console(), lake_path, model=model, corpora=corpora,
                      params=take_params(LabelParams, options))


@cli.command()
@lake_option
@model_option
@corpora_option()
@params_options(ScoreParams, names={"scorers": "scorer", "passes": "pass", "layers": "layer"})
def score(lake_path: str, model: str, corpora: tuple[str, ...], **options: Any) -> None:
    """Score every label. Input, negative and prior labels on held-out contexts the
    labeler never saw (a negative label on the neuron's most negative ones): detection
    (activating contexts vs. random and hard negatives; balanced accuracy), fuzzing
    (correctly marked tokens vs. shuffled marks) and simulation (per-token activations
    predicted from the label; Pearson's r). Output labels against the causal battery:
    intervention (which token set its boost raises). Each asked of an OpenAI-compatible
    scorer LLM. Writes the label_scores table; resumable. Run circuit-atlas negatives
    first for hard negatives, and circuit-atlas intervene for the intervention check."""
    from circuit_atlas.labeling.scoring import run_label_scores

    display.run_stage(run_label_scores, display.console(), lake_path, model=model,
                      corpora=corpora, params=take_params(ScoreParams, options))


@cli.command()
@model_option
@params_options(ServeParams)
def serve(model: str, **options: Any) -> None:
    """An OpenAI-compatible chat-completions server over a local model (default: the
    embedded SmolLM2-135M-Instruct): JSON-schema replies by grammar-constrained
    decoding, logprobs, concurrent requests decoded in batches. Point label and score
    at it with --base-url http://127.0.0.1:8000/v1."""
    from circuit_atlas.labeling.serve import Server, load_engine

    params = take_params(ServeParams, options)
    console = display.console()
    with console.status(f"loading {model} ..."):
        engine = load_engine(model, params.device, params.dtype, params.max_batch)
    server = Server(engine, params.host, params.port)
    console.print(f"[green]serving[/] {engine.name} at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")


@cli.group(cls=Group)
def report() -> None:
    """Reports as plots and an HTML page."""


@report.command("labels")
@lake_option
@model_option
@corpora_option()
@click.option("-o", "--output", default="label-report", show_default=True,
              type=click.Path(file_okay=False), help="Folder for index.html and the plots.")
def report_labels(lake_path: str, model: str, corpora: tuple[str, ...], output: str) -> None:
    """How far the labels hold: each scorer's score distribution, the mean per layer and
    per label type, and the labeler's own interpretability rating against the measured
    scores (calibration), from the label_scores table."""
    from circuit_atlas.labeling.report import scored_labels, write_report
    from circuit_atlas.lake import Lake
    from circuit_atlas.names import model_name

    opened, name = Lake(lake_path), model_name(model)
    corpus = opened.reduced_corpus(name, corpora)
    page = write_report(scored_labels(opened, name, corpus), output,
                        f"Label scores: {name}, {corpus}")
    display.console().print(f"[green]report[/] {page}", soft_wrap=True)


@cli.group(cls=Group)
def labels() -> None:
    """Neuron labels: import the ones you have."""


@labels.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@lake_option
@model_option
@corpora_option()
@click.option("--pass", "pass_", default="prior", show_default=True,
              type=click.Choice(["prior", "output", "input"]),
              help="What the labels describe; prior: evidence for the output pass.")
def labels_import(file: str, lake_path: str, model: str, corpora: tuple[str, ...],
                  pass_: str) -> None:
    """Add labels from CSV, JSON or JSONL (layer and neuron columns, or an id such as
    L12/N345; a label; optionally a description) to the labels table."""
    from circuit_atlas.labeling.label_files import import_labels
    from circuit_atlas.lake import Lake
    from circuit_atlas.names import model_name

    opened, name = Lake(lake_path), model_name(model)
    n = import_labels(opened, name, opened.reduced_corpus(name, corpora), file, pass_)
    display.console().print(f"[green]labels[/] {n:,} imported from {file} (pass {pass_})")


@cli.command()
@lake_option
@model_option
@corpora_option()
@click.option("--pass", "pass_", type=click.Choice(["output", "input", "negative"]),
              default=None,
              help="Only neurons with this pass's label.")
def browse(lake_path: str, model: str, corpora: tuple[str, ...], pass_: str | None) -> None:
    """Page through labelled neurons with their evidence (n/Enter next, b back,
    r random, g go to a neuron, l jump to a layer, q quit). No LLM calls."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.labeling.browse import browse as run
    from circuit_atlas.lake import Lake
    from circuit_atlas.names import model_name

    opened, name = Lake(lake_path), model_name(model)

    def read(prompt: str) -> str:
        return click.prompt(prompt, default="", show_default=False, prompt_suffix="")

    run(opened, name, opened.reduced_corpus(name, corpora), pass_, read, click.echo,
        optional_tokenizer(model))
