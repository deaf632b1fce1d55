"""The label report: its numbers equal numpy over the same scores (newest ok score of
each label and scorer only), its plots are PNG files the page shows, and the command
says what is missing when nothing is scored."""

import datetime as dt

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.report import scored_labels, summarise, write_report
from circuit_atlas.lake import Lake
from circuit_atlas.lake.derived import add_part
from circuit_atlas.lake.labels import append_labels
from circuit_atlas.lake.schemas import LABEL_SCORES, LABELS

RATING = ("low", "medium", "high")
TYPES = ("token-pattern", "context")


def frame(rows: list[dict], spec) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=pl.from_arrow(spec.schema.empty_table()).schema)


@pytest.fixture
def lake(tmp_path):
    rng = np.random.default_rng(0)
    lake = Lake.init(tmp_path / "lake")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    labels, scores = [], []
    for i in range(40):
        layer, rating, kind = i % 4, RATING[i % 3], TYPES[i % 2]
        label = f"label {i}"
        labels.append({"layer": layer, "neuron": i, "pass": "input", "label": label,
                       "description": "d", "type": kind, "interpretability": rating,
                       "labeler": "x", "prompt_hash": "h", "status": "ok", "error": None,
                       "created_at": t0.isoformat()})
        for j, scorer in enumerate(("detection", "fuzzing", "simulation")):
            base = {"layer": layer, "neuron": i, "pass": "input", "polarity": 1,
                    "label": label, "labeler": "x", "scorer": scorer, "scorer_model": "s",
                    "metrics": "{}", "positives": 5, "negatives": 5, "hard_negatives": 2,
                    "prompt_hash": "p", "error": None}
            # an older score, a failed one: neither counts
            scores.append({**base, "score": 0.0, "status": "ok",
                           "created_at": (t0 + dt.timedelta(seconds=j)).isoformat()})
            scores.append({**base, "score": None, "status": "failed",
                           "created_at": (t0 + dt.timedelta(days=2)).isoformat()})
            scores.append({**base, "score": float(rng.uniform(0.3, 1.0)), "status": "ok",
                           "created_at": (t0 + dt.timedelta(days=1)).isoformat()})
    append_labels(lake, "m", "c", frame(labels, LABELS))
    add_part(lake, "m", "c", "label_scores", "batch-1.parquet",
             frame(scores, LABEL_SCORES).to_arrow(), {"model": "m"})
    return lake, pl.DataFrame(scores).filter(
        (pl.col("status") == "ok") & pl.col("created_at").str.contains("01-02"))


def test_numbers_equal_numpy_over_the_newest_ok_scores(lake):
    lake, newest = lake
    rows = scored_labels(lake, "m", "c")
    assert len(rows) == 120
    s = summarise(rows)
    for scorer in ("detection", "fuzzing", "simulation"):
        mine = newest.filter(pl.col("scorer") == scorer)
        got = s.overall.filter(pl.col("scorer") == scorer)
        assert got["count"].item() == 40
        assert got["mean"].item() == pytest.approx(mine["score"].to_numpy().mean())
        for layer in range(4):
            want = mine.filter(pl.col("layer") == layer)["score"].to_numpy()
            row = s.by_layer.filter((pl.col("scorer") == scorer) & (pl.col("layer") == layer))
            assert row["mean"].item() == pytest.approx(want.mean())
            assert row["sem"].item() == pytest.approx(want.std(ddof=1) / np.sqrt(len(want)))
        for i, rating in enumerate(RATING):
            want = mine.filter(pl.col("neuron") % 3 == i)["score"].to_numpy()
            row = s.by_rating.filter((pl.col("scorer") == scorer)
                                     & (pl.col("interpretability") == rating))
            assert row["mean"].item() == pytest.approx(want.mean())


def test_the_command_writes_the_page_and_its_plots(lake, tmp_path):
    lake, _ = lake
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", "labels", "--lake", str(lake.root),
                                      "--model", "m", "--corpus", "c", "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    for name in ("scores.png", "by_layer.png", "by_type.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"src='{name}'" in page
    assert "40 labels, 120 scores" in page and "Calibration" in page
    assert str(out / "index.html") in result.output


def test_no_scores_is_a_clear_error(tmp_path):
    lake = Lake.init(tmp_path / "lake")
    with pytest.raises(CircuitAtlasError, match="circuit-atlas score"):
        scored_labels(lake, "m", "c")
    with pytest.raises(CircuitAtlasError, match="no ok label scores"):
        write_report(pl.DataFrame(), tmp_path / "out", "t")
