"""The self-report scanner: its histogram estimates against numpy and scipy on known
samples, the label scores it joins, and a scan of a tiny model's activation statistics
that puts the planted neurons first."""

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from scipy import stats as sps

from circuit_atlas.cli import cli
from circuit_atlas.compute.exemplars import from_positions
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.etl.exemplars import stats_table
from circuit_atlas.lake import Lake
from circuit_atlas.selfreport.params import ScanParams
from circuit_atlas.selfreport.scanner import scan

M = 4000


def samples() -> np.ndarray:
    """(M, 5): Gaussian, sparse (2% of tokens at 5), dead (always 0), Laplace, and a
    neuron that fires negative on 5% of tokens."""
    rng = np.random.default_rng(0)
    sparse = np.where(rng.random(M) < 0.02, 5.0, 0.0)
    negative = np.where(rng.random(M) < 0.05, -3.0, 0.0) + rng.normal(0, 0.01, M)
    return np.stack([rng.normal(0, 1, M), sparse, np.zeros(M), rng.laplace(0, 1, M),
                     negative], 1).astype(np.float32)


def stats_of(acts: np.ndarray) -> pl.DataFrame:
    state = from_positions(acts, np.zeros(len(acts), np.int64), np.arange(len(acts)), k=4)
    return pl.from_arrow(stats_table(0, state))


def test_estimates_agree_with_the_samples():
    acts = samples()
    got = scan(stats_of(acts), ScanParams(threshold=0.5, min_count=100)).sort("neuron")
    assert got["neuron"].to_list() == [0, 1, 3, 4]  # the dead neuron is left out
    for row in got.iter_rows(named=True):
        x = acts[:, row["neuron"]].astype(np.float64)
        peak = np.abs(x).max()
        exact_sel = float((np.abs(x) < 0.5 * peak).mean())
        # within what one histogram bin (a factor ~1.5 in |activation|) can move
        lo = float((np.abs(x) < 0.5 / 1.5 * peak).mean())
        hi = float((np.abs(x) < 0.5 * 1.5 * peak).mean())
        assert lo - 1e-9 <= row["selectivity"] <= hi + 1e-9, (row, exact_sel)
        assert row["std"] == pytest.approx(x.std(), rel=1e-6)
        assert row["kurtosis"] == pytest.approx(sps.kurtosis(x), rel=0.15, abs=0.3), row
        hoyer = (np.sqrt(M) - np.abs(x).sum() / np.sqrt((x * x).sum())) / (np.sqrt(M) - 1)
        assert row["sparsity"] == pytest.approx(hoyer, abs=0.05), row
    sparse = got.filter(pl.col("neuron") == 1).row(0, named=True)
    assert sparse["selectivity"] == pytest.approx(0.98, abs=0.01)
    assert sparse["rank"] == 0 and sparse["sparsity"] == got["sparsity"].max()


def test_label_scores_join_and_rank_order():
    acts = samples()
    scores = pl.DataFrame({"layer": [0, 0, 0], "neuron": [3, 3, 0],
                           "score": [0.9, float("nan"), 0.1]},
                          schema={"layer": pl.Int16, "neuron": pl.Int32, "score": pl.Float64})
    got = scan(stats_of(acts), ScanParams(min_count=100), scores)
    by = {r["neuron"]: r for r in got.iter_rows(named=True)}
    assert by[3]["label_score"] == pytest.approx(0.9) and by[0]["label_score"] == 0.1
    assert by[1]["label_score"] is None
    assert got["rank"].to_list() == list(range(len(got)))
    assert (got["score"].diff().drop_nulls() <= 0).all()
    assert len(scan(stats_of(acts), ScanParams(min_count=100, top=2))) == 2
    with pytest.raises(CircuitAtlasError, match="--min-count"):
        scan(stats_of(acts), ScanParams(min_count=M + 1))
    with pytest.raises(CircuitAtlasError, match="--threshold"):
        ScanParams(threshold=1.5)


def test_the_planted_neurons_come_first(planted):
    lake = Lake(planted[1])
    result = CliRunner().invoke(cli, ["self-report", "scan", "--lake", planted[1],
                                      "--model", "tiny", "--top", "20"])
    assert result.exit_code == 0, result.output
    assert "self-report scan c:" in result.output
    table = lake.table("selfreport_candidates", "tiny", "c").sort("rank").collect()
    top = {(r["layer"], r["neuron"]) for r in table.head(4).iter_rows(named=True)}
    assert top == {(1, 7), (1, 9), (1, 11), (1, 13)}
    assert len(table) == 20


def test_a_lake_without_activation_statistics_is_refused(tmp_path):
    Lake.init(tmp_path / "lake")
    result = CliRunner().invoke(cli, ["self-report", "scan", "--lake", str(tmp_path / "lake")])
    assert result.exit_code == 1 and "circuit-atlas activations" in result.output
