"""Two-pass label-prompt assembly from the atlas tables (no LLM here).

* output pass, late layers to early: a neuron's prompt shows the output labels of
  its downstream targets, so those must exist first;
* input pass, early layers to late: a prompt shows the output labels of upstream
  sources and co-occurring neurons, and the neuron's own output label;
* negative pass, in the input pass's order and from its evidence: what drives the
  activation most negative (SwiGLU activations have both signs; some neurons are
  never above zero), its most negative contexts first.

Evidence is read one layer at a time (:func:`layer_evidence`) and is whatever the lake
holds: projections, effects, specificity, token associations and co-occurrence are
each optional. :func:`assemble` turns a layer's evidence into chat messages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.templates import messages
from circuit_atlas.lake import Lake
from circuit_atlas.lake.labels import polarity
from circuit_atlas.lake.neurons import NodeNames, neuron_label
from circuit_atlas.lake.schemas import STATIC_CORPUS

PASSES = ("output", "input", "negative")


def layer_order(pass_: str, n_layers: int) -> list[int]:
    """Output pass: last layer first; input and negative passes: first layer first."""
    if pass_ not in PASSES:
        raise CircuitAtlasError(f"unknown pass {pass_!r}; choose one of {', '.join(PASSES)}")
    layers = list(range(n_layers))
    return layers[::-1] if pass_ == "output" else layers


def prompt_hash(msgs: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Atlas:
    """The tables evidence is read from, opened once."""

    lake: Lake
    model: str
    corpus: str
    n_layers: int
    names: NodeNames
    neurons: pl.DataFrame  # layer, neuron, graph_count
    edges: pl.LazyFrame
    tables: dict[str, pl.LazyFrame]  # the optional ones that exist
    exemplars: bool = False  # whether the activations stage ran on a corpus of the atlas

    @classmethod
    def open(cls, lake: Lake, model: str, corpus: str, tokenizer: Any = None) -> Atlas:
        manifest = lake.table_manifest(model, corpus, "neurons")
        if manifest is None:
            raise CircuitAtlasError(f"no reduced tables for {model!r} / {corpus!r}; "
                                    "run: circuit-atlas reduce")
        n_layers = (manifest["inputs"].get("model_shape") or {}).get("n_layers")
        if n_layers is None:
            raise CircuitAtlasError("the reduced tables do not record the model's shape; "
                                    "recompute the graphs with this version")
        neurons = lake.table("neurons", model, corpus).filter(
            pl.col("layer").is_between(0, n_layers - 1)).select(
            "layer", "neuron", graph_count="graph_count").collect()
        tables = {}
        for name, part in (("projections", STATIC_CORPUS), ("neuron_effects", corpus),
                           ("specificity", corpus), ("neuron_tokens", corpus),
                           ("cooccurrence", corpus)):
            table = lake.optional_table(name, model, part)
            if table is not None:
                tables[name] = table
        from circuit_atlas.analysis.exemplars import has_table

        exemplars = has_table(lake, model, corpus, "exemplars")
        return cls(lake, model, corpus, n_layers, NodeNames(tokenizer, n_layers), neurons,
                   lake.table("edges", model, corpus).drop("model", "corpus"), tables,
                   exemplars)


def _by_neuron(df: pl.DataFrame) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in df.iter_rows(named=True):
        out.setdefault(r["neuron"], []).append(r)
    return out


def _top_per(lf: pl.LazyFrame, key: str, order: str, top: int) -> pl.LazyFrame:
    return lf.sort([key, order], descending=[False, True]).filter(
        pl.int_range(pl.len()).over(key) < top)


def layer_evidence(atlas: Atlas, pass_: str, layer: int, labels: pl.DataFrame | None,
                   neurons: list[int] | None = None, top: int = 8) -> dict[int, dict[str, Any]]:
    """Evidence for the neurons of ``layer`` (all that appear in graphs, or ``neurons``):
    {neuron: {section: ...}}. ``labels``: (layer, neuron, pass, label) known so far."""
    base = atlas.neurons.filter(pl.col("layer") == layer)
    if neurons is not None:
        base = base.filter(pl.col("neuron").is_in(neurons))
    ids = base["neuron"].to_list()
    ev = {n: {"neuron": neuron_label(layer, n), "layer": layer, "n_layers": atlas.n_layers,
              "appearances": c} for n, c in zip(ids, base["graph_count"], strict=True)}
    if not ids:
        return ev
    output_labels = {}
    if labels is not None:
        for r in labels.filter(pl.col("pass") == "output").iter_rows(named=True):
            output_labels[(r["layer"], r["neuron"])] = r["label"]
    mine = (pl.col("layer") == layer) & pl.col("neuron").is_in(ids)
    t = atlas.tables
    if "projections" in t:
        kind = "output" if pass_ == "output" else "input"
        rows = t["projections"].filter(mine & (pl.col("kind") == kind) & (pl.col("rank") < top)
                                       ).sort("neuron", "sign", "rank").collect()
        keys = ("promoted", "suppressed") if pass_ == "output" else ("activating", "suppressing")
        for n, rs in _by_neuron(rows).items():
            ev[n][keys[0]] = [(r["token"], r["value"]) for r in rs if r["sign"] > 0]
            ev[n][keys[1]] = [(r["token"], r["value"]) for r in rs if r["sign"] < 0]
    if atlas.exemplars:
        _exemplar_evidence(atlas, pass_, layer, ids, ev)
    if pass_ == "output":
        if labels is not None:
            for r in labels.filter((pl.col("pass") == "prior") & (pl.col("layer") == layer)
                                   ).iter_rows(named=True):
                if r["neuron"] in ev:
                    ev[r["neuron"]].setdefault("prior", []).append(r["label"])
        if "neuron_effects" in t:
            for r in t["neuron_effects"].filter(mine & pl.col("der_class").is_not_null()
                                                ).collect().iter_rows(named=True):
                ev[r["neuron"]]["der"] = r
        if "specificity" in t:
            for r in t["specificity"].filter(mine).collect().iter_rows(named=True):
                ev[r["neuron"]]["specificity"] = r
        rows = _top_per(atlas.edges.filter((pl.col("src_layer") == layer)
                                           & pl.col("src_neuron").is_in(ids))
                        .rename({"src_neuron": "neuron"}), "neuron", "weight_abs_sum", top
                        ).collect()
        for n, rs in _by_neuron(rows).items():
            ev[n]["downstream"] = [_link(atlas, r["tgt_layer"], r["tgt_neuron"], r, output_labels)
                                   for r in rs]
        return ev
    for n in ids:
        if (layer, n) in output_labels:
            ev[n]["output_label"] = output_labels[(layer, n)]
    rows = _top_per(atlas.edges.filter((pl.col("tgt_layer") == layer)
                                       & pl.col("tgt_neuron").is_in(ids))
                    .rename({"tgt_neuron": "neuron"}), "neuron", "weight_abs_sum", top).collect()
    for n, rs in _by_neuron(rows).items():
        ev[n]["upstream"] = [_link(atlas, r["src_layer"], r["src_neuron"], r, output_labels)
                             for r in rs]
    if "neuron_tokens" in t:
        rows = t["neuron_tokens"].filter(
            mine & (pl.col("kind") == "input") & (pl.col("rank") < top)).sort(
            "neuron", "rank").collect()
        for n, rs in _by_neuron(rows).items():
            ev[n]["input_tokens"] = [(atlas.names.token(r["token_id"]).strip("'\""), r["count"])
                                     for r in rs]
    if "cooccurrence" in t:
        rows = _top_per(t["cooccurrence"].filter(mine), "neuron", "jaccard", top).collect()
        for n, rs in _by_neuron(rows).items():
            ev[n]["cooccurring"] = [
                {"node": neuron_label(r['other_layer'], r['other_neuron']), "jaccard": r["jaccard"],
                 "label": output_labels.get((r["other_layer"], r["other_neuron"]))}
                for r in rs]
    return ev


EXEMPLARS_SHOWN = 5
# the negative pass labels a neuron whose most negative activation reaches this share of
# its largest positive one: SiLU(gate) * up has both signs, and for some neurons the
# negative side is the strong one (a neuron never above zero always qualifies)
NEGATIVE_SHARE = 0.5


def strong_negative() -> pl.Expr:
    """Over (min, max) of a neuron's activations: whether the negative pass labels it."""
    return -pl.col("min") >= NEGATIVE_SHARE * pl.col("max").clip(0)


def negative_side(atlas: Atlas, layer: int) -> list[int]:
    """The neurons of ``layer`` the negative pass labels: those whose most negative
    activation (over the atlas's corpora) reaches ``NEGATIVE_SHARE`` of their largest."""
    from circuit_atlas.analysis.exemplars import layer_extremes

    extremes = layer_extremes(atlas.lake, atlas.model, atlas.corpus, layer)
    if extremes is None:
        raise CircuitAtlasError("the negative pass reads the activation statistics: run "
                                "circuit-atlas activations first")
    return sorted(extremes.filter(strong_negative())["neuron"].to_list())


def _exemplar_evidence(atlas: Atlas, pass_: str, layer: int, ids: list[int],
                       ev: dict[int, dict[str, Any]]) -> None:
    """Input and negative passes: the contexts where each neuron fires most, and where
    it is most negative; the input pass: the tokens of its highest mean activation.
    Output pass: what the model predicts next at its top contexts. Only
    texts outside the held-out split (``lake.splits.held_out``)."""
    from collections import Counter

    from circuit_atlas.analysis.exemplars import (
        corpora_of,
        exemplar_dicts,
        read_exemplars,
        token_means,
        token_texts,
    )

    # never the held-out texts: the labels are scored on those
    rows = read_exemplars(atlas.lake, atlas.model, atlas.corpus, layer, ids, EXEMPLARS_SHOWN,
                          split="shown")
    if rows is None:
        return
    texts = token_texts(rows, atlas.names.tok)
    for n, part in rows.partition_by("neuron", as_dict=True).items():
        found = exemplar_dicts(part, texts=texts)
        top = [e for e in found if e["sign"] > 0]
        if pass_ != "output":
            ev[n[0]]["exemplars"] = [(e["activation"], e["text"]) for e in top]
            ev[n[0]]["negative_exemplars"] = [(e["activation"], e["text"]) for e in found
                                              if e["sign"] < 0]
        else:
            nxt = Counter(e["next_tokens"][0] for e in top if e["next_tokens"])
            ev[n[0]]["next_tokens"] = nxt.most_common(EXEMPLARS_SHOWN)
    if pass_ == "output":
        return
    # token_activations holds the highest means only: no evidence for the negative pass
    means_of = token_means(atlas.lake, atlas.model, atlas.corpus, layer, ids,
                           atlas.names.tok, EXEMPLARS_SHOWN) if polarity(pass_) > 0 else {}
    for n, means in means_of.items():
        ev[n]["token_means"] = [(r["token"], r["mean"]) for r in means]
    for c in corpora_of(atlas.corpus):
        t = atlas.lake.optional_table("activation_stats", atlas.model, c)
        if t is None:
            continue
        for r in t.filter((pl.col("layer") == layer) & pl.col("neuron").is_in(ids)
                          & pl.col("static_rank_corr").is_not_null()).select(
                "neuron", "static_rank_corr", "corr_tokens").collect().iter_rows():
            ev[r[0]].setdefault("static_corr", (r[1], r[2]))


def _link(atlas: Atlas, layer: int, index: int, row: dict[str, Any],
          output_labels: dict[tuple[int, int], str]) -> dict[str, Any]:
    return {"node": atlas.names.node(layer, index), "weight": row["mean_weight"],
            "graphs": row["graph_count"], "label": output_labels.get((layer, index))}


def assemble(pass_: str, evidence: dict[int, dict[str, Any]]
             ) -> list[tuple[int, list[dict[str, str]], str]]:
    """(neuron, chat messages, prompt hash) for each neuron of a layer's evidence."""
    out = []
    for n in sorted(evidence):
        msgs = messages(pass_, evidence[n])
        out.append((n, msgs, prompt_hash(msgs)))
    return out


def priority(atlas: Atlas, layer: int, labels: pl.DataFrame | None, pass_: str
             ) -> pl.DataFrame:
    """The neurons of ``layer`` in the order ``label --order priority`` labels them: by
    strength (summed |weight| of every edge it has with another neuron, both ways) times
    one plus its neighbours that have no ``pass_`` label yet. A label of a strong
    neuron with many unlabelled neighbours explains the most of the atlas: it shows in
    each of their prompts (the original pipeline's "active learning" idea). Columns:
    neuron, strength, unlabelled, priority; highest first, ties by neuron id."""
    mine = atlas.neurons.filter(pl.col("layer") == layer).select("neuron")
    n_layers = atlas.n_layers
    e = atlas.edges.select("src_layer", "src_neuron", "tgt_layer", "tgt_neuron",
                           "weight_abs_sum")
    inner = (pl.col("src_layer").is_between(0, n_layers - 1)
             & pl.col("tgt_layer").is_between(0, n_layers - 1))
    out_ = e.filter(inner & (pl.col("src_layer") == layer)).select(
        neuron="src_neuron", other_layer="tgt_layer", other="tgt_neuron", w="weight_abs_sum")
    in_ = e.filter(inner & (pl.col("tgt_layer") == layer)).select(
        neuron="tgt_neuron", other_layer="src_layer", other="src_neuron", w="weight_abs_sum")
    links = pl.concat([out_, in_]).collect()
    done = pl.DataFrame(schema={"other_layer": pl.Int16, "other": pl.Int32})
    if labels is not None:
        done = labels.filter(pl.col("pass") == pass_).select(
            other_layer=pl.col("layer").cast(pl.Int16),
            other=pl.col("neuron").cast(pl.Int32)).unique()
    open_ = links.join(done, on=["other_layer", "other"], how="anti").group_by("neuron").agg(
        unlabelled=pl.struct("other_layer", "other").n_unique())
    strength = links.group_by("neuron").agg(strength=pl.col("w").sum())
    return (mine.join(strength, on="neuron", how="left").join(open_, on="neuron", how="left")
            .with_columns(pl.col("strength").fill_null(0.0),
                          pl.col("unlabelled").fill_null(0).cast(pl.Int64))
            .with_columns(priority=pl.col("strength") * (1 + pl.col("unlabelled")))
            .sort(["priority", "neuron"], descending=[True, False]))
