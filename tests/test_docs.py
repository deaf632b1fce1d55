"""The README is tested: its commands run, and CI runs exactly its test command."""

import os
import re
import subprocess
import sys

from click.testing import CliRunner

from circuit_atlas.cli import cli

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


def test_readme_tour_runs(tmp_path):
    (tour,) = blocks("console")
    commands = [ln[2:] for ln in tour.splitlines() if ln.startswith("$ ")]
    assert any(c.startswith("circuit-atlas") for c in commands)
    script = "\n".join(["set -euo pipefail"] + [
        c for c in commands if c != "source .venv/bin/activate"])
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("CIRCUIT_ATLAS_LAKE", None)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 new prompt(s)" in result.stdout and "0 new prompt(s)" in result.stdout
    assert "general" in result.stdout


def test_readme_python_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["demo", "--lake", "demo-lake", "--limit", "1"]).exit_code == 0
    for block in blocks("python"):
        exec(compile(block, "README.md", "exec"), {})
