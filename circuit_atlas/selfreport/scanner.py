"""Which neurons are worth reporting: a ranking from the activation statistics.

A neuron is a good self-report target when there is something to report: its
activation varies (``std``); it is quiet on most tokens and strong on few
(``sparsity``, Hoyer's measure (sqrt(n) - L1/L2) / (sqrt(n) - 1) of its tokens'
|activation|: 1 for one token, 0 for all alike; a neuron at exactly 0 but on its
trigger scores about 1 - sqrt(the trigger's share)); its distribution is heavy-tailed
(``kurtosis``, excess); and, where its label has been scored, the label holds
(``label_score``: the mean of its scorers' headline scores). ``selectivity``, the share
of tokens whose |activation| stays below ``threshold`` of its largest, is kept beside
them but not ranked on: one outlier token makes any neuron selective by it. Sparsity,
selectivity and kurtosis are read off the activation histogram (geometric bins, each
~1.5x the last; see ``compute.exemplars``), each bin taken at its midpoint and the two
open tails at the neuron's min and max: estimates to within a bin, not exact moments.
``score`` is the mean of the criteria's percentile ranks among the neurons scanned (a
criterion a neuron lacks is left out of its mean), and ``rank`` orders by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from circuit_atlas.compute.exemplars import BIN_EDGES
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.selfreport.params import ScanParams
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

CRITERIA = ("std", "sparsity", "kurtosis", "label_score")


def bin_values(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(n, B) representative value of each histogram bin for neurons whose activations
    span ``lo`` .. ``hi``: finite bins at their midpoint, clipped into the span; the open
    tails at the span's ends."""
    inner = (BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2
    mid = np.concatenate([[-np.inf], inner, [np.inf]])
    return np.clip(mid[None, :], lo[:, None], hi[:, None])


def histogram_shape(hist: np.ndarray, lo: np.ndarray, hi: np.ndarray, threshold: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selectivity, Hoyer sparsity, excess kurtosis) per neuron from its histogram
    ``hist`` (n, B)."""
    hist = hist.astype(np.float64)
    total = hist.sum(1)
    x = bin_values(lo.astype(np.float64), hi.astype(np.float64))
    peak = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    active = (np.abs(x) >= threshold * peak[:, None]) & (peak[:, None] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        selectivity = 1 - (hist * active).sum(1) / total
        mean = (hist * x).sum(1) / total
        d = x - mean[:, None]
        var = (hist * d**2).sum(1) / total
        kurtosis = (hist * d**4).sum(1) / total / var**2 - 3
        l1, l2 = (hist * np.abs(x)).sum(1), np.sqrt((hist * x * x).sum(1))
        root = np.sqrt(total)
        sparsity = (root - l1 / l2) / (root - 1)
    kurtosis[~(var > 0)] = np.nan
    sparsity[~(l2 > 0) | ~(total > 1)] = np.nan
    return selectivity, sparsity, kurtosis


def percentile_rank(values: pl.Series) -> pl.Series:
    """Each value's rank among the non-null ones, scaled to 0..1 (ties averaged)."""
    n = values.drop_nulls().len()
    return (values.rank("average") - 1) / max(n - 1, 1)


def scan(stats: pl.DataFrame, params: ScanParams, label_scores: pl.DataFrame | None = None
         ) -> pl.DataFrame:
    """The candidates of one corpus's ``activation_stats`` rows, best first, with each
    criterion, its percentile rank's mean (``score``) and ``rank``; ``label_scores``
    (layer, neuron, score) where labels were scored."""
    rows = stats.filter((pl.col("count") >= params.min_count) & (pl.col("std") > 0))
    if rows.is_empty():
        raise CircuitAtlasError(f"no neuron has a varying activation over at least "
                                f"{params.min_count} tokens (--min-count)")
    hist = np.stack(rows["hist"].to_numpy())
    selectivity, sparsity, kurtosis = histogram_shape(
        hist, rows["min"].to_numpy(), rows["max"].to_numpy(), params.threshold)
    out = rows.select("layer", "neuron", "count", "std").with_columns(
        selectivity=pl.Series(selectivity), sparsity=pl.Series(sparsity).fill_nan(None),
        kurtosis=pl.Series(kurtosis).fill_nan(None))
    if label_scores is not None and not label_scores.is_empty():
        means = label_scores.group_by("layer", "neuron").agg(
            label_score=pl.col("score").drop_nans().mean())
        out = out.join(means, on=["layer", "neuron"], how="left")
    else:
        out = out.with_columns(label_score=pl.lit(None, pl.Float64))
    ranks = [percentile_rank(out[c]) for c in CRITERIA]
    score = pl.DataFrame(ranks).mean_horizontal()
    out = out.with_columns(score=score).sort(["score", "layer", "neuron"],
                                             descending=[True, False, False])
    out = out.with_columns(rank=pl.int_range(pl.len(), dtype=pl.Int32))
    return out.head(params.top) if params.top else out


@dataclass
class ScanReport(Report):
    corpus: str
    scanned: int
    kept: int
    best: str

    def __str__(self) -> str:
        return (f"self-report scan {self.corpus}: {self.scanned:,} neurons ranked, "
                f"{self.kept:,} kept; best {self.best}")


def run_scan(lake, *, model, corpora=None, params: ScanParams | None = None, cluster=None,
             progress: Progress | None = None) -> ScanReport:
    """Rank the neurons of a corpus's activation statistics as self-report targets and
    write the ``selfreport_candidates`` table (``corpora``: one corpus with an
    activations run; default the only one)."""
    from circuit_atlas.lake.neurons import neuron_label
    from circuit_atlas.lake.schemas import SELFREPORT_CANDIDATES
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or ScanParams()
    model = model_name(model)
    corpus = one_activation_corpus(lake, model, corpora)
    stats = lake.table("activation_stats", model, corpus).collect()
    table = scan(stats, params, label_scores(lake, model, corpus))
    version = lake.new_table_version(model, corpus, "selfreport_candidates")
    name = version.write("candidates.parquet", table.to_arrow(), SELFREPORT_CANDIDATES)
    version.publish([name], {"params": {"threshold": params.threshold,
                                        "min_count": params.min_count, "top": params.top},
                             "model": model})
    best = table.row(0, named=True)
    return ScanReport(corpus, len(stats), len(table),
                      f"{neuron_label(best['layer'], best['neuron'])} (score "
                      f"{best['score']:.2f})")


def label_scores(lake, model: str, corpus: str) -> pl.DataFrame | None:
    """(layer, neuron, score) of the labels scored in every reduce that holds ``corpus``
    (labels live under the reduce's key, such as general+medical)."""
    from circuit_atlas.lake.derived import table_logs

    keys = [c for _, c in table_logs(lake, "label_scores", model) if corpus in c.split("+")]
    if not keys:
        return None
    return pl.concat([lake.table("label_scores", model, key).filter(pl.col("status") == "ok")
                      .select("layer", "neuron", "score").collect() for key in keys])


def one_activation_corpus(lake, model: str, corpora) -> str:
    """The corpus whose activation statistics a self-report step reads."""
    from circuit_atlas.lake.derived import table_logs
    from circuit_atlas.lake.layout import model_key

    corpora = as_corpora(corpora)
    have = sorted(c for m, c in table_logs(lake, "activation_stats", model)
                  if m == model_key(model))
    if not have:
        raise CircuitAtlasError(f"no activation statistics for {model!r}; run: "
                                "circuit-atlas activations --corpus C")
    if not corpora:
        if len(have) > 1:
            raise CircuitAtlasError(f"several corpora have activation statistics "
                                    f"({', '.join(have)}): pick one with --corpus")
        return have[0]
    if len(corpora) > 1 or corpora[0] not in have:
        raise CircuitAtlasError(f"give one corpus with activation statistics "
                                f"({', '.join(have)}), not {', '.join(corpora)}")
    return corpora[0]
