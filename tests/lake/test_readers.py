"""Every engine reads exactly the committed current rows: polars, pyarrow, DuckDB and
dask.dataframe, through the API and through plain reads of the folders the lake
documents (a version's folder, a per-graph table's folder)."""

import datetime as dt

import dask.dataframe as dd
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from circuit_atlas import open_lake
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import GRAPHS, Lake, LakeError, layout
from circuit_atlas.lake.schemas import EDGE_STATS
from tests.factories import MODEL, commit_twice, prompts_of, write_shard

KEY = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]


def rows(table: pa.Table | pl.DataFrame, cols: list[str]) -> list[tuple]:
    frame = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    return sorted(frame.select(cols).rows())


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, client):
    """Two reduces (the second over a grown lake), so two versions are kept; a run
    killed before publishing; a graph committed twice."""
    lake = Lake.init(tmp_path_factory.mktemp("readers") / "lake")
    for s in range(3):
        write_shard(lake, "c", prompts_of(5, f"s{s}"), seed=s, neurons=6)
    reduce_lake(lake, MODEL, ["c"], client)
    write_shard(lake, "c", prompts_of(4, "late"), seed=9, neurons=6)
    commit_twice(lake, lake.shards()[0])
    reduce_lake(lake, MODEL, ["c"], client)
    killed = lake.new_table_version(MODEL, "c", "edges")  # a reduce killed before publishing
    killed.write("src_layer-000.parquet",
                 lake.arrow("edges").to_table().drop_columns(["model", "corpus"]), EDGE_STATS)
    return lake


def test_dask_dataframe_imports():
    import pandas  # noqa: F401  (dask.dataframe needs it; the package depends on it)

    assert dd.from_pandas is not None


def test_derived_tables_read_the_same_in_every_engine(reduced):
    lake = reduced
    want = rows(lake.table("edges").collect(), KEY + ["count"])
    assert rows(lake.arrow("edges").to_table(), KEY + ["count"]) == want
    assert rows(lake.dask("edges").reset_index().compute().pipe(pl.from_pandas),
                KEY + ["count"]) == want
    assert rows(lake.duckdb().sql("SELECT * FROM edges").pl(), KEY + ["count"]) == want
    # the folder of the current version holds exactly it: plain readers agree
    folder = lake.table_path("edges", MODEL, "c")
    assert rows(ds.dataset(folder).to_table(), KEY + ["count"]) == want
    assert rows(dd.read_parquet(folder).compute().pipe(pl.from_pandas), KEY + ["count"]) == want
    assert rows(duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*.parquet')").pl(),
                KEY + ["count"]) == want
    assert rows(pl.scan_parquet(folder).collect(), KEY + ["count"]) == want
    # no state file, no scratch, no unpublished version is in a version's folder
    for t in ("neurons", "neuron_tokens", "neuron_corpora", "edges"):
        names = sorted(p.rsplit("/", 1)[-1] for p in lake.fs.ls(lake.table_path(t, MODEL, "c")))
        assert names == sorted(f.rsplit("/", 1)[-1] for f in lake.files(t)), t
    neurons = lake.table("neurons").collect()
    assert dd.read_parquet(lake.table_path("neurons", MODEL, "c")).shape[0].compute() == \
        neurons.height


def test_per_graph_tables_read_each_graph_once_in_every_engine(reduced):
    lake = reduced
    cols = ["graph_id", "src_layer", "src_neuron", "src_pos", "tgt_layer", "tgt_neuron",
            "tgt_pos", "weight"]
    committed = {g for s in lake.shards() for g in s.graph_ids()}
    edges = lake.table("graph_edges").collect()
    assert set(edges["graph_id"]) <= committed
    graphs = lake.table("graphs").collect()
    assert graphs.height == len(committed) == graphs["graph_id"].n_unique()
    want = rows(edges, cols)
    assert rows(lake.arrow("graph_edges").to_table(), cols) == want
    assert rows(lake.dask("graph_edges").compute().pipe(pl.from_pandas), cols) == want
    assert rows(lake.duckdb().sql("SELECT * FROM graph_edges").pl(), cols) == want
    assert rows(lake.sql("SELECT * FROM graph_edges"), cols) == want
    # each table has its own folder: a plain read of graphs/ is the graphs table alone
    plain = ds.dataset(lake.path("graphs"), partitioning="hive").to_table()
    assert plain.schema.names[:7] == [f.name for f in GRAPHS.fields]
    assert plain.num_rows == graphs.height + lake.shards()[0].rows["graphs"]  # + the copy


def test_model_takes_the_hub_id_and_the_partition_key(reduced):
    a = reduced.table("neurons", model=MODEL).collect()
    b = reduced.table("neurons", model=layout.model_key(MODEL)).collect()
    assert a.height == b.height > 0
    assert open_lake(reduced.url).table("graphs", model=MODEL).collect().height > 0


def test_a_reader_keeps_its_snapshot_while_newer_versions_are_published(tmp_path, client):
    lake = Lake.init(tmp_path / "lake")
    for s in range(2):
        write_shard(lake, "c", prompts_of(5, f"s{s}"), seed=s, neurons=6)
    reduce_lake(lake, MODEL, ["c"], client)
    before = lake.table("edges")  # opened, not collected
    view = lake.duckdb()
    n_before = before.select(pl.len()).collect().item()
    write_shard(lake, "c", prompts_of(6, "new"), seed=5, neurons=6)
    reduce_lake(lake, MODEL, ["c"], client)
    assert before.select(pl.len()).collect().item() == n_before  # still the old snapshot
    assert view.sql("SELECT count(*) FROM edges").fetchall()[0][0] == n_before
    assert lake.table("edges").select(pl.len()).collect().item() > n_before
    # time travel: by number, from the newest back, by id, by time
    assert lake.table("edges", version=0).select(pl.len()).collect().item() == n_before
    assert lake.table("edges", version=-2).select(pl.len()).collect().item() == n_before
    first = lake.table_manifest(MODEL, "c", "edges", version=0)
    assert lake.table("edges", version=first["version"]).select(pl.len()).collect().item() \
        == n_before
    at = dt.datetime.fromisoformat(first["published_at"])
    assert lake.table("edges", version=at).select(pl.len()).collect().item() == n_before
    with pytest.raises(LakeError, match="no version 7"):
        lake.table("edges", version=7)
    # a cleanup within the retention period keeps the old version for its readers
    assert lake.cleanup(min_age_s=0).expired == []
    assert before.select(pl.len()).collect().item() == n_before
    # past it, the old version goes, and reading it says why
    from circuit_atlas.lake.cleanup import cleanup

    report = cleanup(lake, min_age_s=0, _now_s=lake.retention_s + 10 + dt.datetime.now(
        dt.UTC).timestamp())
    assert report.expired and all("/edges/" in p or "/neuron" in p for p in report.expired)
    with pytest.raises(LakeError, match="removed .*retention"):
        lake.table("edges", version=0)
    assert lake.table("edges").select(pl.len()).collect().item() > n_before


def test_a_dask_batch_job_over_the_atlas_equals_polars(reduced, client):
    """For each layer, the neurons with the most downstream targets, as a Dask job on a
    LocalCluster, against the same answer from polars."""
    edges = reduced.dask("edges")
    assert edges.known_divisions and edges.npartitions == len(reduced.files("edges"))
    forward = edges[edges.tgt_layer > edges.index.to_series()].reset_index()
    fanout = (forward.groupby(["src_layer", "src_neuron"]).size().rename("targets")
              .reset_index())
    top = fanout.sort_values("targets", ascending=False).groupby("src_layer").head(3)
    got = pl.from_pandas(client.compute(top).result())
    want = (reduced.table("edges").filter(pl.col("tgt_layer") > pl.col("src_layer"))
            .group_by("src_layer", "src_neuron").len("targets").collect())
    best = want.group_by("src_layer").agg(pl.col("targets").max())
    for layer, targets in best.rows():
        assert got.filter(pl.col("src_layer") == layer)["targets"].max() == targets
