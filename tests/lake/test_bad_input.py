"""Bad lakes and bad files stop with one line that names the file and the problem."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from circuit_atlas.lake import GRAPH_NODES, Lake, LakeError
from tests.factories import prompts_of, write_shard


@pytest.fixture
def lake(tmp_path):
    return Lake.init(tmp_path / "lake")


def one_line_naming(excinfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_truncated_parquet(lake):
    shard, _ = write_shard(lake, "c", prompts_of(3))
    path = shard.file("graph_edges")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(LakeError) as e:
        lake.read("graph_edges")
    assert "truncated or corrupt" in one_line_naming(e, path)
    assert lake.read("graph_nodes").num_rows >= 0  # other tables of the lake stay readable


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.drop_columns(["score"]), "missing column 'score'"),
        (lambda t: t.rename_columns([c if c != "layer" else "layr" for c in t.column_names]),
         "missing column 'layer'"),
        (lambda t: t.set_column(1, "layer", t.column("layer").cast(pa.string())),
         "column 'layer' has type string, expected int16"),
    ],
)
def test_parquet_with_wrong_or_missing_column(lake, mutate, expected):
    shard, tables = write_shard(lake, "c", prompts_of(3))
    pq.write_table(mutate(tables["graph_nodes"]).replace_schema_metadata(None),
                   shard.file("graph_nodes"))
    with pytest.raises(LakeError) as e:
        lake.scan("graph_nodes")
    assert expected in one_line_naming(e, shard.file("graph_nodes"))


def test_foreign_schema_version_in_file(lake):
    shard, tables = write_shard(lake, "c", prompts_of(2))
    meta = {b"circuit_atlas.table": b"graph_nodes", b"circuit_atlas.schema_version": b"99"}
    pq.write_table(tables["graph_nodes"].replace_schema_metadata(meta), shard.file("graph_nodes"))
    with pytest.raises(LakeError) as e:
        lake.read("graph_nodes")
    assert "schema version 99" in one_line_naming(e, shard.file("graph_nodes"))


def test_file_of_another_table(lake):
    shard, tables = write_shard(lake, "c", prompts_of(2))
    pq.write_table(tables["graph_edges"], shard.file("graph_nodes"))
    with pytest.raises(LakeError, match="holds table 'graph_edges', expected 'graph_nodes'"):
        lake.read("graph_nodes")


def test_corrupt_and_foreign_commit_records(lake):
    from circuit_atlas.lake import layout

    shard, _ = write_shard(lake, "c", prompts_of(2))
    commit = lake.path(f"{layout.shards_log(shard.model, 'c')}/000000000000.json")
    with open(commit) as f:
        record = json.load(f)
    with open(commit, "w") as f:
        f.write("{not json")
    with pytest.raises(LakeError) as e:
        lake.shards()
    assert "unreadable commit record" in one_line_naming(e, commit)
    record["schema_versions"]["graph_edges"] = 7
    with open(commit, "w") as f:
        json.dump(record, f)
    with pytest.raises(LakeError, match="graph_edges schema version 7"):
        lake.read("graph_edges")


def test_folder_without_lake_marker(tmp_path):
    with pytest.raises(LakeError) as e:
        Lake(tmp_path)
    message = one_line_naming(e, tmp_path)
    assert "not a circuit-atlas lake" in message and "lake init" in message
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(LakeError, match="exists and is not empty"):
        Lake.init(tmp_path)
    assert os.listdir(tmp_path) == ["something.txt"]


def test_lake_marker_from_the_future(tmp_path):
    Lake.init(tmp_path / "l")
    marker = tmp_path / "l" / "_lake.json"
    meta = json.loads(marker.read_text())
    meta["format_version"] = 99
    marker.write_text(json.dumps(meta))
    with pytest.raises(LakeError, match="lake format version 99.*upgrade circuit-atlas"):
        Lake(tmp_path / "l")
    meta["format_version"] = 1
    marker.write_text(json.dumps(meta))
    with pytest.raises(LakeError, match="format version 1.*circuit-atlas lake migrate --lake"):
        Lake(tmp_path / "l")


def test_bad_names(lake):
    with pytest.raises(LakeError, match="invalid corpus name '../x'"):
        lake.import_prompts([{"text": "a"}], "../x")
    with pytest.raises(LakeError, match="unknown lake table 'edgez'.*graph_edges"):
        lake.read("edgez")
    with pytest.raises(LakeError, match="unknown corpus 'nope'.*corpora: none yet"):
        lake.scan("prompts", corpus="nope")


def test_writer_rejects_bad_tables(lake):
    shard = lake.open_shard("m", "c", params={})
    with pytest.raises(LakeError, match="holds graphs, graph_nodes, graph_edges, not 'prompts'"):
        shard.write("prompts", GRAPH_NODES.schema.empty_table())
    with pytest.raises(LakeError, match="graph_nodes table has missing column"):
        shard.write("graph_nodes", pa.table({"graph_id": [1]}))
    shard.abort()
