"""The CLI: help everywhere, no heavy imports for --help, one-line errors, the demo."""

import json
import os
import re
import subprocess
import sys

import click
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas import machine
from circuit_atlas.cli import cli


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [p for p, _ in all_commands(cli)], ids=" ".join)
def test_every_command_has_help(path):
    command = dict(all_commands(cli))[path]
    assert command.help and command.help.strip(), f"{' '.join(path)} has no help text"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"option {param.opts} of {' '.join(path)} has no help"


def test_help_imports_neither_torch_nor_dask():
    code = ("import sys; from circuit_atlas.cli import cli; import circuit_atlas.lake\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'dask', 'distributed', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_demo_then_lake_info_lists_the_demo_corpora(tmp_path, demo_run):
    import shutil

    runner = CliRunner()
    lake = str(tmp_path / "demo-lake")
    shutil.copytree(demo_run[0], lake)
    output = demo_run[1]
    # the machine first, the time of every stage last
    assert machine.cpu_model() in output.split("\n", 3)[1]
    table = output[output.index("time per stage"):]
    for stage in ("graphs", "activations", "reduce", "projections", "effects",
                  "cooccurrence", "cluster", "interventions", "label prompts",
                  r"label, score \(embedded LLM\)", "trace", "total"):
        assert re.search(rf"│ {stage}\s+│ \d+\.\d", table), stage
    # every neuron has exemplars: the profile shows them marked, the label prompts carry
    # them (input pass) and the next tokens at them (output pass)
    shown = runner.invoke(cli, ["profile", "L29/N66", "--lake", lake])
    assert shown.exit_code == 0, shown.output
    assert "top exemplars" in shown.output and "<<" in shown.output
    assert "activation over" in shown.output
    from circuit_atlas.lake import Lake

    # the causal battery ran on a neuron and modules, and its profile says what it found
    assert "necessity" in output and "sufficiency" in output
    causal = Lake(lake).table("neuron_causal").collect()
    assert set(causal["unit_kind"]) == {"neuron", "module"}
    for module in causal.filter(pl.col("unit_kind") == "module").iter_rows(named=True):
        path = module["unit"].split(":", 1)[1]  # its members, counted by SQL
        count = Lake(lake).sql(
            "SELECT count(*) AS n FROM cluster_assignments WHERE method = 'infomap' AND "
            f"(cluster_path = '{path}' OR cluster_path LIKE '{path}:%')")["n"][0]
        assert module["members"] == count
    first = causal.filter(pl.col("unit_kind") == "neuron").row(0, named=True)
    shown = runner.invoke(cli, ["profile", first["unit"], "--lake", lake])
    assert "causal over 3 prompts: necessity" in shown.output, shown.output

    prompts = Lake(lake).table("label_prompts").collect()
    by_pass = {p: prompts.filter(pl.col("pass") == p)["user_message"] for p in ("input", "output")}
    assert by_pass["input"].str.contains("Contexts where it fires most").all()
    assert by_pass["output"].str.contains("the model predicts next").any()
    assert set(prompts["layer"]) == {29}  # the last layer's, in the demo
    # the report pages of the labelled neuron, the medical one and three in most graphs
    assert "neuron report pages" in output
    pages = [f for f in os.listdir(os.path.join(lake, "reports")) if f != "index.html"]
    assert 3 <= len(pages) <= 5 and os.path.exists(os.path.join(lake, "reports", "index.html"))
    traced = json.load(open(os.path.join(lake, "trace.json"), encoding="utf-8"))  # noqa: SIM115
    assert "supernode_grouping" in traced["metadata"] and "grouped by the atlas" in output
    page = open(os.path.join(lake, "clusters.html"), encoding="utf-8").read()  # noqa: SIM115
    assert '"exemplar":["' in page and "<<" in page  # the viewer shows where neurons fire
    info = runner.invoke(cli, ["lake", "info", "--lake", lake])
    assert info.exit_code == 0 and "medical" in info.output and "general" in info.output
    data = json.loads(runner.invoke(cli, ["lake", "info", "--lake", lake, "--json"]).output)
    assert data["corpora"]["medical"]["prompts"] >= 30
    assert data["corpora"]["general"]["prompts"] >= 30
    # the demo is re-runnable and adds nothing the second time (the wiring, on the same
    # weights and exemplar windows, is kept)
    rerun = runner.invoke(cli, ["demo", "--lake", lake, "--limit", "1", "--label-neurons",
                                "0"])
    assert rerun.exit_code == 0, rerun.output
    assert "up to date: kept" in " ".join(rerun.output.split())
    again = json.loads(runner.invoke(cli, ["lake", "info", "--lake", lake, "--json"]).output)
    assert again["corpora"] == data["corpora"]
    listed = runner.invoke(cli, ["prompts", "list", "--lake", lake, "--corpus", "medical",
                                 "--limit", "0", "--json"])
    rows = json.loads(listed.output)
    assert len(rows) == data["corpora"]["medical"]["prompts"]
    assert all(r["domain"] == "medical" for r in rows)


def test_lake_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_ATLAS_LAKE", str(tmp_path / "envlake"))
    result = CliRunner().invoke(cli, ["lake", "init"])
    assert result.exit_code == 0 and (tmp_path / "envlake" / "_lake.json").exists()


def test_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["lake", "info", "--lake", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path}: not a circuit-atlas lake (no _lake.json); "
        f"create one with: circuit-atlas lake init --lake {tmp_path}"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- [unclosed\n")
    good = tmp_path / "good.txt"
    good.write_text("fine prompt\n")
    lake = str(tmp_path / "l")
    result = runner.invoke(cli, ["prompts", "import", str(good), str(bad), "--corpus", "c",
                                 "--lake", lake])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{bad}: not valid YAML" in result.output
    # a bad file in the batch leaves the lake untouched
    assert not (tmp_path / "l").exists()
    runner.invoke(cli, ["lake", "init", "--lake", lake])
    result = runner.invoke(cli, ["prompts", "list", "--lake", lake, "--corpus", "nope"])
    assert result.exit_code == 1 and "unknown corpus 'nope'" in result.output


def test_cleanup_command(tmp_path):
    from circuit_atlas.lake import Lake

    lake = Lake.init(tmp_path / "l")
    writer = lake.open_shard("m", "c", params={})
    result = CliRunner().invoke(cli, ["lake", "cleanup", "--lake", lake.url, "--min-age", "0",
                                      "--dry-run"])
    assert result.exit_code == 0 and "would remove" in result.output
    assert os.path.exists(writer.marker)
    result = CliRunner().invoke(cli, ["lake", "cleanup", "--lake", lake.url, "--min-age", "0"])
    assert "removed 1 item(s)" in result.output and not os.path.exists(writer.marker)


def test_doctor_reports_this_machine_and_what_auto_picks():
    from circuit_atlas.compute.precision import STAGES, auto_dtype, probe_bf16

    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["cpu"]["model"] == machine.cpu_model()
    cpu = report["torch"]["devices"]["cpu"]
    assert cpu["auto_dtype"] == {s: auto_dtype("cpu", s) for s in STAGES}
    assert cpu["bf16_fast"] == probe_bf16("cpu").fast
    assert report["packages"]["torch"].startswith("2.")
    assert report["models"]["embedded_gguf"].endswith(".gguf")
    text = CliRunner().invoke(cli, ["doctor"]).output
    for what in ("cpu flags", "auto dtype", "model cache", "slurm", "chromium"):
        assert what in text
