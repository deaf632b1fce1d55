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
    "selfreport": ["--windows", "10", "--context", "16", "--epochs", "2", "--strategies",
                   "head,last:1"],
}  # graphs, projections, wiring, effects, interventions, activations: through bench/gpu.py


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_and_names_the_machine(script, tmp_path):
    argv = SMOKE[script] + (["--dir", str(tmp_path)] if script == "reduce" else [])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"),
                             *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core(s)" in result.stdout  # machine.describe(): every figure names its CPU


def test_the_gpu_script_runs_every_step_on_the_cpu(tmp_path):
    """bench/gpu.py --tiny: every check within its limit, every benchmark run, and the
    summary written in the results' format with the targets table."""
    import json

    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--tiny",
                             "--out", str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    checks = json.loads((tmp_path / "checks.json").read_text())
    kinds = {r["check"].split(" as ")[0].split(":")[0] for r in checks}
    assert {"forward = HF logits", "graph completeness", "graph edges = autograd",
            "projections", "wiring", "exemplars", "effects", "interventions"} <= kinds
    assert all(r["ok"] for r in checks)
    assert {r["model"] for r in checks} >= {"llama", "olmo3", "qwen2", "2-layer tiny"}
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## GPU checks and benchmarks") and "core(s)" in summary
    for bench in ("graphs", "projections", "wiring", "effects", "interventions",
                  "activations"):
        assert f"| {bench} | `python bench/" in summary and f"### {bench}" in summary
    assert "| ok |" in summary and "failed" not in summary.split("| target |")[0]
    assert "graphs <= 0.4 s per graph" in summary
    assert "phases: forward+relevance" in (tmp_path / "profile.txt").read_text()


def test_the_gpu_checks_catch_a_wrong_forward_and_a_raising_path():
    """A model whose weights differ from the float64 reference fails the comparison
    with it (while agreeing with its own Hugging Face logits), and a check that raises,
    as a device mismatch would, is recorded as failed instead of stopping the run."""
    import copy

    import torch

    from bench.gpu import Checks, check_forward
    from tests.factories import tiny_llama

    model64 = tiny_llama(seed=1)
    wrong = copy.deepcopy(model64).float()
    with torch.no_grad():
        wrong.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    c = Checks()
    check_forward(c, "llama", model64, wrong, ids, "float32")
    same, vs64 = c.rows
    assert same["ok"] and not vs64["ok"]

    def boom():
        raise RuntimeError("Expected all tensors to be on the same device")

    c.guard("graph", "llama", "float32", boom)
    assert not c.rows[-1]["ok"] and "same device" in c.rows[-1]["error"]


@pytest.mark.slurm
def test_the_slurm_reduce_benchmark_cancels_a_job_and_finds_the_tables_equal(tmp_path,
                                                                              slurm):
    import json

    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "reduce_slurm.py"),
                             "--graphs", "400", "--per-shard", "50", "--dir", str(tmp_path),
                             "--cancel-at", "0.25"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert out["tables_equal"] and out["tables_rows"]["edges"] > 0
    assert len(out["slurm"]["cancelled"]) == 1 and "core(s)" in out["machine"]
