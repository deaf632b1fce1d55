"""The reduce on a real LocalCluster, against DuckDB over the same committed files."""

import os
import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from circuit_atlas import CircuitAtlasError
from circuit_atlas.cli import cli
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import Lake, LakeError, layout
from tests.etl.oracle import assert_same, edge_oracle, neuron_oracle
from tests.factories import MODEL, SHAPE, commit_twice, prompts_of, write_shard

KEY = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]


def make_lake(path, shards=3, corpus="c", start=0):
    lake = Lake.init(path)
    for s in range(start, start + shards):
        write_shard(lake, corpus, prompts_of(5 + s, f"{corpus}{s}"), seed=s, neurons=6)
    return lake


def published(lake, table):
    return lake.table(table).drop("model", "corpus").collect().to_arrow()


def test_reduce_equals_duckdb(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=4)
    report = reduce_lake(lake, MODEL, ["c"], client)
    assert report.from_scratch and report.new_shards == 4
    assert lake.fs.glob(lake.path("_scratch/**/v-*")) == []  # removed after use
    raw_edges, raw_nodes = lake.read("graph_edges"), lake.read("graph_nodes")
    edges = published(lake, "edges")
    assert_same(edges.select(edge_oracle(raw_edges).column_names), edge_oracle(raw_edges))
    count = edges.column("count").to_numpy()
    np.testing.assert_allclose(edges.column("mean_weight").to_numpy(),
                               edges.column("weight_sum").to_numpy() / count)
    neurons = published(lake, "neurons")
    assert_same(neurons.select(neuron_oracle(raw_nodes).column_names), neuron_oracle(raw_nodes))
    assert lake.table_manifest(MODEL, "c", "edges")["inputs"]["model_shape"] == SHAPE


def test_several_corpora_and_token_associations(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=2, corpus="med")
    for s in range(2):
        write_shard(lake, "gen", prompts_of(4, f"gen{s}"), seed=10 + s, neurons=6)
    reduce_lake(lake, MODEL, ["med", "gen"], client, top_k=3)
    assert lake.derived_tables()[MODEL.replace("/", "--")] == {
        "gen+med": ["edges", "neuron_corpora", "neuron_tokens", "neurons"]}
    corpora = lake.table("neuron_corpora").collect()
    neurons = lake.table("neurons").collect()
    by_corpus = corpora.group_by("layer", "neuron").agg(total=pa_sum("graph_count"))
    joined = neurons.join(by_corpus, on=["layer", "neuron"])
    assert (joined["graph_count"] == joined["total"]).all()
    assert set(corpora["corpus_name"]) == {"med", "gen"}
    tokens = lake.table("neuron_tokens").collect()
    assert tokens.group_by("layer", "neuron", "kind").len()["len"].max() <= 3
    # oracle for the input-token association of one neuron: count its rows per token
    nodes, graphs = lake.read("graph_nodes").to_pylist(), {
        g["graph_id"]: g for g in lake.read("graphs").to_pylist()}
    row = tokens.filter(tokens["kind"] == "input").sort("count", descending=True).row(
        0, named=True)
    counts: dict[int, int] = {}
    for n in nodes:
        if (n["layer"], n["neuron"]) == (row["layer"], row["neuron"]):
            toks = graphs[n["graph_id"]]["input_tokens"]
            t = toks[min(n["position"], len(toks) - 1)]
            counts[t] = counts.get(t, 0) + 1
    assert counts[row["token_id"]] == row["count"] == max(counts.values())


def pa_sum(name):
    import polars as pl

    return pl.col(name).sum()


def table_bytes(lake, table):
    return [open(f, "rb").read() for f in sorted(lake.files(table))]  # noqa: SIM115


@pytest.mark.parametrize("min_count", [1, 2])
def test_incremental_equals_scratch_byte_for_byte(tmp_path, client, min_count):
    lake = make_lake(tmp_path / "inc", shards=3)
    reduce_lake(lake, MODEL, ["c"], client, min_count=min_count)
    for s in range(3, 5):
        write_shard(lake, "c", prompts_of(5 + s, f"c{s}"), seed=s, neurons=6)
    again = reduce_lake(lake, MODEL, ["c"], client, min_count=min_count)
    assert not again.from_scratch and again.new_shards == 2
    scratch_lake = Lake.init(tmp_path / "scratch")
    for area in (*layout.GRAPH_TABLES, f"{layout.LOG}/shards"):  # the graphs, not the tables
        shutil.copytree(lake.path(area), scratch_lake.path(area))
    assert reduce_lake(scratch_lake, MODEL, ["c"], client, min_count=min_count).from_scratch
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        assert table_bytes(lake, table) == table_bytes(scratch_lake, table), table
    edges = published(lake, "edges")
    assert edges.num_rows > 100 and edges.column("count").to_numpy().min() >= min_count
    raw = lake.read("graph_edges")
    assert_same(published(lake, "edges").select(edge_oracle(raw).column_names),
                edge_oracle(raw, min_count))
    # changed parameters start over instead of mixing
    assert reduce_lake(lake, MODEL, ["c"], client, min_count=min_count + 1).from_scratch


def sorted_table(lake, table):
    t = published(lake, table)
    keys = [c for c in ("layer", "neuron", *KEY, "kind", "token_id", "corpus_name")
            if c in t.column_names]
    return t.sort_by([(k, "ascending") for k in keys])


def test_layers_too_big_for_one_fold_are_cut_into_neuron_ranges(tmp_path, client):
    """With a fold budget below a layer's rows, layers are folded and written in
    neuron ranges; extending that state under another budget (other cuts) equals a
    reduce from scratch, bit for bit."""
    lake = Lake.init(tmp_path / "l")  # neurons over the whole layer: many blocks to cut at
    for s in range(3):
        write_shard(lake, "c", prompts_of(5 + s, f"c{s}"), seed=s)
    reduce_lake(lake, MODEL, ["c"], client, fold_rows=40, chunk=2)
    names = [f.rsplit("/", 1)[-1] for f in lake.files("edges")]
    assert sum(".from-" in n for n in names) > 3, names
    raw = lake.read("graph_edges")
    assert_same(published(lake, "edges").select(edge_oracle(raw).column_names),
                edge_oracle(raw))
    nodes = lake.read("graph_nodes")
    assert_same(published(lake, "neurons").select(neuron_oracle(nodes).column_names),
                neuron_oracle(nodes))
    for s in range(3, 6):
        write_shard(lake, "c", prompts_of(5 + s, f"c{s}"), seed=s)
    again = reduce_lake(lake, MODEL, ["c"], client, fold_rows=25)
    assert not again.from_scratch and again.new_shards == 3
    scratch_lake = Lake.init(tmp_path / "scratch")
    for area in (*layout.GRAPH_TABLES, f"{layout.LOG}/shards"):
        shutil.copytree(lake.path(area), scratch_lake.path(area))
    reduce_lake(scratch_lake, MODEL, ["c"], client)
    assert not any(".from-" in f for f in scratch_lake.files("edges"))
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        assert sorted_table(lake, table).equals(sorted_table(scratch_lake, table)), table


def test_a_killed_worker_does_not_change_the_result(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=6)
    pids = list(client.run(os.getpid).values())
    killed = []

    def kill_one(done, total):
        if done == 3 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    reduce_lake(lake, MODEL, ["c"], client, chunk=2, on_progress=kill_one)
    assert killed
    client.wait_for_workers(2, timeout=60)
    raw = lake.read("graph_edges")
    assert_same(published(lake, "edges").select(edge_oracle(raw).column_names), edge_oracle(raw))


def test_bad_shards(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=2)
    lake.open_shard(MODEL, "c", params={})  # uncommitted: ignored
    reduce_lake(lake, MODEL, ["c"], client)
    raw = lake.read("graph_edges")
    assert published(lake, "edges").num_rows == edge_oracle(raw).num_rows
    shard = lake.shards()[0]
    with open(shard.file("graph_edges"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(LakeError, match=r"graph_edges/.*part-0.parquet: not a readable Parquet"):
        reduce_lake(lake, MODEL, ["c"], client, min_count=2)
    # the other shard's scratch partials went with the failed run
    assert lake.fs.glob(lake.path("_scratch/**/*.arrow")) == []
    with pytest.raises(CircuitAtlasError, match="no committed graphs of model 'other'"):
        reduce_lake(lake, "other", ["c"], client)
    with pytest.raises(CircuitAtlasError, match="for corpus nope .*graphs held: "
                                                "test-org/tiny-llama / c"):
        reduce_lake(lake, MODEL, ["nope"], client)


def test_reduce_command(tmp_path):
    lake = make_lake(tmp_path / "l", shards=2)
    result = CliRunner().invoke(cli, ["reduce", "--lake", lake.url, "--corpus", "c",
                                      "--model", MODEL, "--workers", "1", "--min-count", "2"])
    assert result.exit_code == 0, result.output
    assert "dashboard http" in result.output and "from scratch" in result.output
    edges = lake.table("edges").collect()
    assert edges.height == edge_oracle(lake.read("graph_edges"), 2).num_rows > 0
    info = CliRunner().invoke(cli, ["lake", "info", "--lake", lake.url])
    assert "edges" in info.output and "neurons" in info.output


def test_a_graph_committed_twice_counts_once(tmp_path, client):
    """A job that computed the same prompts as an earlier one commits nothing of them;
    where the filesystem let a second commit through, the reduce counts them once."""
    lake = make_lake(tmp_path / "l", shards=2)
    again, _ = write_shard(lake, "c", prompts_of(5, "c0"), seed=0, neurons=6)
    assert again is None and len(lake.shards()) == 2
    commit_twice(lake, lake.shards()[0])
    assert len(lake.shards()) == 3
    reduce_lake(lake, MODEL, ["c"], client)
    first_two = pa.concat_tables([pq.read_table(s.file("graph_edges"))
                                  for s in lake.shards()[:2]])
    assert_same(published(lake, "edges").select(edge_oracle(first_two).column_names),
                edge_oracle(first_two))
    neurons = published(lake, "neurons")
    assert neurons.column("graph_count").to_numpy().max() <= 5 + 6  # graphs held: 11



def test_cleanup_removes_the_debris_of_a_killed_reduce(tmp_path, client):
    lake = make_lake(tmp_path / "l", shards=2)
    reduce_lake(lake, MODEL, ["c"], client)
    published_files = sorted(lake.fs.find(lake.path("tables")))
    killed = lake.new_table_version(MODEL, "c", "edges")  # wrote, never published
    killed.write("src_layer-000.parquet", lake.read("graph_edges").slice(0, 0))
    killed.scratch("x.parquet")
    assert lake.cleanup(min_age_s=3600).removed == []  # recent: a reduce may be running
    report = lake.cleanup(min_age_s=0)
    assert report.removed == [lake.path(f"{killed.dir}/{killed.version}"),
                              lake.path(killed._scratch_dir())]
    assert sorted(lake.fs.find(lake.path("tables"))) == published_files
    assert published(lake, "edges").num_rows > 0


def test_graphs_of_different_parameters_are_not_mixed_silently(tmp_path, client):
    """Shards of one corpus computed with --candidates 50 and 100: the reduce refuses
    with the sets listed, reduces one set on request (equal to the oracle over its
    graphs only), or all with --mixed-params; the manifest names the sets it holds."""
    import pyarrow.compute as pc

    from tests.factories import PARAMS

    lake = make_lake(tmp_path / "l", shards=2)
    other = {**PARAMS, "candidates": 100}
    write_shard(lake, "c", prompts_of(3, "new"), seed=9, params=other, neurons=6)
    shards = lake.shards(MODEL, "c")
    first, second = shards[0].params_hash, shards[-1].params_hash
    assert first != second
    with pytest.raises(CircuitAtlasError) as refused:
        reduce_lake(lake, MODEL, ["c"], client)
    msg = str(refused.value)
    assert "2 parameter sets" in msg and "--mixed-params" in msg
    assert f"{first} (2 shards, 11 graphs; candidates=50)" in msg
    assert f"{second} (1 shard, 3 graphs; candidates=100)" in msg
    assert lake.optional_table("edges", MODEL, "c") is None  # nothing was written

    def oracle(hashes):
        ids = pa.array([g for s in shards if s.params_hash in hashes for g in s.graph_ids()],
                       pa.int64())
        raw = lake.read("graph_edges")
        return edge_oracle(raw.filter(pc.is_in(raw.column("graph_id"), value_set=ids)))

    reduce_lake(lake, MODEL, ["c"], client, params_hash=(first,))
    edges = published(lake, "edges")
    want = oracle({first})
    assert_same(edges.select(want.column_names), want)
    assert lake.table_manifest(MODEL, "c", "edges")["inputs"]["params"]["graph_params"] == {
        first: PARAMS}
    reduce_lake(lake, MODEL, ["c"], client, mixed_params=True)
    edges = published(lake, "edges")
    want = oracle({first, second})
    assert_same(edges.select(want.column_names), want)
    assert set(lake.table_manifest(MODEL, "c", "edges")["inputs"]["params"][
        "graph_params"]) == {first, second}
    out = CliRunner().invoke(cli, ["reduce", "--lake", lake.url, "--corpus", "c", "--model",
                                   MODEL, "--cluster", "none", "--params-hash", "feedbeef"])
    assert out.exit_code == 1 and "no shards of c with graph parameters feedbeef" in out.output


def test_local_workers_start_with_the_worker_environment(client):
    """Dask's MALLOC_TRIM_THRESHOLD_ alone turns glibc's adaptive mmap threshold off
    (the reduce's numpy steps ran 1.4-1.6x slower); our workers also get a fixed one,
    and polars keeps to one thread per worker thread."""
    import os

    seen = client.run(lambda: {k: os.environ.get(k) for k in (
        "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "POLARS_MAX_THREADS")})
    assert all(v == {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864",
                     "POLARS_MAX_THREADS": "1"} for v in seen.values()), seen


def test_a_prologue_of_ones_own_is_kept_and_not_doubled():
    from circuit_atlas.etl.clusters import slurm_settings

    mine = slurm_settings(job_script_prologue=["module load python",
                                               "export POLARS_MAX_THREADS=4"])
    assert mine["job_script_prologue"] == [
        "module load python", "export POLARS_MAX_THREADS=4",
        "export MALLOC_MMAP_THRESHOLD_=33554432", "export MALLOC_TRIM_THRESHOLD_=67108864",
        "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_MMAP_THRESHOLD_': "
        "'33554432', 'MALLOC_TRIM_THRESHOLD_': '67108864'}\""]
