"""The README is tested: its commands run, and CI runs exactly its test command."""

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()  # noqa: SIM115


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    setup_demo, setup_test = (b.strip() for b in blocks("bash")[:2])
    assert setup_demo.startswith("bash scripts/setup &&") and " demo " in setup_demo
    assert setup_test.startswith("bash scripts/setup --dev &&")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert ci_lines[-1] == setup_test


@dataclass
class Console:
    returncode: int
    stdout: str
    stderr: str


def run_console(block: str, cwd, monkeypatch) -> Console:
    """The ``$ `` lines of a console block in order, stopping at the first that fails: a
    plain ``circuit-atlas`` line through the CLI's own entry point in this process (a
    new interpreter per line would spend most of the test importing torch), ``export``
    into the environment, anything else (pipes, printf, python -c) through bash."""
    import shlex

    from click.testing import CliRunner

    from circuit_atlas.cli import cli

    commands = [ln[2:] for ln in block.splitlines() if ln.startswith("$ ")]
    assert any(c.startswith("circuit-atlas") for c in commands)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CIRCUIT_ATLAS_LAKE", raising=False)
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    out, err = [], []
    for c in commands:
        if c == "source .venv/bin/activate":
            continue
        if c.startswith("export "):
            name, _, value = c[len("export "):].partition("=")
            monkeypatch.setenv(name, value)
            continue
        if c.startswith("circuit-atlas ") and not set(c) & set("|><;&$`"):
            result = CliRunner().invoke(cli, shlex.split(c)[1:], catch_exceptions=True)
            code, so, se = result.exit_code, result.stdout, result.stderr
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                import traceback

                se += "".join(traceback.format_exception(result.exception))
        else:
            done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{c}"], cwd=cwd,
                                  capture_output=True, text=True)
            code, so, se = done.returncode, done.stdout, done.stderr
        out.append(so)
        err.append(se)
        if code != 0:
            return Console(code, "".join(out), "".join(err) + f"\n(failed: $ {c})")
    return Console(0, "".join(out), "".join(err))


def test_readme_tour_runs(tmp_path, monkeypatch):
    tour = blocks("console")[0]
    result = run_console(tour, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 new prompt(s)" in result.stdout and "0 new prompt(s)" in result.stdout
    assert "general" in result.stdout


def test_readme_python_and_atlas_commands_run_on_the_demo_lake(tmp_path, monkeypatch,
                                                               demo_run):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_run[0], tmp_path / "demo-lake")
    assert "clusters.html" in demo_run[1] and "circuit-atlas sql" in demo_run[1]
    names: dict = {}
    for block in blocks("python"):
        exec(compile(block, "README.md", "exec"), names)
    # the Dask batch job's answer, from polars
    import polars as pl

    from circuit_atlas import open_lake

    expected = (open_lake("demo-lake").table("edges")
                .filter(pl.col("tgt_layer") > pl.col("src_layer") + 1)
                .group_by("tgt_layer").agg(pl.col("weight_abs_sum").sum()).collect())
    got = dict(zip(names["skip_weight"].index, names["skip_weight"].to_numpy(), strict=True))
    assert len(got) == expected.height > 0
    for layer, total in expected.iter_rows():
        assert got[layer] == pytest.approx(total, rel=1e-9)
    for block in blocks("console")[1:]:  # the commands that use the demo lake
        result = run_console(block, tmp_path, monkeypatch)
        assert result.returncode == 0, result.stdout + result.stderr
