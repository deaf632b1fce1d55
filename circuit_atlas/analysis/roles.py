"""Circuit roles of neurons, from the ``edges`` and ``neurons`` tables (seed "Agentic
Neural Autointerp" §4).

Per neuron, with "strength" the summed |weight| over all graphs (``weight_abs_sum``):

* ``in_embed`` / ``in_neuron``: strength arriving from embedding nodes / from neurons;
* ``out_neuron`` / ``out_logit``: strength leaving to neurons / to logit nodes;
* ``out_negative_share``: share of the outgoing signed weight that is negative,
  sum(max(-weight_sum, 0)) / sum(|weight_sum|) over its outgoing edges;
* ``sources`` / ``targets``: distinct incoming / outgoing partners.

The role is the first rule that holds, in this order (thresholds are arguments):

1. **output formatter**: out_logit >= 50% of its outgoing strength, in the last third
   of the layers;
2. **feature detector**: in_embed >= 50% of its incoming strength;
3. **inhibitor**: out_negative_share >= 0.6 (with some outgoing strength);
4. **integrator**: sources >= 3 x targets and at least 5 sources;
5. **relay**: incoming and outgoing strength both at or above the median of the
   neurons that have both;
6. otherwise **other** (weak or one-sided neurons).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from circuit_atlas.analysis.params import RolesParams
from circuit_atlas.stage import Progress, Report, atlas_corpora, open_lake

ROLES = ("output formatter", "feature detector", "inhibitor", "integrator", "relay", "other")


def role_features(edges: pl.LazyFrame, n_layers: int) -> pl.DataFrame:
    """The per-neuron quantities the rules use, for every neuron with an edge."""
    e = edges.select("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "weight_sum",
                     "weight_abs_sum")
    is_neuron = pl.col("layer").is_between(0, n_layers - 1)
    incoming = (e.filter(pl.col("tgt_layer").is_between(0, n_layers - 1))
                .group_by(layer="tgt_layer", neuron="tgt_neuron")
                .agg(in_embed=pl.col("weight_abs_sum").filter(pl.col("src_layer") < 0).sum(),
                     in_neuron=pl.col("weight_abs_sum").filter(pl.col("src_layer") >= 0).sum(),
                     sources=pl.len()))
    outgoing = (e.filter(pl.col("src_layer") >= 0)
                .group_by(layer="src_layer", neuron="src_neuron")
                .agg(out_logit=pl.col("weight_abs_sum").filter(
                         pl.col("tgt_layer") >= n_layers).sum(),
                     out_neuron=pl.col("weight_abs_sum").filter(
                         pl.col("tgt_layer") < n_layers).sum(),
                     out_negative=(-pl.col("weight_sum")).clip(lower_bound=0).sum(),
                     out_signed=pl.col("weight_sum").abs().sum(),
                     targets=pl.len()))
    return (incoming.join(outgoing, on=["layer", "neuron"], how="full", coalesce=True)
            .filter(is_neuron).fill_null(0)
            .with_columns(out_negative_share=pl.when(pl.col("out_signed") > 0).then(
                pl.col("out_negative") / pl.col("out_signed")).otherwise(0.0))
            .drop("out_negative", "out_signed").sort("layer", "neuron").collect())


def classify(features: pl.DataFrame, n_layers: int, share: float = 0.5,
             negative: float = 0.6, fan_in: float = 3.0, min_sources: int = 5) -> pl.DataFrame:
    """Add ``role`` to :func:`role_features` rows (rules in the module docstring)."""
    f = features.with_columns(in_total=pl.col("in_embed") + pl.col("in_neuron"),
                              out_total=pl.col("out_logit") + pl.col("out_neuron"))
    both = f.filter((pl.col("in_total") > 0) & (pl.col("out_total") > 0))
    med_in = both["in_total"].median() if len(both) else 0.0
    med_out = both["out_total"].median() if len(both) else 0.0
    role = (pl.when((pl.col("out_total") > 0) & (pl.col("out_logit") >= share * pl.col("out_total"))
                    & (pl.col("layer") >= 2 * n_layers / 3)).then(pl.lit(ROLES[0]))
            .when((pl.col("in_total") > 0) & (pl.col("in_embed") >= share * pl.col("in_total")))
            .then(pl.lit(ROLES[1]))
            .when((pl.col("out_total") > 0) & (pl.col("out_negative_share") >= negative))
            .then(pl.lit(ROLES[2]))
            .when((pl.col("sources") >= fan_in * pl.col("targets"))
                  & (pl.col("sources") >= min_sources)).then(pl.lit(ROLES[3]))
            .when((pl.col("in_total") >= med_in) & (pl.col("out_total") >= med_out)
                  & (pl.col("in_total") > 0) & (pl.col("out_total") > 0)).then(pl.lit(ROLES[4]))
            .otherwise(pl.lit(ROLES[5])))
    return f.with_columns(role=role).drop("in_total", "out_total")


def write_roles(lake, model: str, corpora: list[str], **thresholds: float) -> dict[str, int]:
    """Publish the ``roles`` table; returns the number of neurons per role."""
    from circuit_atlas.analysis.inputs import reduced
    from circuit_atlas.lake.schemas import ROLES as ROLES_SPEC

    inputs = reduced(lake, model, corpora)
    table = classify(role_features(lake.table("edges", model, inputs.corpus), inputs.n_layers),
                     inputs.n_layers, **thresholds)
    version = lake.new_table_version(model, inputs.corpus, "roles")
    name = version.write("roles.parquet", table.select(ROLES_SPEC.schema.names).to_arrow(),
                         ROLES_SPEC)
    version.publish([name], {"thresholds": thresholds, "model": model,
                             "shards": [f"{s.corpus}/{s.shard}" for s in inputs.shards]})
    return dict(table.group_by("role").len().iter_rows())


@dataclass
class RolesReport(Report):
    corpus: str
    counts: dict[str, int]

    def __str__(self) -> str:
        return "roles " + ", ".join(f"{role} {n:,}" for role, n in
                                    sorted(self.counts.items(), key=lambda kv: -kv[1]))


def run_roles(lake, *, model, corpora=None, params: RolesParams | None = None, cluster=None,
              progress: Progress | None = None) -> RolesReport:
    """The circuit role of every neuron with edges (feature detector, relay,
    integrator, output formatter, inhibitor, other): the ``roles`` table."""
    from dataclasses import asdict

    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or RolesParams()
    model = model_name(model)
    corpora = atlas_corpora(lake, model, corpora)
    counts = write_roles(lake, model, corpora, **asdict(params))
    return RolesReport("+".join(sorted(corpora)), counts)
