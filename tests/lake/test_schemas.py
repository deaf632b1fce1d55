"""Every table round-trips through the lake with its exact schema and its partitions."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import (
    GRAPH_EDGES,
    GRAPH_NODES,
    GRAPHS,
    PROMPTS,
    TABLES,
    Lake,
    LakeError,
    model_key,
)
from circuit_atlas.lake.validate import conform
from tests.factories import MODEL, graph_tables, prompts_of, write_shard


@pytest.fixture
def lake(tmp_path):
    return Lake.init(tmp_path / "lake")


def test_narrow_types_are_declared_once():
    assert GRAPH_NODES.schema.field("layer").type == pa.int16()
    assert GRAPH_NODES.schema.field("neuron").type == pa.int32()
    assert GRAPH_EDGES.schema.field("src_layer").type == pa.int16()
    assert GRAPH_EDGES.schema.field("tgt_pos").type == pa.int32()
    assert GRAPH_EDGES.schema.field("weight").type == pa.float32()
    assert set(TABLES) == {"prompts", "graphs", "graph_nodes", "graph_edges"}
    for t in TABLES.values():
        assert t.schema.metadata[b"circuit_atlas.table"] == t.name.encode()
        assert t.schema.metadata[b"circuit_atlas.schema_version"] == str(t.version).encode()


@pytest.mark.parametrize("table", ["graphs", "graph_nodes", "graph_edges"])
def test_graph_tables_round_trip_with_partitions(lake, table):
    _, written_a = write_shard(lake, "medical", prompts_of(5, "a"), seed=1)
    _, written_b = write_shard(lake, "general", prompts_of(4, "b"), seed=2)
    expected = pa.concat_tables([written_a[table], written_b[table]])

    read = lake.read(table)
    assert read.schema.names == [f.name for f in TABLES[table].fields] + ["model", "corpus",
                                                                           "shard"]
    for field in TABLES[table].fields:
        assert read.schema.field(field.name).type == field.type
    order = [(f.name, "ascending") for f in expected.schema if not pa.types.is_list(f.type)]
    got = read.select(expected.column_names).sort_by(order)
    assert got.equals(expected.sort_by(order))
    assert set(read.column("corpus").to_pylist()) == {"medical", "general"}
    assert set(read.column("model").to_pylist()) == {model_key(MODEL)}

    # polars reads the same rows, with hive columns typed as strings
    frame = lake.scan(table).collect()
    assert frame.height == expected.num_rows
    assert frame.schema["corpus"] == pl.String and frame.schema["shard"] == pl.String
    assert frame.filter(pl.col("corpus") == "general").height == written_b[table].num_rows
    # partition filters select shards, not rows after the fact
    assert lake.read(table, corpus="general").num_rows == written_b[table].num_rows


def test_prompts_round_trip_with_corpus_partition(lake):
    lake.import_prompts([{"text": "héllo 🌍", "domain": "x", "meta": {"k": [1, 2]}}], "c1",
                        source="f.json")
    table = lake.read("prompts")
    assert table.schema.names == [f.name for f in PROMPTS.fields] + ["corpus"]
    row = table.to_pylist()[0]
    assert row["text"] == "héllo 🌍" and row["corpus"] == "c1" and row["domain"] == "x"
    assert row["meta"] == '{"k":[1,2]}' and row["source"] == "f.json"
    assert lake.scan("prompts").collect().to_dicts()[0]["text"] == "héllo 🌍"


def test_empty_lake_reads_empty_tables_with_schema(lake):
    assert lake.read("graph_edges").num_rows == 0
    frame = lake.scan("graph_nodes").collect()
    assert frame.height == 0 and "layer" in frame.columns and "corpus" in frame.columns


def test_conform_casts_safely_and_refuses_overflow_nulls_and_typos():
    rng = np.random.default_rng(0)
    edges = graph_tables(rng, ["x"])["graph_edges"]
    wide = pa.table({c: edges.column(c).cast(pa.int64()) if c.endswith(("layer", "neuron", "pos"))
                     else edges.column(c) for c in reversed(edges.column_names)})
    assert conform(wide, GRAPH_EDGES, "t").equals(edges)  # reordered and narrowed back

    overflow = wide.set_column(wide.column_names.index("src_layer"), "src_layer",
                               pa.array([40000] * wide.num_rows, pa.int64()))
    if wide.num_rows:
        with pytest.raises(LakeError, match="src_layer.*does not fit int16"):
            conform(overflow, GRAPH_EDGES, "t")
    with pytest.raises(LakeError, match="missing column.*weight"):
        conform(edges.drop_columns(["weight"]), GRAPH_EDGES, "t")
    with pytest.raises(LakeError, match="unknown column.*wieght"):
        conform(edges.append_column("wieght", edges.column("weight")), GRAPH_EDGES, "t")
    with pytest.raises(LakeError, match="'graph_id' has 1 null"):
        conform(pa.table({**{f.name: pa.array([1], f.type) for f in GRAPHS.fields
                             if f.type != pa.string() and not pa.types.is_list(f.type)},
                          "graph_id": pa.array([None], pa.int64()),
                          "prompt_id": ["p"], "params_hash": ["h"],
                          "input_tokens": [[1]], "target_tokens": [[1]],
                          "target_probs": [[0.5]]}), GRAPHS, "t")


@given(st.lists(st.tuples(st.integers(-1, 200), st.integers(0, 2**32 - 1)), min_size=1))
def test_neuron_ids_parse_format_and_pack_round_trip(pairs):
    """Every (layer, neuron) a table can hold, embedding nodes included: the display
    form parses back, and packing is one-to-one and order-preserving by layer."""
    from circuit_atlas.lake.neurons import neuron_label, pack, parse_neuron, unpack

    for layer, neuron in pairs:
        assert parse_neuron(neuron_label(layer, neuron)) == (layer, neuron)
        assert parse_neuron(f"{layer}:{neuron}") == (layer, neuron)
    layers, neurons = (np.array(c, np.int64) for c in zip(*pairs, strict=True))
    keys = pack(layers, neurons)
    back = unpack(keys)
    assert back[0].tolist() == layers.tolist() and back[1].tolist() == neurons.tolist()
    assert len(set(keys.tolist())) == len(set(pairs))
    order = np.argsort(keys, kind="stable")
    assert list(zip(layers[order].tolist(), neurons[order].tolist(), strict=True)) == sorted(
        zip(layers.tolist(), neurons.tolist(), strict=True))


def test_bad_neuron_ids_are_one_line_errors():
    from circuit_atlas.lake.neurons import parse_neuron

    for text in ("L12", "N3", "12-345", "L1/N2/N3", ""):
        with pytest.raises(CircuitAtlasError, match="write a neuron as L12/N345"):
            parse_neuron(text)
