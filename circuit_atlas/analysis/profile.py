"""One neuron's profile, gathered from every table the lake holds for it.

What the original atlas scripts' ``build_neuron_profile.py`` printed: appearances,
upstream sources and downstream targets (embedding and logit nodes decoded to text),
token associations, co-occurring neurons, projections, weight-based wiring (and whether
it agrees with the RelP upstream), direct-effect ratio, role,
clusters and labels; and, once the activations stage has run, the activation
statistics and the top and bottom exemplars, activating tokens marked; once the causal
battery has run on it, its necessity, sufficiency and specificity.
A table the lake does not have is left out of the profile, not shown as empty.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import NodeNames, neuron_label
from circuit_atlas.lake.schemas import STATIC_CORPUS


def _table(lake: Lake, name: str, model: str, corpus: str) -> pl.LazyFrame | None:
    return lake.optional_table(name, model, corpus)


def neuron_profile(lake: Lake, model: str, layer: int, neuron: int, corpus: str | None = None,
                   top: int = 10, tokenizer: Any = None) -> dict[str, Any]:
    """The profile of neuron (layer, neuron) as a JSON-ready dict of sections."""
    corpus = corpus or lake.reduced_corpus(model)
    manifest = lake.table_manifest(model, corpus, "neurons")
    if manifest is None:
        raise CircuitAtlasError(f"no reduced tables for {model!r} / {corpus!r}; "
                                "run: circuit-atlas reduce")
    n_layers = (manifest["inputs"].get("model_shape") or {}).get("n_layers")
    names = NodeNames(tokenizer, n_layers)
    me = (pl.col("layer") == layer)
    stats = lake.table("neurons", model, corpus).drop("model", "corpus").filter(
        me & (pl.col("neuron") == neuron)).collect()
    if stats.is_empty():
        raise CircuitAtlasError(f"{neuron_label(layer, neuron)} is in no graph of {corpus!r}")
    out: dict[str, Any] = {"id": neuron_label(layer, neuron), "layer": layer, "neuron": neuron,
                           "model": model, "corpus": corpus,
                           "appearances": stats.drop("layer", "neuron").to_dicts()[0]}
    corpora = _table(lake, "neuron_corpora", model, corpus)
    if corpora is not None:
        out["appearances"]["by_corpus"] = dict(corpora.filter(
            me & (pl.col("neuron") == neuron)).select("corpus_name", "graph_count")
            .collect().iter_rows())
    edges = lake.table("edges", model, corpus)
    cols = ["count", "graph_count", "mean_weight", "mean_abs_weight"]
    for section, mine, other in (("upstream", "tgt", "src"), ("downstream", "src", "tgt")):
        rows = (edges.filter((pl.col(f"{mine}_layer") == layer)
                             & (pl.col(f"{mine}_neuron") == neuron))
                .sort("weight_abs_sum", descending=True).head(top).collect())
        out[section] = [{"node": names.node(r[f"{other}_layer"], r[f"{other}_neuron"]),
                         **{c: r[c] for c in cols}} for r in rows.iter_rows(named=True)]
    tokens = _table(lake, "neuron_tokens", model, corpus)
    if tokens is not None:
        rows = tokens.filter(me & (pl.col("neuron") == neuron)).sort("kind", "rank").collect()
        out["tokens"] = {kind: [{"token": names.token(r["token_id"]), "count": r["count"]}
                                for r in rows.filter(pl.col("kind") == kind).iter_rows(
                                    named=True)] for kind in ("input", "output")}
    mine = me & (pl.col("neuron") == neuron)
    co = _table(lake, "cooccurrence", model, corpus)
    if co is not None:
        rows = co.filter(mine).sort("jaccard", descending=True).head(top).collect()
        out["cooccurring"] = [{"node": names.node(r["other_layer"], r["other_neuron"]),
                               "joint_count": r["joint_count"], "jaccard": r["jaccard"],
                               "npmi": r["npmi"]} for r in rows.iter_rows(named=True)]
    proj = _table(lake, "projections", model, STATIC_CORPUS)
    if proj is not None:
        rows = proj.filter(mine).sort("kind", "sign", "rank",
                                      descending=[False, True, False]).collect()
        out["projections"] = {
            f"{kind} {'+' if sign > 0 else '-'}": [(r["token"], round(r["value"], 4))
                                                   for r in rows.filter(
                (pl.col("kind") == kind) & (pl.col("sign") == sign)).head(top).iter_rows(
                named=True)] for kind in ("output", "input") for sign in (1, -1)}
    from circuit_atlas.analysis.wiring import neuron_wiring

    wiring = neuron_wiring(lake, model, corpus, layer, neuron, min(top, 5))
    if wiring is not None:  # once circuit-atlas wiring has run
        out["wiring"] = wiring
    for section, name in (("effects", "neuron_effects"), ("role", "roles"),
                          ("specificity", "specificity"), ("causal", "neuron_causal")):
        t = _table(lake, name, model, corpus)
        if t is not None:
            rows = t.filter(mine).collect()
            if len(rows):
                out[section] = rows.drop("layer", "neuron").to_dicts()
    clusters = _table(lake, "cluster_assignments", model, corpus)
    if clusters is not None:
        out["clusters"] = clusters.filter(mine).select(
            "method", "cluster_path", "depth", "flow").collect().to_dicts()
    from circuit_atlas.analysis.exemplars import activation_stats, neuron_exemplars, token_means

    stats = activation_stats(lake, model, corpus, layer, neuron)
    if stats:
        out["activation"] = stats
    exemplars = neuron_exemplars(lake, model, corpus, layer, neuron, min(top, 5), tokenizer)
    if exemplars is not None:
        out["exemplars"] = exemplars
    in_context = token_means(lake, model, corpus, layer, [neuron], tokenizer, top)
    if in_context:
        out["token_means"] = in_context[neuron]
    labels = _table(lake, "labels", model, corpus)  # once labeling has run
    if labels is not None:
        from circuit_atlas.lake.labels import with_scores

        out["labels"] = with_scores(lake, model, corpus, labels.filter(mine).collect()
                                    ).to_dicts()
    from circuit_atlas.lake.investigations import latest_record

    record = latest_record(lake, model, corpus, layer, neuron)  # once investigate has run
    if record is not None:
        out["investigation"] = {k: v for k, v in record.items() if k not in ("layer", "neuron")}
    return out
