"""The labeling run: the passes in their order, layer by layer, then the clusters.

The official ``openai`` client talks to ``base_url`` (OpenAI, vLLM, Ollama, ...);
its own retries give exponential backoff on 429, 5xx and timeouts. Every reply is
asked for as structured output (a JSON schema) and validated; one that does not parse
or validate is asked once more, then recorded as a failure with the reason, never
stored as a label.

Resumable through the journal (``labeling.journal``): a rerun skips every neuron that
has an ok label for the same pass, labeler and prompt, and every cluster named from
the same prompt.

``batch=True`` sends a layer as one OpenAI Batch API job (half the price): the
requests go up as a JSONL file, the batch is polled, its output downloaded and
validated; a batch's id is journaled, so a resumed run polls it instead of paying
twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.batch import batch_layer
from circuit_atlas.labeling.client import LLMSettings, Tally, fan_out, label_request
from circuit_atlas.labeling.evidence import (
    Atlas,
    assemble,
    layer_evidence,
    layer_order,
    negative_side,
    priority,
)
from circuit_atlas.labeling.journal import Journal, fold_journals, journal_dir, label_row
from circuit_atlas.labeling.params import LabelParams
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import known_labels, latest_ok
from circuit_atlas.lake.neurons import neuron_label
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake


@dataclass
class LabelReport(Tally):
    pass_: str
    layers: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def cost(self, s: LLMSettings) -> float:
        factor = 0.5 if s.batch else 1.0
        return factor * (self.prompt_tokens * s.price_in
                         + self.completion_tokens * s.price_out) / 1e6


def label_lake(lake: Lake, model: str, corpus: str, pass_: str, settings: LLMSettings | None,
               layers: list[int] | None = None, per_layer: int | None = None,
               only_failed: bool = False, tokenizer: Any = None,
               on_progress: Callable[[int, int, int], None] | None = None,
               neurons: list[int] | None = None, order: str = "graphs",
               best_of: BestOf | None = None) -> LabelReport:
    """Label the neurons of (model, corpus) for ``pass_``, layer by layer in the pass's
    order. ``settings`` None: a dry run that writes every assembled prompt to the
    ``label_prompts`` table instead. ``per_layer``: only the N neurons of each layer
    that are in the most graphs (of ``neurons``, when given), or with ``order``
    "priority" the N of highest ``evidence.priority`` (strength times unlabelled
    neighbours), asked in that order. The negative pass asks only about neurons whose
    negative side is strong (``evidence.negative_side``). ``best_of``: ask several
    candidate labels per neuron and keep the best by a scorer (:class:`BestOf`)."""
    t0 = time.perf_counter()
    report = LabelReport(pass_)
    fold_journals(lake, model, corpus)
    atlas = Atlas.open(lake, model, corpus, tokenizer)
    sequence = [x for x in layer_order(pass_, atlas.n_layers) if layers is None or x in layers]
    dry_rows: list[dict[str, Any]] = []
    for layer in sequence:
        labels = known_labels(lake, model, corpus)
        chosen = atlas.neurons.filter(pl.col("layer") == layer)
        if neurons is not None:
            chosen = chosen.filter(pl.col("neuron").is_in(neurons))
        if pass_ == "negative":
            chosen = chosen.filter(pl.col("neuron").is_in(negative_side(atlas, layer)))
        if order == "priority":
            ranked = priority(atlas, layer, latest_ok(labels), pass_).join(
                chosen.select("neuron"), on="neuron", maintain_order="left")
        else:
            ranked = chosen.sort(["graph_count", "neuron"], descending=[True, False])
        chosen_all = (neurons is None and per_layer is None and order == "graphs"
                      and pass_ != "negative")
        ids = None if chosen_all else ranked["neuron"].to_list()[:per_layer]
        prompts = assemble(pass_, layer_evidence(atlas, pass_, layer, latest_ok(labels),
                                                 ids))
        if ids is not None:  # in the order chosen (priority: the most useful first)
            rank = {n: i for i, n in enumerate(ids)}
            prompts.sort(key=lambda p: rank[p[0]])
        report.layers.append(layer)
        if settings is None:
            dry_rows += [{"layer": layer, "neuron": n, "pass": pass_, "prompt_hash": h,
                          "system_message": m[0]["content"],
                          "user_message": m[1]["content"]}
                         for n, m, h in prompts]
            continue
        todo = _todo(prompts, labels, layer, pass_, settings.model, only_failed)
        report.skipped += len(prompts) - len(todo)
        if not todo:
            continue
        journal = Journal(lake, model, corpus)
        counter = itertools.count(1)

        def answered(item: tuple, parsed: dict[str, Any] | None, error: str | None,
                     layer=layer, journal=journal, todo=todo, counter=counter) -> None:
            neuron, _, phash = item
            journal.write(label_row(layer, neuron, pass_, settings.model, phash, parsed,
                                    error))
            report.answered(parsed is not None)
            if on_progress:
                on_progress(layer, next(counter), len(todo))

        def ask_all(items: list[tuple], answered=answered) -> None:
            asyncio.run(fan_out(settings, [(t, label_request(pass_, t[1],
                                                             settings.description_chars))
                                           for t in items], answered, report))

        if best_of is not None and best_of.samples > 1:
            best_of.run(lake, model, corpus, pass_, layer, todo, settings, report, tokenizer,
                        lambda d, t, layer=layer: on_progress and on_progress(layer, d, t))
            fold_journals(lake, model, corpus)
            continue
        try:
            if settings.batch:
                state = f"{journal_dir(lake, model, corpus)}/batch-{pass_}-L{layer}.json"
                batch_layer(settings, pass_, layer, todo, answered, ask_all, report, lake.fs,
                            state)
            else:
                ask_all(todo)
        finally:
            journal.close()
        fold_journals(lake, model, corpus)  # the next layer's prompts show these labels
    if settings is None:
        _write_prompts(lake, model, corpus, pass_, dry_rows)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class BestOf:
    """Best-of-N labeling: ``samples`` candidate labels per neuron, asked at
    ``temperature`` with a seed each, every distinct one scored by ``select_by`` on the
    neuron's held-out contexts (output labels: by the intervention check), the best
    kept as the label (status "ok"), the others recorded as status "candidate" with
    their scores in ``label_scores``; where ``select_by`` cannot judge a neuron (no
    negatives yet: ``negatives --every-neuron`` finds them before any label exists),
    the next scorer that can. Transluce keeps the best of many sampled descriptions by
    simulation the same way. The kept label's score by ``select_by`` is
    the best of N on the same contexts, so it is optimistic; the other scorers' figures
    of it are not. A neuron no scorer can judge (no held-out contexts, no boost in the
    battery) keeps its first candidate."""

    samples: int = 1
    select_by: str = "detection"
    temperature: float = 1.0
    sim_contexts: int = 5
    scored: int = 0  # candidates scored, over the run
    unjudged: int = 0  # neurons kept without a score

    def scorers(self, pass_: str) -> list[str]:
        """The scorers that pick among a neuron's candidates, in turn: ``select_by``,
        then (for a neuron it cannot judge, e.g. detection without negatives yet) the
        other activation scorers; output labels: the intervention check."""
        if pass_ == "output":
            return ["intervention"]
        return [self.select_by, *(s for s in ("simulation", "fuzzing", "detection")
                                  if s != self.select_by)]

    def run(self, lake: Lake, model: str, corpus: str, pass_: str, layer: int, todo: list,
            settings: LLMSettings, report: LabelReport, tokenizer: Any,
            on_progress: Callable[[int, int], Any]) -> None:
        from circuit_atlas.labeling.scoring import ScoresReport, score_labels

        replies: dict[int, list[tuple[dict[str, Any] | None, str | None]]] = {}
        asked = [((n, msgs, h, i), label_request(
            pass_, msgs, settings.description_chars,
            {"temperature": self.temperature, "seed": i}))
            for n, msgs, h in todo for i in range(self.samples)]
        counter = itertools.count(1)

        def answered(item: tuple, parsed: dict[str, Any] | None, error: str | None) -> None:
            replies.setdefault(item[0], []).append((item[3], parsed, error))
            on_progress(next(counter), len(asked))

        asyncio.run(fan_out(settings, asked, answered, report))
        hashes = {n: h for n, _, h in todo}
        candidates: dict[int, list[dict[str, Any]]] = {}
        for n, got in replies.items():
            seen: dict[str, dict[str, Any]] = {}
            for _, parsed, _ in sorted(got, key=lambda r: r[0]):
                if parsed is not None:
                    seen.setdefault(parsed["label"], parsed)
            candidates[n] = list(seen.values())
        rows = pl.DataFrame(
            [{"layer": layer, "neuron": n, "pass": pass_, "label": c["label"],
              "labeler": settings.model} for n, cs in candidates.items() for c in cs],
            schema={"layer": pl.Int16, "neuron": pl.Int32, "pass": pl.String,
                    "label": pl.String, "labeler": pl.String})
        scores_report = ScoresReport(corpus, settings.model)
        scores: dict[tuple, float | None] = {}  # (layer, neuron, pass, label): its score
        pending = rows
        for scorer in self.scorers(pass_):  # the next one where a scorer cannot judge
            if pending.is_empty():
                break
            got = score_labels(lake, model, corpus, settings, pending, (scorer,),
                               scores_report, tokenizer, self.sim_contexts)
            judged = {k[1] for k, v in got.items() if v.get(scorer) is not None}
            scores.update({k: v.get(scorer) for k, v in got.items() if k[1] in judged})
            pending = pending.filter(~pl.col("neuron").is_in(sorted(judged)))
        report.prompt_tokens += scores_report.prompt_tokens
        report.completion_tokens += scores_report.completion_tokens
        journal = Journal(lake, model, corpus)
        try:
            for n, cs in candidates.items():
                if not cs:  # every sample failed: the last reason
                    error = next(e for _, p, e in reversed(replies[n]) if e is not None)
                    journal.write(label_row(layer, n, pass_, settings.model, hashes[n], None,
                                            error))
                    report.answered(False)
                    continue
                got = [scores.get((layer, n, pass_, c["label"])) for c in cs]
                self.scored += sum(g is not None for g in got)
                self.unjudged += all(g is None for g in got)
                best = max(range(len(cs)), key=lambda i: (got[i] is not None,
                                                          got[i] or 0.0, -i))
                for i, c in enumerate(cs):
                    if i != best:
                        journal.write(label_row(layer, n, pass_, settings.model, hashes[n],
                                                c, None, "candidate"))
                journal.write(label_row(layer, n, pass_, settings.model, hashes[n], cs[best],
                                        None))
                report.answered(True)
        finally:
            journal.close()


def _todo(prompts, labels: pl.DataFrame | None, layer: int, pass_: str, labeler: str,
          only_failed: bool):
    if labels is None:
        return [] if only_failed else prompts
    mine = labels.filter((pl.col("layer") == layer) & (pl.col("pass") == pass_)
                         & (pl.col("labeler") == labeler))
    ok = set(mine.filter(pl.col("status") == "ok").select("neuron", "prompt_hash").iter_rows())
    if only_failed:  # neurons whose latest answer failed, whatever their prompt is now
        latest = mine.sort("created_at").unique("neuron", keep="last")
        failed = set(latest.filter(pl.col("status") == "failed")["neuron"])
        return [p for p in prompts if p[0] in failed]
    return [p for p in prompts if (p[0], p[2]) not in ok]


def _write_prompts(lake: Lake, model: str, corpus: str, pass_: str,
                   rows: list[dict[str, Any]]) -> None:
    from circuit_atlas.lake.derived import add_part

    df = pl.DataFrame(rows, schema={"layer": pl.Int16, "neuron": pl.Int32, "pass": pl.String,
                                    "prompt_hash": pl.String, "system_message": pl.String,
                                    "user_message": pl.String})
    add_part(lake, model, corpus, "label_prompts", f"{pass_}.parquet", df.to_arrow(),
             {"model": model})


def label_clusters(lake: Lake, model: str, corpus: str, settings: LLMSettings,
                   method: str = "infomap", max_level: int = 2, min_labelled: int = 3,
                   members: int = 30) -> LabelReport:
    """Name each cluster (levels 1..``max_level``) with at least ``min_labelled``
    output-labelled members from up to ``members`` of their labels (by flow), as
    Transluce groups neuron descriptions; clusters already named from the same prompt
    are skipped."""
    from circuit_atlas.labeling.evidence import prompt_hash
    from circuit_atlas.labeling.templates import cluster_messages

    t0 = time.perf_counter()
    report = LabelReport("cluster")
    fold_journals(lake, model, corpus, "cluster_labels")  # what a killed run recorded
    labels = latest_ok(known_labels(lake, model, corpus))
    if labels is None or labels.filter(pl.col("pass") == "output").is_empty():
        raise CircuitAtlasError("no output labels yet: run circuit-atlas label --pass output")
    if lake.table_manifest(model, corpus, "cluster_assignments") is None:
        raise CircuitAtlasError("no clustering yet: run circuit-atlas cluster")
    assigned = lake.table("cluster_assignments", model, corpus).filter(
        pl.col("method") == method).collect().join(
        labels.filter(pl.col("pass") == "output").select("layer", "neuron", "label"),
        on=["layer", "neuron"])
    todo = []
    done = set()
    if lake.table_manifest(model, corpus, "cluster_labels") is not None:
        done = set(lake.table("cluster_labels", model, corpus).filter(
            (pl.col("status") == "ok") & (pl.col("labeler") == settings.model)).select(
            "cluster_path", "prompt_hash").collect().iter_rows())
    for level in range(1, max_level + 1):
        with_prefix = assigned.filter(pl.col("depth") >= level).with_columns(
            prefix=pl.col("cluster_path").str.split(":").list.head(level).list.join(":"))
        for (path,), group in with_prefix.group_by("prefix", maintain_order=True):
            if len(group) < min_labelled:
                continue
            top = group.sort("flow", descending=True).head(members)
            msgs = cluster_messages(path, [(neuron_label(a, b), c) for a, b, c in zip(
                top["layer"], top["neuron"], top["label"], strict=True)])
            h = prompt_hash(msgs)
            if (path, h) in done:
                report.skipped += 1
                continue
            todo.append((path, msgs, h, len(group)))

    journal = Journal(lake, model, corpus, "cluster_labels")

    def answered(item: tuple, parsed: dict[str, Any] | None, error: str | None) -> None:
        path, _, h, n = item
        report.answered(parsed is not None)
        journal.write({"method": method, "cluster_path": path,
                       "label": parsed["label"] if parsed else None,
                       "coherence": parsed["coherence"] if parsed else None,
                       "members_labelled": n, "labeler": settings.model, "prompt_hash": h,
                       "status": "ok" if parsed else "failed", "error": error,
                       "created_at": dt.datetime.now(dt.UTC).isoformat(
                           timespec="microseconds")})

    try:
        if todo:
            asyncio.run(fan_out(settings, [(t, label_request("cluster", t[1])) for t in todo],
                                answered, report))
    finally:
        journal.close()
    fold_journals(lake, model, corpus, "cluster_labels")
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class LabelsReport(Report):
    corpus: str
    passes: list[LabelReport]
    clusters: LabelReport | None
    settings: LLMSettings | None
    best_of: BestOf | None = None

    def __str__(self) -> str:
        lines = []
        s = self.settings
        for r in self.passes:
            if s is None:
                lines.append(f"label prompts {r.pass_}: layers {r.layers[0]}..{r.layers[-1]} "
                             "assembled into the label_prompts table (dry run, no LLM)")
                continue
            lines.append(
                f"labels {r.pass_}: {r.ok:,} ok, {r.failed:,} failed, {r.skipped:,} already "
                f"labelled; {r.prompt_tokens:,} prompt + {r.completion_tokens:,} completion "
                f"tokens, ${r.cost(s):.4f}{' (batch price)' if s.batch else ''}; "
                f"{r.seconds:.1f} s")
        if self.best_of is not None and s is not None:
            b = self.best_of
            lines.append(f"best of {b.samples}: {b.scored:,} candidate label(s) scored "
                         f"(by {b.select_by} where it could judge; output labels by the "
                         f"intervention check); {b.unjudged:,} neuron(s) kept their first "
                         "candidate, no scorer could judge them")
        if self.clusters is not None and s is not None:
            c = self.clusters
            lines.append(f"cluster labels: {c.ok:,} ok, {c.failed:,} failed, {c.skipped:,} "
                         f"already named; ${c.cost(s):.4f}")
        return "\n".join(lines)


def run_labels(lake, *, model, corpora=None, params: LabelParams | None = None,
               cluster=None, progress: Progress | None = None) -> LabelsReport:
    """Label every neuron of a reduce (``corpora``: default the only one) with an LLM:
    the output pass (what it does; late layers first, showing its targets' labels),
    the input pass (what drives its activation up; early layers first, showing its
    sources' labels) and the negative pass (what drives it most negative, for the
    neurons whose negative side is strong; needs the activation statistics), then name
    the clusters. Resumable: a rerun asks only what is
    missing or failed. ``params.dry_run`` assembles the prompts without an LLM."""
    from circuit_atlas.analysis.exemplars import has_table
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or LabelParams()
    progress = progress or Progress()
    spec, model = model, model_name(model)
    corpus = lake.reduced_corpus(model, as_corpora(corpora))
    settings, best_of = params.settings(), params.best_of()
    tokenizer = optional_tokenizer(spec)
    reports = []
    for pass_ in params.passes:
        if pass_ == "negative" and not has_table(lake, model, corpus, "activation_stats"):
            progress.message("negative pass skipped: it reads the activation statistics "
                             "(circuit-atlas activations)")
            continue
        task = f"{'prompts' if settings is None else 'label'} {pass_}"
        reports.append(label_lake(
            lake, model, corpus, pass_, settings, layers=list(params.layers) or None,
            per_layer=params.per_layer, only_failed=params.only_failed, tokenizer=tokenizer,
            order=params.order, best_of=best_of,
            on_progress=lambda layer, d, t, task=task: progress.update(
                f"{task} L{layer}", d, t)))
    named = None
    if settings is not None and params.name_clusters and lake.table_manifest(
            model, corpus, "cluster_assignments") is not None:
        known = latest_ok(known_labels(lake, model, corpus))
        if known is not None and not known.filter(pl.col("pass") == "output").is_empty():
            progress.update("naming the clusters", 0, None)
            named = label_clusters(lake, model, corpus, settings, params.cluster_method)
        else:  # an input-only run: clusters are named from output labels
            progress.message("clusters not named: no output labels yet (--pass output)")
    return LabelsReport(corpus, reports, named, settings, best_of)
