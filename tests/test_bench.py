"""The benchmarks still run, each on a tiny input, and their own checks hold: the
reduce's edge table equals DuckDB's, the lake's reads return every row written, the
Parquet options round-trip the data, every commit lands as three files. Their figures
are not checked here (bench/RESULTS.md holds those, measured at full size)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = {
    "lake_format": ["--commits", "30", "--every", "15", "--format", "ours"],
    "lake_io": ["--graphs", "40", "--graphs-per-shard", "20", "--edges-per-graph", "10",
                "--repeat", "1"],
    "parquet_options": ["--rows", "2000", "--repeat", "1"],
    "reduce": ["--graphs", "400", "--per-shard", "200", "--workers", "1"],
    "scoring": ["--neurons", "4", "--concurrency", "4"],
    "interventions": ["--prompts", "1", "--neurons", "30", "--naive", "2"],
    "wiring": ["--model", "tiny"],
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_and_names_the_machine(script, tmp_path):
    argv = SMOKE[script] + (["--dir", str(tmp_path)] if script == "reduce" else [])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"),
                             *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core(s)" in result.stdout  # machine.describe(): every figure names its CPU
