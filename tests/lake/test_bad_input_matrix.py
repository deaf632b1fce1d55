"""Every kind of stored table, broken every way, under every command that reads it:
exit status 1, one line naming the file and what is wrong, no traceback, nothing
written. A demo lake is built once; each case breaks one file, runs one command and
puts the file back."""

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.lake import Lake

SQL = ["sql", "SELECT count(*) FROM {table}"]
PROFILE = ["profile", "{neuron}"]
LABEL = ["label", "--dry-run", "--pass", "output", "--layer", "29"]
DUCKDB = ["export", "duckdb", "{out}/atlas.duckdb"]
# each table, and the commands that read it (beyond sql, which reads every table)
READERS = {
    "prompts": [["lake", "info"], ["prompts", "list"]],
    "graphs": [["export-graph", "--corpus", "medical", "--prompt-id", "{prompt}",
                "-o", "{out}/g.json"]],
    "graph_nodes": [["export-graph", "--corpus", "medical", "--prompt-id", "{prompt}",
                     "-o", "{out}/g.json"]],
    "graph_edges": [["export-graph", "--corpus", "medical", "--prompt-id", "{prompt}",
                     "-o", "{out}/g.json"]],
    "edges": [PROFILE, LABEL, DUCKDB],
    "neurons": [PROFILE, LABEL, DUCKDB],
    "neuron_corpora": [PROFILE],
    "neuron_tokens": [PROFILE, LABEL],
    "projections": [PROFILE, LABEL],
    "neuron_effects": [PROFILE, LABEL],
    "effects": [],
    "cooccurrence": [PROFILE, LABEL],
    "specificity": [PROFILE, LABEL],
    "roles": [PROFILE],
    "cluster_assignments": [PROFILE, DUCKDB],
    "clusters": [DUCKDB],
    "label_prompts": [],
    "exemplars": [PROFILE],
    "exemplar_windows": [PROFILE],
    "activation_stats": [PROFILE],
    "activation_samples": [],
    "token_activations": [PROFILE],
}


def truncated(path):
    data = open(path, "rb").read()  # noqa: SIM115
    open(path, "wb").write(data[: len(data) // 2])  # noqa: SIM115


def not_parquet(path):
    open(path, "w").write("layer,neuron\n1,2\n")  # noqa: SIM115


def wrong_schema(path):
    pq.write_table(pa.table({"something": [1, 2]}), path)


def missing_column(path):
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([table.column_names[0]]), path)


def empty(path):
    open(path, "wb").close()  # noqa: SIM115


def gone(path):
    os.remove(path)


BREAKS = {"truncated": (truncated, "truncated or corrupt"),
          "not parquet": (not_parquet, "not a readable Parquet file"),
          "wrong schema": (wrong_schema, "missing column"),
          "missing column": (missing_column, "missing column"),
          "empty file": (empty, "not a readable Parquet file"),
          "a commit naming a missing file": (gone, "missing")}
# the tables of the activations stage go through the same readers and checks: the
# breaks that reach each check once (bytes, schema, a missing file) are enough there
ACTIVATION_TABLES = ("exemplars", "exemplar_windows", "activation_stats",
                     "activation_samples", "token_activations")
ACTIVATION_BREAKS = ("truncated", "wrong schema", "a commit naming a missing file")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_run):
    root = tmp_path_factory.mktemp("matrix")
    shutil.copytree(demo_run[0], root / "lake")
    lake = Lake(root / "lake")
    for extra in ("clusters.html", "atlas.duckdb"):
        os.remove(lake.path(extra))
    neurons = lake.table("neurons").filter(__import__("polars").col("layer") == 29).collect()
    prompt = lake.table("graphs", corpus="medical").collect()["prompt_id"][0]
    return lake, f"L29/N{neurons['neuron'][0]}", prompt


def cases():
    for table, readers in READERS.items():
        for kind in ACTIVATION_BREAKS if table in ACTIVATION_TABLES else BREAKS:
            for command in [SQL, *readers]:
                yield pytest.param(table, kind, command,
                                   id=f"{table}-{kind.replace(' ', '_')}-{command[0]}")


def listing(root: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize(("table", "kind", "command"), list(cases()))
def test_broken_file_stops_the_command_with_one_line(demo, tmp_path, table, kind, command):
    lake, neuron, prompt = demo
    victim = lake.files(table)[0]
    keep = tmp_path / "original"
    shutil.copy2(victim, keep)
    before = listing(lake.root)
    args = [a.format(table=table, neuron=neuron, prompt=prompt, out=tmp_path)
            for a in command]
    scope = ["--lake", lake.url] if args[0] not in ("lake", "prompts", "export") else []
    if args[0] in ("lake", "prompts"):
        args = [*args, "--lake", lake.url]
    elif args[0] == "export":
        args = [*args[:2], "--lake", lake.url, *args[2:]]
    try:
        BREAKS[kind][0](victim)
        result = CliRunner().invoke(cli, [*args, *scope])
    finally:
        shutil.copy2(keep, victim)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert os.path.basename(victim) in lines[0] and BREAKS[kind][1] in lines[0], lines[0]
    assert listing(lake.root) == before, "the command wrote to the lake"
    assert not (tmp_path / "atlas.duckdb").exists() and not (tmp_path / "g.json").exists()
