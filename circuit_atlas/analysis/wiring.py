"""How weight-based wiring (``compute.wiring``) agrees with RelP edges, and a neuron's
wiring read back for its profile.

Two measures, for the target neurons that have both weight-based upstream rows and RelP
edges from MLP neurons:

* **hit rate**: how often a neuron's strongest weight-based upstream (largest
  |strength|) is among its most frequent RelP upstream (top ``TOP_RELP`` by count),
  beside the rate a source drawn at random from the earlier layers would reach
  (``chance_rate``): the weights predict which neurons graphs find, or they do not;
* **rank correlation** of the (source, target) pairs in both tables between the edge
  the wiring predicts, strength times the source's mean activation in the graphs
  (a RelP edge weight is the source's activation times its effect; a neuron that
  fires negatively flips the sign of what it sends), and their mean RelP edge weight
  (Spearman), and the share of those pairs whose signs agree. A RelP edge also
  carries what flows through attention and the MLPs in between, which the direct
  path leaves out, so agreement is not expected to be complete.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from circuit_atlas.lake.neurons import neuron_label

TOP_RELP = 10
KEYS = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]


def relp_upstream(edges: pl.DataFrame | pl.LazyFrame, n_layers: int) -> pl.LazyFrame:
    """Edges between MLP neurons (no embedding, logit or error nodes)."""
    mlp = lambda side: (pl.col(f"{side}_layer").is_between(0, n_layers - 1)  # noqa: E731
                        & (pl.col(f"{side}_neuron") >= 0))
    return edges.lazy().filter(mlp("src") & mlp("tgt")
                               & (pl.col("src_layer") < pl.col("tgt_layer")))


def frequent_upstream(relp: pl.LazyFrame, top: int = TOP_RELP) -> pl.LazyFrame:
    """Each target's ``top`` most frequent RelP upstream (by count, then mean |weight|,
    then source id)."""
    return (relp.sort(["count", "mean_abs_weight", "src_layer", "src_neuron"],
                      descending=[True, True, False, False])
            .with_columns(n=pl.int_range(pl.len()).over("tgt_layer", "tgt_neuron"))
            .filter(pl.col("n") < top))


def agreement_frame(wiring: pl.DataFrame | pl.LazyFrame, edges: pl.DataFrame | pl.LazyFrame,
                    n_layers: int, n_neurons: int, activations: pl.DataFrame | pl.LazyFrame
                    | None = None, top: int = TOP_RELP) -> pl.DataFrame:
    """The ``wiring_agreement`` rows: all layers first (layer null), then one per target
    layer. ``activations``: (layer, neuron, activation_mean) of the sources (the reduced
    neurons table); without, the predicted edge is the strength alone."""
    relp = relp_upstream(edges, n_layers).select(*KEYS, "count", "mean_weight",
                                                 "mean_abs_weight")
    frequent = frequent_upstream(relp, top)
    per_target = frequent.group_by("tgt_layer", "tgt_neuron").agg(relp_n=pl.len())
    upstream = wiring.lazy().filter(pl.col("direction") == "upstream")
    strongest = (upstream.sort([pl.col("strength").abs(), "src_layer", "src_neuron"],
                               descending=[True, False, False])
                 .group_by("tgt_layer", "tgt_neuron").first()
                 .select(*KEYS))
    hits = (strongest.join(per_target, on=["tgt_layer", "tgt_neuron"])
            .join(frequent.select(*KEYS, hit=pl.lit(True)), on=KEYS, how="left")
            .select("tgt_layer", hit=pl.col("hit").fill_null(False),
                    chance=pl.col("relp_n") / (pl.col("tgt_layer").cast(pl.Float64)
                                               * n_neurons)))
    pairs = (wiring.lazy().select(*KEYS, "strength").unique(KEYS)
             .join(relp.select(*KEYS, "mean_weight"), on=KEYS))
    if activations is not None:
        pairs = pairs.join(activations.lazy().select(
            src_layer=pl.col("layer"), src_neuron=pl.col("neuron"),
            a=pl.col("activation_mean")), on=["src_layer", "src_neuron"], how="left")
        pairs = pairs.with_columns(strength=pl.col("strength") * pl.col("a").fill_null(1.0))
    pairs = pairs.select("tgt_layer", "strength", "mean_weight")
    hit_cols = [pl.len().alias("neurons"), pl.col("hit").sum().alias("hits"),
                pl.col("hit").mean().alias("hit_rate"), pl.col("chance").mean()
                .alias("chance_rate")]
    pair_cols = [pl.len().alias("pairs"),
                 pl.corr("strength", "mean_weight", method="spearman").alias("spearman"),
                 (pl.col("strength").sign() == pl.col("mean_weight").sign()).mean()
                 .alias("sign_agreement")]
    h, p = hits.collect(), pairs.collect()
    overall = pl.concat([h.select(hit_cols), p.select(pair_cols)], how="horizontal")
    by_layer = (h.group_by("tgt_layer").agg(hit_cols)
                .join(p.group_by("tgt_layer").agg(pair_cols), on="tgt_layer", how="full",
                      coalesce=True)
                .rename({"tgt_layer": "layer"}).sort("layer"))
    out = pl.concat([overall.with_columns(layer=pl.lit(None, pl.Int16)), by_layer],
                    how="diagonal_relaxed")
    out = out.with_columns(pl.col("neurons", "hits", "pairs").fill_null(0),
                           pl.col("spearman").fill_nan(None))
    return out.select("layer", "neurons", "hits", "hit_rate", "chance_rate", "pairs",
                      "spearman", "sign_agreement")


def wiring_partition(lake, model: str, corpus: str | None) -> str | None:
    """Where a model's wiring is: under ``corpus`` (a corpus operating point) if there,
    else the weight-only table (corpus "static"); None if it has none."""
    from circuit_atlas.lake.schemas import STATIC_CORPUS

    for where in ([corpus] if corpus else []) + [STATIC_CORPUS]:
        if lake.table_manifest(model, where, "wiring") is not None:
            return where
    return None


def agreement(lake, model: str, corpus: str, n_layers: int, n_neurons: int,
              wiring_corpus: str) -> pl.DataFrame:
    """The agreement of the wiring under ``wiring_corpus`` with ``corpus``'s RelP edges."""
    activations = lake.optional_table("neurons", model, corpus)
    return agreement_frame(lake.table("wiring", model, wiring_corpus),
                           lake.table("edges", model, corpus), n_layers, n_neurons,
                           activations)


def write_agreement(lake, model: str, corpus: str, table: pl.DataFrame,
                    wiring_corpus: str) -> None:
    from circuit_atlas.lake.schemas import WIRING_AGREEMENT

    version = lake.new_table_version(model, corpus, "wiring_agreement")
    arrow = table.to_arrow().cast(WIRING_AGREEMENT.schema)
    version.publish([version.write("part-0.parquet", arrow, WIRING_AGREEMENT)],
                    {"wiring_corpus": wiring_corpus, "top_relp": TOP_RELP})


def describe(row: dict[str, Any]) -> str:
    """One line of an agreement row."""
    if not row["neurons"]:
        return "agreement with RelP: no neuron has both weight-based and RelP upstream"
    rho = row["spearman"]
    sign = row["sign_agreement"]
    return (f"agreement with RelP: the strongest weight-based upstream is among the "
            f"{TOP_RELP} most frequent RelP upstream for {row['hits']:,} of "
            f"{row['neurons']:,} neurons ({row['hit_rate']:.1%}; chance "
            f"{row['chance_rate']:.2%}); {row['pairs']:,} pairs in both, Spearman "
            f"{'n/a' if rho is None else f'{rho:+.2f}'}, signs agree "
            f"{'n/a' if sign is None else f'{sign:.0%}'}")


def neuron_wiring(lake, model: str, corpus: str | None, layer: int, neuron: int,
                  top: int = 5) -> dict[str, Any] | None:
    """A neuron's weight-based wiring for its profile: the strongest ``top``
    connections of each direction and polarity, and, where ``corpus`` has RelP edges,
    whether its strongest upstream is among its most frequent RelP upstream."""
    where = wiring_partition(lake, model, corpus)
    if where is None:
        return None
    manifest = lake.table_manifest(model, where, "wiring")
    w = lake.table("wiring", model, where)
    mine = {"downstream": (pl.col("src_layer") == layer) & (pl.col("src_neuron") == neuron),
            "upstream": (pl.col("tgt_layer") == layer) & (pl.col("tgt_neuron") == neuron)}
    out: dict[str, Any] = {"operating_point": manifest["inputs"]["operating_point"]}
    for direction, cond in mine.items():
        rows = (w.filter((pl.col("direction") == direction) & cond)
                .sort("polarity", "rank", descending=[True, False]).collect())
        other = "tgt" if direction == "downstream" else "src"
        for polarity, name in ((1, "excitatory"), (-1, "inhibitory")):
            out[f"{direction} {name}"] = [
                {"node": neuron_label(r[f"{other}_layer"], r[f"{other}_neuron"]),
                 "strength": r["strength"], "c_gate": r["c_gate"], "c_up": r["c_up"]}
                for r in rows.filter(pl.col("polarity") == polarity).head(top).iter_rows(
                    named=True)]
    if corpus and lake.table_manifest(model, corpus, "edges") is not None:
        shape = manifest["inputs"]["model_shape"]
        ups = [*out["upstream excitatory"], *out["upstream inhibitory"]]
        mine = relp_upstream(lake.table("edges", model, corpus), shape["n_layers"]).filter(
            (pl.col("tgt_layer") == layer) & (pl.col("tgt_neuron") == neuron))
        relp = frequent_upstream(mine).sort("n").collect()
        if ups and len(relp):
            strongest = max(ups, key=lambda r: abs(r["strength"]))["node"]
            frequent = [neuron_label(r["src_layer"], r["src_neuron"])
                        for r in relp.iter_rows(named=True)]
            out["agreement"] = {"strongest_upstream": strongest,
                                "relp_upstream": frequent, "hit": strongest in frequent}
    return out
