"""Domain specificity: how much more often a neuron is in a domain corpus's graphs than
in a baseline corpus's, from the ``neuron_corpora`` table of a joint reduce.

With c_D of N_D domain graphs and c_B of N_B baseline graphs holding the neuron:

* frequencies f_D = c_D / N_D and f_B = c_B / N_B;
* ``specificity = p_D / (p_D + p_B)`` with add-one smoothed rates
  p = (c + 1) / (N + 2): in [0, 1], 0.5 for no preference. Smoothing pulls rare
  neurons towards 0.5 (seen once in the domain and never in the baseline is 0.67 with
  100 graphs each, not 1), which is what the original atlas's raw ratio lacked;
* ``log_odds``: the log odds ratio with Haldane's +0.5 correction, and its 95%
  Wald interval ``log_odds_low .. log_odds_high`` (SE = sqrt of the four 1/(cell+0.5));
  an interval above 0 is significant domain preference at the 5% level (before any
  correction for testing many neurons).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from circuit_atlas.analysis.params import SpecificityParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Progress, Report, atlas_corpora, open_lake

Z95 = 1.959963984540054


def specificity(counts: pl.DataFrame, graphs: dict[str, int], domain: str,
                baseline: str) -> pl.DataFrame:
    """Per neuron (layer, index) of ``counts`` (layer, index, corpus_name, graph_count):
    the domain and baseline counts and the scores; ``graphs``: graphs per corpus."""
    for c in (domain, baseline):
        if c not in graphs:
            raise CircuitAtlasError(f"corpus {c!r} is not in the reduced tables (they hold "
                                    f"{', '.join(sorted(graphs))})")
    if domain == baseline:
        raise CircuitAtlasError("domain and baseline must be different corpora")
    n_d, n_b = float(graphs[domain]), float(graphs[baseline])
    wide = (counts.filter(pl.col("corpus_name").is_in([domain, baseline]))
            .pivot("corpus_name", index=["layer", "neuron"], values="graph_count")
            .fill_null(0))
    for c in (domain, baseline):
        if c not in wide.columns:
            wide = wide.with_columns(pl.lit(0, pl.Int64).alias(c))
    cd, cb = pl.col(domain).cast(pl.Float64), pl.col(baseline).cast(pl.Float64)
    p_d, p_b = (cd + 1) / (n_d + 2), (cb + 1) / (n_b + 2)
    lor = ((cd + 0.5) / (n_d - cd + 0.5)).log() - ((cb + 0.5) / (n_b - cb + 0.5)).log()
    se = (1 / (cd + 0.5) + 1 / (n_d - cd + 0.5) + 1 / (cb + 0.5) + 1 / (n_b - cb + 0.5)).sqrt()
    return wide.select(
        pl.col("layer"), "neuron", domain=pl.lit(domain),
        baseline=pl.lit(baseline), domain_count=pl.col(domain).cast(pl.Int64),
        baseline_count=pl.col(baseline).cast(pl.Int64),
        domain_graphs=pl.lit(int(n_d), pl.Int64), baseline_graphs=pl.lit(int(n_b), pl.Int64),
        domain_freq=cd / n_d, baseline_freq=cb / n_b, specificity=p_d / (p_d + p_b),
        log_odds=lor, log_odds_low=lor - Z95 * se, log_odds_high=lor + Z95 * se,
    ).sort("layer", "neuron")


def write_specificity(lake, model: str, corpora: list[str], domain: str, baseline: str) -> int:
    """Publish the ``specificity`` table of a joint reduce of ``corpora``; rows written."""
    from circuit_atlas.analysis.inputs import reduced
    from circuit_atlas.lake.schemas import SPECIFICITY

    inputs = reduced(lake, model, corpora)
    counts = lake.table("neuron_corpora", model, inputs.corpus).filter(
        pl.col("layer").is_between(0, inputs.n_layers - 1)).collect()
    table = specificity(counts, inputs.graphs, domain, baseline)
    version = lake.new_table_version(model, inputs.corpus, "specificity")
    name = version.write("specificity.parquet", table.to_arrow(), SPECIFICITY)
    version.publish([name], {"domain": domain, "baseline": baseline, "graphs": inputs.graphs,
                             "shards": [f"{s.corpus}/{s.shard}" for s in inputs.shards],
                             "model": model})
    return len(table)


@dataclass
class SpecificityReport(Report):
    corpus: str
    domain: str
    baseline: str
    neurons: int

    def __str__(self) -> str:
        return f"specificity {self.domain} against {self.baseline}: {self.neurons:,} neurons"


def run_specificity(lake, *, model, corpora=None, params: SpecificityParams | None = None,
                    cluster=None, progress: Progress | None = None) -> SpecificityReport:
    """Domain specificity of every neuron (a smoothed score, and the log odds with a
    95% interval) from a joint reduce of the domain and baseline corpora (``corpora``:
    default the only reduce; ``params.domain``/``baseline`` default to its two corpora
    when one of them is given)."""
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or SpecificityParams()
    model = model_name(model)
    corpora = atlas_corpora(lake, model, corpora)
    domain, baseline = params.domain, params.baseline
    if len(corpora) == 2 and bool(domain) != bool(baseline):
        domain = domain or next(c for c in corpora if c != baseline)
        baseline = baseline or next(c for c in corpora if c != domain)
    if not domain or not baseline:
        raise CircuitAtlasError(f"say which of {', '.join(corpora)} is the domain and "
                                "which the baseline (--domain, --baseline)")
    rows = write_specificity(lake, model, corpora, domain, baseline)
    return SpecificityReport("+".join(sorted(corpora)), domain, baseline, rows)
