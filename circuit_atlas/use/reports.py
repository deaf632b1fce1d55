"""``export reports``: one self-contained HTML page per neuron, and an index to search
them.

A page shows everything the lake holds for the neuron (``analysis.profile``): its labels
by pass with their scores, the activation statistics and histogram, the top and bottom
exemplars with the activating tokens marked, the projections, the upstream and
downstream neurons with their labels, the co-occurring ones, its cluster with the other
members, effects, role, specificity, the causal battery's results and the newest
investigation (its verdict, hypotheses and every experiment). Neighbours and
cluster members that have a page of their own are links. ``index.html`` lists every
page with search and filters (layer, label type, score, cluster, investigated) and
the investigation's verdict.

Like ``export html``, the pages are templates (``report_page.html`` and
``report_index.html`` beside this module: plain DOM, no library, no network at view
time) with the data inlined as JSON.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import neuron_label
from circuit_atlas.stage import Report

MEMBERS = 12  # other members of its cluster shown on a page, by flow


def page_name(layer: int, neuron: int) -> str:
    return f"L{layer}-N{neuron}.html"


def choose_neurons(lake: Lake, model: str, corpus: str, neurons: list[tuple[int, int]],
                   top: int, labelled: bool) -> list[tuple[int, int]]:
    """The neurons to write pages for: ``neurons``, the ``top`` in the most graphs, and
    with ``labelled`` every neuron with an ok label; in (layer, neuron) order."""
    chosen = set(neurons)
    table = lake.table("neurons", model, corpus)
    if top:
        chosen |= set(table.sort(["graph_count", "layer", "neuron"],
                                 descending=[True, False, False]).head(top)
                      .select("layer", "neuron").collect().iter_rows())
    if labelled:
        from circuit_atlas.lake.labels import known_labels, latest_ok

        labels = latest_ok(known_labels(lake, model, corpus))
        if labels is not None:
            chosen |= set(labels.select("layer", "neuron").iter_rows())
    known = set(table.select("layer", "neuron").collect().iter_rows())
    missing = sorted(chosen - known)
    if missing:
        raise CircuitAtlasError(f"{neuron_label(*missing[0])} is in no graph of {corpus!r}")
    return sorted(chosen)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _histogram(lake: Lake, model: str, corpus: str, layer: int, neuron: int
               ) -> dict[str, Any] | None:
    """The neuron's activation histogram over every corpus of ``corpus`` (the bins of
    the activation statistics, trimmed to those it reaches)."""
    from circuit_atlas.analysis.exemplars import corpora_of

    total, edges = None, None
    for c in corpora_of(corpus):
        t = lake.optional_table("activation_stats", model, c)
        if t is None:
            continue
        edges = lake.table_manifest(model, c, "activation_stats")["inputs"]["bin_edges"]
        rows = t.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron)).select(
            "hist").collect()
        if len(rows):
            h = rows["hist"][0].to_list()
            total = h if total is None else [a + b for a, b in zip(total, h, strict=True)]
    if total is None or not any(total):
        return None
    nonzero = [i for i, n in enumerate(total) if n]
    lo, hi = nonzero[0], nonzero[-1] + 1
    # bin i counts values in [edges[i-1], edges[i]); bin 0 below the first edge
    bounds = [None, *edges, None]
    return {"counts": total[lo:hi], "lower": bounds[lo:hi], "upper": bounds[lo + 1:hi + 1]}


def page_data(lake: Lake, model: str, corpus: str, layer: int, neuron: int,
              pages: set[tuple[int, int]], labels: dict[tuple[int, int], dict[str, str]],
              method: str, tokenizer: Any = None) -> dict[str, Any]:
    """What one neuron's page shows, JSON-ready: its profile, its newest ok label per
    pass with scores, its histogram, its cluster's other members, and for every node it
    names, the page to link to and the label to show beside it."""
    from circuit_atlas.analysis.profile import neuron_profile
    from circuit_atlas.lake.neurons import parse_neuron

    profile = neuron_profile(lake, model, layer, neuron, corpus, tokenizer=tokenizer)
    profile.pop("wiring", None)  # the page has no view of it yet (profile shows it)
    mine = [r for r in profile.pop("labels", []) if r["status"] == "ok"]
    newest: dict[str, dict[str, Any]] = {}
    for r in sorted(mine, key=lambda r: r["created_at"]):
        newest[r["pass"]] = r
    members = []
    assigned = lake.optional_table("cluster_assignments", model, corpus)
    cluster = next((c for c in profile.get("clusters", []) if c["method"] == method), None)
    if assigned is not None and cluster is not None:
        rows = assigned.filter((pl.col("method") == method)
                               & (pl.col("cluster_path") == cluster["cluster_path"])
                               & ((pl.col("layer") != layer) | (pl.col("neuron") != neuron))
                               ).sort("flow", descending=True).head(MEMBERS).collect()
        members = [{"node": neuron_label(a, b), "flow": f} for a, b, f in
                   rows.select("layer", "neuron", "flow").iter_rows()]
    nodes = {x["node"] for s in ("upstream", "downstream", "cooccurring")
             for x in profile.get(s, [])} | {m["node"] for m in members}
    links, shown = {}, {}
    for node in nodes:
        try:
            key = parse_neuron(node)
        except CircuitAtlasError:  # an embedding or logit node
            continue
        if key in pages:
            links[node] = page_name(*key)
        if key in labels:
            shown[node] = labels[key]
    investigation = profile.pop("investigation", None)
    return _jsonable({"profile": profile, "labels": newest, "method": method,
                      "investigation": investigation,
                      "cluster": cluster, "members": members, "links": links,
                      "node_labels": shown,
                      "histogram": _histogram(lake, model, corpus, layer, neuron)})


def index_row(data: dict[str, Any]) -> dict[str, Any]:
    p, labels = data["profile"], data["labels"]
    scores = {}
    for r in labels.values():
        for s in ("detection", "fuzzing", "simulation", "intervention"):
            if r.get(s) is not None:
                scores[s] = max(scores.get(s, -1.0), r[s])
    first = labels.get("output") or labels.get("input") or labels.get("negative") or {}
    return {"id": p["id"], "file": page_name(p["layer"], p["neuron"]), "layer": p["layer"],
            "graphs": p["appearances"].get("graph_count"),
            "labels": {k: v["label"] for k, v in labels.items()},
            "type": first.get("type"), "scores": scores,
            "cluster": (data["cluster"] or {}).get("cluster_path"),
            "investigation": None if not data.get("investigation") else {
                k: data["investigation"][k] for k in ("verdict", "confidence", "status")}}


@dataclass
class ReportsReport(Report):
    out: str
    pages: int
    labelled: int

    def __str__(self) -> str:
        return (f"reports: {self.pages:,} neuron page(s), {self.labelled:,} with labels, and "
                f"{os.path.join(self.out, 'index.html')}")


def write_reports(lake: Lake, model: str, corpus: str, out: str,
                  neurons: list[tuple[int, int]], method: str = "infomap",
                  tokenizer: Any = None, title: str | None = None,
                  on_page: Any = None) -> ReportsReport:
    """Write a page for each of ``neurons`` and ``index.html`` under ``out``."""
    from circuit_atlas.lake.labels import known_labels, latest_ok

    if not neurons:
        raise CircuitAtlasError("no neurons to write pages for: pass --neuron, --top or "
                                "--labelled")
    os.makedirs(out, exist_ok=True)
    labels: dict[tuple[int, int], dict[str, str]] = {}
    latest = latest_ok(known_labels(lake, model, corpus))
    if latest is not None:
        for r in latest.select("layer", "neuron", "pass", "label").iter_rows():
            labels.setdefault((r[0], r[1]), {})[r[2]] = r[3]
    from circuit_atlas.views import html_template, inline

    page = html_template("circuit_atlas.use", "report_page.html")
    index = html_template("circuit_atlas.use", "report_index.html")
    pages, rows = set(neurons), []
    for i, (layer, neuron) in enumerate(neurons):
        data = page_data(lake, model, corpus, layer, neuron, pages, labels, method, tokenizer)
        with open(os.path.join(out, page_name(layer, neuron)), "w") as f:
            f.write(inline(page, data))
        rows.append(index_row(data))
        if on_page:
            on_page(i + 1, len(neurons))
    meta = {"title": title or f"{model}, {corpus}", "model": model, "corpus": corpus,
            "rows": rows}
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(inline(index, meta))
    return ReportsReport(out, len(rows), sum(bool(r["labels"]) for r in rows))


def run_reports(lake, *, model, corpora=None, params=None, cluster=None,
                progress=None) -> ReportsReport:
    """Write one self-contained HTML page per chosen neuron of an atlas (``corpora``:
    default the only reduced set) and ``index.html`` with search and filters, under
    ``params.out``."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.lake.neurons import parse_neuron
    from circuit_atlas.names import model_name
    from circuit_atlas.stage import Progress, as_corpora, open_lake
    from circuit_atlas.use.params import ReportsParams

    lake, params = open_lake(lake), params or ReportsParams()
    progress = progress or Progress()
    name = model_name(model)
    corpus = lake.reduced_corpus(name, as_corpora(corpora))
    chosen = choose_neurons(lake, name, corpus, [parse_neuron(x) for x in params.neurons],
                            params.top, params.labelled)
    return write_reports(lake, name, corpus, params.out, chosen, params.method,
                         optional_tokenizer(model),
                         on_page=lambda d, t: progress.update("report pages", d, t))
