"""The scoring run: every label asked of each scorer that applies to it (input,
negative and prior labels: the activation scorers; output labels: the intervention
check), layer by layer, each answer journaled the moment it arrives
(``labeling.journal``) and folded into the ``label_scores`` table. A rerun asks only
what has no ok score for the same label, scorer, scorer model and prompt; a label the
scorer cannot be asked about (no held-out positives or negatives) is counted, not
asked."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.client import LLMSettings, Tally, fan_out
from circuit_atlas.labeling.contexts import neuron_contexts
from circuit_atlas.labeling.evidence import prompt_hash
from circuit_atlas.labeling.journal import Journal, fold_journals
from circuit_atlas.labeling.params import ScoreParams
from circuit_atlas.labeling.scorers import (
    ACTIVATION_SCORERS,
    CANDIDATES,
    EFFECT_SCORERS,
    SCORERS,
    SIM_CONTEXTS,
    Effect,
    Trial,
    rounded,
    trials,
)
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import known_labels, latest_ok, polarity
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

TABLE = "label_scores"


@dataclass
class ScoresReport(Report, Tally):
    corpus: str
    scorer_model: str
    labels: int = 0
    unscorable: int = 0
    seconds: float = 0.0
    negatives: bool = False
    scores: dict[str, list[float]] = field(default_factory=dict)
    price_in: float = 0.0
    price_out: float = 0.0

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out
                ) / 1e6

    def mean(self, scorer: str) -> float | None:
        got = self.scores.get(scorer) or []
        return sum(got) / len(got) if got else None

    def __str__(self) -> str:
        means = ", ".join(f"{s} {m:.3f}" for s in SCORERS
                          if (m := self.mean(s)) is not None)
        lines = [f"label scores {self.corpus} by {self.scorer_model}: {self.labels:,} "
                 f"label(s); {self.ok:,} ok, {self.failed:,} failed, {self.skipped:,} already "
                 f"scored, {self.unscorable:,} without the contexts or battery a scorer needs; "
                 f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion "
                 f"tokens, ${self.cost:.4f}; {self.seconds:.1f} s"]
        if means:
            lines.append(f"mean score of this run: {means} (detection and fuzzing: balanced "
                         "accuracy, 0.5 is chance; simulation: Pearson's r; intervention: "
                         f"accuracy, {1 / CANDIDATES:.2f} is chance)")
        if not self.negatives:
            lines.append("no negatives table: detection used the near-zero quantile samples "
                         "only, and no hard negatives (circuit-atlas negatives adds them)")
        return "\n".join(lines)


def labels_to_score(lake: Lake, model: str, corpus: str, passes: tuple[str, ...],
                    labeler: str | None, layers: list[int] | None) -> pl.DataFrame:
    """The newest ok label of each neuron and pass in ``passes`` (of ``labeler``)."""
    labels = known_labels(lake, model, corpus)
    if labels is None:
        raise CircuitAtlasError(f"no labels in {corpus!r} yet: run circuit-atlas label "
                                "(or labels import)")
    if labeler is not None:
        labels = labels.filter(pl.col("labeler") == labeler)
    got = latest_ok(labels).filter(pl.col("pass").is_in(list(passes)))
    if layers:
        got = got.filter(pl.col("layer").is_in(layers))
    return got.select("layer", "neuron", "pass", "label", "labeler").sort(
        "layer", "neuron", "pass")


def _done(lake: Lake, model: str, corpus: str, scorer_model: str) -> set[tuple]:
    if lake.table_manifest(model, corpus, TABLE) is None:
        return set()
    return set(lake.table(TABLE, model, corpus).filter(
        (pl.col("status") == "ok") & (pl.col("scorer_model") == scorer_model)).select(
        "layer", "neuron", "pass", "scorer", "prompt_hash").collect().iter_rows())


DECOY_NEURONS = 8  # other neurons' output projections offered as decoys, at most


def boost_evidence(lake: Lake, model: str, corpus: str, wanted: pl.DataFrame,
                   decode: Callable[[list[int]], list[str]]) -> dict[tuple[int, int], Effect]:
    """The intervention check's evidence for the (layer, neuron) rows of ``wanted``: the
    tokens each one's boost raised in the causal battery, and decoys: what the other
    neurons' boosts raised, then (where the battery measured fewer than it needs) the
    top promoted tokens of other neurons of its layer (the projections table)."""
    from circuit_atlas.lake.causal import RAISED, boost_tokens
    from circuit_atlas.lake.schemas import STATIC_CORPUS

    boosts = boost_tokens(lake, model, corpus)
    if boosts is None or wanted.is_empty():
        return {}
    raised = {(r[0], r[1]): decode(r[2]) for r in boosts.select(
        "layer", "neuron", "tokens").iter_rows()}
    projections = lake.optional_table("projections", model, STATIC_CORPUS)
    out = {}
    for layer, neuron in wanted.select("layer", "neuron").unique().iter_rows():
        mine = raised.get((layer, neuron))
        if mine is None:
            continue
        decoys = [t for k, t in raised.items() if k != (layer, neuron)]
        if len(decoys) < CANDIDATES - 1 and projections is not None:
            others = (projections.filter((pl.col("layer") == layer) & (pl.col("neuron") != neuron)
                                         & (pl.col("kind") == "output") & (pl.col("sign") == 1)
                                         & (pl.col("rank") < RAISED))
                      .sort("neuron", "rank").collect())
            for _, group in list(others.group_by("neuron", maintain_order=True))[:DECOY_NEURONS]:
                decoys.append(group["token"].to_list())
        out[(layer, neuron)] = Effect(mine, decoys)
    return out


def score_row(key: tuple, trial: Trial, scorer_model: str, phash: str,
              answer: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    layer, neuron, pass_, label, labeler = key
    score, metrics = rounded(answer) if answer is not None else (None, None)
    return {"layer": layer, "neuron": neuron, "pass": pass_, "polarity": polarity(pass_),
            "label": label,
            "labeler": labeler, "scorer": trial.scorer, "scorer_model": scorer_model,
            "score": score, "metrics": metrics, "positives": trial.positives,
            "negatives": trial.negatives, "hard_negatives": trial.hard,
            "prompt_hash": phash, "status": "ok" if answer is not None else "failed",
            "error": error, "created_at": dt.datetime.now(dt.UTC).isoformat(
                timespec="microseconds")}


def score_lake(lake: Lake, model: str, corpus: str, settings: LLMSettings,
               scorers: tuple[str, ...] = SCORERS,
               passes: tuple[str, ...] = ("input", "negative", "prior", "output"),
               labeler: str | None = None, layers: list[int] | None = None,
               tokenizer: Any = None, sim_contexts: int = SIM_CONTEXTS,
               on_progress: Callable[[int, int, int], None] | None = None) -> ScoresReport:
    """Score the labels of (model, corpus) with each of ``scorers``, layer by layer:
    input, negative and prior labels with the activation scorers (a negative label on
    the neuron's most negative contexts), output labels with the intervention check."""
    from circuit_atlas.analysis.exemplars import has_table

    t0 = time.perf_counter()
    report = ScoresReport(corpus, settings.model, price_in=settings.price_in,
                          price_out=settings.price_out)
    report.negatives = has_table(lake, model, corpus, "negatives")
    if not has_table(lake, model, corpus, "exemplars"):
        raise CircuitAtlasError(f"no exemplars for {corpus!r}: run circuit-atlas activations "
                                "first (labels are scored on held-out contexts)")
    fold_journals(lake, model, corpus, TABLE)  # what a killed run recorded
    labels = labels_to_score(lake, model, corpus, passes, labeler, layers)
    report.labels = len(labels)
    score_labels(lake, model, corpus, settings, labels, scorers, report, tokenizer,
                 sim_contexts, _done(lake, model, corpus, settings.model), on_progress)
    report.seconds = time.perf_counter() - t0
    return report


def score_labels(lake: Lake, model: str, corpus: str, settings: LLMSettings,
                 labels: pl.DataFrame, scorers: tuple[str, ...], report: ScoresReport,
                 tokenizer: Any = None, sim_contexts: int = SIM_CONTEXTS,
                 done: set[tuple] | None = None,
                 on_progress: Callable[[int, int, int], None] | None = None
                 ) -> dict[tuple, dict[str, float | None]]:
    """Ask each scorer that applies to each label of ``labels`` (layer, neuron, pass,
    label, labeler), skipping what ``done`` holds (layer, neuron, pass, scorer, prompt
    hash), journaling every answer into ``label_scores``. Returns {(layer, neuron,
    pass, label): {scorer: score}} of the answers of this call."""
    cache: dict[int, str] = {}
    got: dict[tuple, dict[str, float | None]] = {}
    done = done or set()

    def decode(ids: list[int]) -> list[str]:
        for t in ids:
            if t not in cache:
                cache[t] = tokenizer.decode([t]) if tokenizer is not None else f"#{t}"
        return [cache[t] for t in ids]

    effects = (boost_evidence(lake, model, corpus, labels.filter(pl.col("pass") == "output"),
                              decode) if set(scorers) & set(EFFECT_SCORERS) else {})
    for (layer,), group in labels.group_by("layer", maintain_order=True):
        by_sign: dict[int, set[int]] = {}
        for neuron, pass_ in group.select("neuron", "pass").iter_rows():
            by_sign.setdefault(polarity(pass_), set()).add(neuron)
        signed = {sign: neuron_contexts(lake, model, corpus, layer, sorted(ns), sign)
                  for sign, ns in by_sign.items()}
        todo: list[tuple[tuple, Trial, str]] = []
        for row in group.select("layer", "neuron", "pass", "label", "labeler").iter_rows():
            mine = tuple(s for s in scorers if s in (
                EFFECT_SCORERS if row[2] == "output" else ACTIVATION_SCORERS))
            contexts, maxima = signed[polarity(row[2])]
            made = trials(row[3], contexts.get(row[1], []), decode, maxima.get(row[1], 0.0),
                          mine, row[:4], sim_contexts, effects.get((row[0], row[1])))
            report.unscorable += len(mine) - len(made)
            for trial in made:
                phash = prompt_hash(trial.messages)
                if (row[0], row[1], row[2], trial.scorer, phash) in done:
                    report.skipped += 1
                else:
                    todo.append((row, trial, phash))
        if not todo:
            continue
        journal = Journal(lake, model, corpus, TABLE)
        count = 0

        def answered(item: tuple, answer: Any, error: str | None, journal=journal,
                     todo=todo, layer=layer) -> None:
            nonlocal count
            key, trial, phash = item
            journal.write(score_row(key, trial, settings.model, phash, answer, error))
            report.answered(answer is not None)
            if answer is not None:
                got.setdefault(key[:4], {})[trial.scorer] = answer["score"]
                if answer["score"] is not None:
                    report.scores.setdefault(trial.scorer, []).append(answer["score"])
            count += 1
            if on_progress:
                on_progress(layer, count, len(todo))

        try:
            asyncio.run(fan_out(settings, [(t, t[1].request()) for t in todo], answered,
                                report))
        finally:
            journal.close()
        fold_journals(lake, model, corpus, TABLE)
    return got


def run_label_scores(lake, *, model, corpora=None, params: ScoreParams | None = None,
                     cluster=None, progress: Progress | None = None) -> ScoresReport:
    """Score the labels of an atlas (``corpora``: default the only reduced set) through
    an OpenAI-compatible endpoint: input, negative and prior labels on held-out
    contexts (detection, fuzzing, simulation), output labels against the causal battery's boosts
    (intervention); the ``label_scores`` table. Resumable: a rerun asks only what has
    no ok score."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or ScoreParams()
    progress = progress or Progress()
    spec, model = model, model_name(model)
    corpus = lake.reduced_corpus(model, as_corpora(corpora))
    return score_lake(lake, model, corpus, params.settings(), params.scorers, params.passes,
                      params.labeler, list(params.layers) or None, optional_tokenizer(spec),
                      params.sim_contexts,
                      lambda layer, d, t: progress.update(f"scores L{layer}", d, t))
