"""A lake written in format 1 (its layout built here file by file) migrates to format 2
with every prompt, graph and table row kept; the next reduce equals one from scratch."""

import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.lake import Lake, LakeError, ShardWriter, layout, params_hash, prompt_id
from tests.factories import MODEL, PARAMS, SHAPE, graph_tables, prompts_of

KEY = layout.model_key(MODEL)
OLD = {"neuron": "index", "src_neuron": "src_index", "tgt_neuron": "tgt_index"}


def old_file(table: pa.Table, name: str, path) -> None:
    """``table`` as format 1 wrote it: neuron columns called index, tagged version 1."""
    renamed = table.rename_columns([OLD.get(c, c) for c in table.column_names])
    meta = {b"circuit_atlas.table": name.encode(), b"circuit_atlas.schema_version": b"1"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(renamed.replace_schema_metadata(meta), path)


def format_one_lake(root) -> dict:
    """Prompts, two committed shards, one shard without a commit, a neurons table."""
    (root / "_lake.json").parent.mkdir(parents=True)
    (root / "_lake.json").write_text(json.dumps(
        {"format": "circuit-atlas-lake", "format_version": 1, "created_by": "old"}))
    texts = prompts_of(7)
    pq.write_table(pa.table({"prompt_id": [prompt_id(t) for t in texts], "text": texts,
                             "domain": pa.array([None] * 7, pa.string()), "source": ["f"] * 7,
                             "meta": pa.array([None] * 7, pa.string())}),
                   (root / "prompts/corpus=c").mkdir(parents=True) or
                   root / "prompts/corpus=c/part-0001.parquet")
    written = {}
    for i, group in enumerate((texts[:3], texts[3:])):
        tables = graph_tables(np.random.default_rng(i), group)
        shard = f"2026010{i}T000000-abc{i}"
        d = root / f"graphs/model={KEY}/corpus=c/shard={shard}"
        pq.write_table(tables["graphs"], (d.mkdir(parents=True) or d / "graphs.parquet"))
        old_file(tables["graph_nodes"], "nodes", d / "nodes.parquet")
        old_file(tables["graph_edges"], "edges", d / "edges.parquet")
        (d / "_COMMIT.json").write_text(json.dumps({
            "format": "circuit-atlas-shard",
            "schema_versions": {"graphs": 1, "nodes": 1, "edges": 1},
            "rows": {"graphs": len(group), "nodes": tables["graph_nodes"].num_rows,
                     "edges": tables["graph_edges"].num_rows},
            "bytes": {}, "model": MODEL, "model_key": KEY, "model_revision": "r1",
            "model_shape": SHAPE, "corpus": "c", "shard": shard, "code_version": "0",
            "params": PARAMS, "params_hash": params_hash(PARAMS),
            "prompt_ids": [prompt_id(t) for t in group],
            "committed_at": f"2026-01-0{i + 1}T00:00:00+00:00"}))
        written[shard] = tables
    (root / f"graphs/model={KEY}/corpus=c/shard=killed/nodes.parquet").parent.mkdir()
    neurons = root / f"tables/model={KEY}/corpus=c/neurons"
    stats = pa.table({"layer": pa.array([0, 1], pa.int16()), "index": pa.array([5, 7], pa.int32()),
                      **{c: pa.array([1, 2], pa.int64()) for c in ("graph_count",
                                                                   "position_count")},
                      **{c: pa.array([0.5, 0.25]) for c in (
                          "activation_mean", "activation_sq_sum", "score_mean",
                          "score_abs_mean", "score_sq_sum")},
                      **{c: pa.array([1.0, 2.0], pa.float32()) for c in (
                          "activation_max", "score_max")}})
    old_file(stats.rename_columns([c if c != "index" else "neuron" for c in stats.column_names]),
             "neurons", neurons / "v-1/neurons.parquet")
    old_file(stats.slice(0, 1).rename_columns(
        [c if c != "index" else "neuron" for c in stats.column_names]), "neurons",
        neurons / "v-0/neurons.parquet")  # superseded, left behind
    (neurons / "v-1/_state").mkdir()
    (neurons / "_MANIFEST.json").write_text(json.dumps({
        "format": "circuit-atlas-table", "table": "neurons", "version": "v-1",
        "files": ["v-1/neurons.parquet"], "schema_version": 1, "code_version": "0",
        "published_at": "2026-01-03T00:00:00+00:00",
        "inputs": {"shards": ["c/a", "c/b"], "params": {}, "state": ["v-1/_state/x"],
                   "model": MODEL, "model_shape": SHAPE}}))
    return written


def test_a_format_one_lake_migrates_with_every_row(tmp_path):
    root = tmp_path / "old"
    written = format_one_lake(root)
    with pytest.raises(LakeError, match="lake format version 1.*lake migrate"):
        Lake(root)
    out = CliRunner().invoke(cli, ["lake", "migrate", "--lake", str(root)])
    assert out.exit_code == 0, out.output
    assert "1 prompt part(s), 2 shard(s), 1 table(s); removed 2" in out.output
    lake = Lake(root)
    assert lake.read("prompts").num_rows == 7
    shards = lake.shards()
    assert [s.shard for s in shards] == sorted(written) and [s.seq for s in shards] == [0, 1]
    for table in layout.GRAPH_TABLES:
        want = pa.concat_tables([written[s][table] for s in sorted(written)])
        got = lake.read(table).drop_columns(["model", "corpus", "shard"])
        assert got.equals(want), table
        assert all(shard.rows[table] == written[shard.shard][table].num_rows
                   for shard in shards)
    neurons = lake.table("neurons").collect()
    assert neurons.select("layer", "neuron").rows() == [(0, 5), (1, 7)]
    assert lake.table_manifest(MODEL, "c", "neurons")["inputs"]["state"] == []
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert not [p for p in left if p.endswith(("_COMMIT.json", "_MANIFEST.json"))
                or "/_state/" in p or "/v-0/" in p or "shard=killed" in p]
    assert lake.committed_prompt_ids(MODEL, "c", params_hash(PARAMS)) == {
        prompt_id(t) for t in prompts_of(7)}
    # once is enough
    with pytest.raises(LakeError, match="already lake format 2"):
        from circuit_atlas.lake.migrate import migrate

        migrate(str(root))


def test_the_next_reduce_after_a_migration_equals_one_from_scratch(tmp_path, client):
    from circuit_atlas.etl.reduce import reduce_lake

    root = tmp_path / "old"
    format_one_lake(root)
    CliRunner().invoke(cli, ["lake", "migrate", "--lake", str(root)])
    lake = Lake(root)
    reduce_lake(lake, MODEL, ["c"], client)
    fresh = Lake.init(tmp_path / "fresh")
    for name, tables in sorted(format_one_lake_tables(root).items()):
        with ShardWriter(fresh, MODEL, "c", PARAMS, "r1", SHAPE, shard=name) as w:
            for t in layout.GRAPH_TABLES:
                w.write(t, tables[t])
    reduce_lake(fresh, MODEL, ["c"], client)
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        a = lake.table(table).drop("model", "corpus").collect()
        b = fresh.table(table).drop("model", "corpus").collect()
        assert a.equals(b), table
    assert lake.table("neurons").select(pl.len()).collect().item() > 2


def format_one_lake_tables(root) -> dict:
    lake = Lake(root)
    return {s.shard: {t: pq.read_table(s.file(t)) for t in layout.GRAPH_TABLES}
            for s in lake.shards()}
