"""Atomic shard commit: readers see committed shards only; killed writers leave debris
that cleanup removes; a rerun commits each prompt's graph exactly once."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pyarrow.parquet as pq
import pytest

from circuit_atlas.lake import Lake, LakeError, layout, params_hash, prompt_id
from tests.factories import MODEL, PARAMS, graph_tables, prompts_of, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def lake(tmp_path):
    return Lake.init(tmp_path / "lake")


def run_job(lake: Lake, corpus: str, prompts: list[str], seed: int = 0) -> int:
    """What a graph job does: skip committed prompts, commit the rest as one shard."""
    done = lake.committed_prompt_ids(MODEL, corpus, params_hash(PARAMS))
    todo = [p for p in prompts if prompt_id(p) not in done]
    if todo:
        write_shard(lake, corpus, todo, seed=seed)
    return len(todo)


def shard_dirs(lake: Lake) -> list[str]:
    return sorted(lake.fs.glob(lake.path(layout.shard_glob())))


def test_commit_record_describes_the_shard(lake):
    shard, tables = write_shard(lake, "c", prompts_of(3))
    with open(f"{shard.path}/_COMMIT.json") as f:
        record = json.load(f)
    assert record["rows"] == {t: tables[t].num_rows for t in ("graphs", "nodes", "edges")}
    assert record["schema_versions"] == {"graphs": 1, "nodes": 2, "edges": 2}
    assert record["model"] == MODEL and record["model_revision"] == "r1"
    assert record["params"] == PARAMS and record["params_hash"] == params_hash(PARAMS)
    assert record["code_version"]
    assert sorted(record["prompt_ids"]) == sorted(prompt_id(p) for p in prompts_of(3))
    for t in ("graphs", "nodes", "edges"):
        assert pq.read_metadata(shard.file(t)).num_rows == record["rows"][t]
        assert os.path.getsize(shard.file(t)) == record["bytes"][t]
    assert not os.path.exists(f"{shard.path}/{layout.WRITING_FILE}")
    assert sorted(os.listdir(shard.path)) == ["_COMMIT.json", "edges.parquet", "graphs.parquet",
                                              "nodes.parquet"]


def test_uncommitted_writer_is_invisible_and_cleaned(lake):
    write_shard(lake, "c", prompts_of(2, "kept"))
    tables = graph_tables(__import__("numpy").random.default_rng(0), prompts_of(3, "lost"))
    writer = lake.open_shard(MODEL, "c", params=PARAMS)
    writer.write("graphs", tables["graphs"])
    writer.write("nodes", tables["nodes"])
    # interrupted here: no commit
    assert len(shard_dirs(lake)) == 2
    assert len(lake.shards()) == 1
    assert lake.read("graphs").num_rows == 2
    assert set(lake.committed_prompt_ids(MODEL, "c", params_hash(PARAMS))) == {
        prompt_id(p) for p in prompts_of(2, "kept")}
    # this process (the writer) is alive, so a cleanup with an age guard keeps it ...
    assert lake.cleanup(min_age_s=3600).in_progress == [lake.path(writer.dir)]
    assert len(shard_dirs(lake)) == 2
    # ... and an explicit min_age of 0 removes it
    report = lake.cleanup(min_age_s=0)
    assert report.removed == [lake.path(writer.dir)]
    assert len(shard_dirs(lake)) == 1 and lake.read("graphs").num_rows == 2


def test_exception_inside_writer_aborts(lake):
    tables = graph_tables(__import__("numpy").random.default_rng(0), prompts_of(2))
    with pytest.raises(RuntimeError), lake.open_shard(MODEL, "c", params=PARAMS) as shard:
        shard.write("graphs", tables["graphs"])
        raise RuntimeError("GPU fell over")
    assert shard_dirs(lake) == []


def test_commit_refuses_inconsistent_shards(lake):
    tables = graph_tables(__import__("numpy").random.default_rng(0), prompts_of(2))
    other = graph_tables(__import__("numpy").random.default_rng(1), prompts_of(2, "other"))
    writer = lake.open_shard(MODEL, "c", params=PARAMS)
    writer.write("graphs", tables["graphs"])
    writer.write("edges", other["edges"])
    if other["edges"].num_rows:
        with pytest.raises(LakeError, match="refer to graph_id .* not in the shard's graphs"):
            writer.commit()
        assert shard_dirs(lake) == []
    with pytest.raises(LakeError, match="params_hash"):
        lake.open_shard(MODEL, "c", params={"other": 1}).write("graphs", tables["graphs"])


def test_rerun_skips_committed_prompts(lake):
    prompts = prompts_of(6)
    assert run_job(lake, "c", prompts[:4]) == 4
    assert run_job(lake, "c", prompts) == 2
    assert run_job(lake, "c", prompts) == 0
    graphs = lake.read("graphs")
    assert graphs.num_rows == 6 and len(set(graphs.column("prompt_id").to_pylist())) == 6
    # other params or another corpus are separate jobs
    assert lake.committed_prompt_ids(MODEL, "c", params_hash({"x": 1})) == set()
    assert lake.committed_prompt_ids(MODEL, "other", params_hash(PARAMS)) == set()


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from circuit_atlas.lake import Lake
    from tests.factories import MODEL, PARAMS, graph_tables, prompts_of
    lake = Lake({lake!r})
    mode = sys.argv[1]
    if mode == "pause":
        tables = graph_tables(np.random.default_rng(0), prompts_of(5))
        shard = lake.open_shard(MODEL, "c", params=PARAMS)
        shard.write("graphs", tables["graphs"])
        shard.write("nodes", tables["nodes"])
        print("written", flush=True)
        time.sleep(120)
    else:  # commit shards back to back until killed
        for i in range(10_000):
            tables = graph_tables(np.random.default_rng(i), prompts_of(20, f"s{{i}}"),
                                  max_nodes=3000, max_edges=20000)
            with lake.open_shard(MODEL, "c", params=PARAMS) as shard:
                for name, table in tables.items():
                    shard.write(name, table)
            print("committed", flush=True)
""")


def start_writer(lake: Lake, mode: str) -> subprocess.Popen:
    script = WRITER.format(root=ROOT, lake=lake.url)
    return subprocess.Popen([sys.executable, "-c", script, mode], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)


def test_sigkilled_writer_leaves_only_debris(lake):
    proc = start_writer(lake, "pause")
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(shard_dirs(lake)) == 1
    assert lake.shards() == [] and lake.read("nodes").num_rows == 0
    # the writer ran on this host and is dead: debris even under the age guard
    report = lake.cleanup(min_age_s=3600)
    assert len(report.removed) == 1 and shard_dirs(lake) == []
    # the rerun commits the prompts once
    assert run_job(lake, "c", prompts_of(5)) == 5
    assert run_job(lake, "c", prompts_of(5)) == 0
    assert len(lake.shards()) == 1 and lake.read("graphs").num_rows == 5


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_sigkill_at_any_moment_never_shows_a_partial_shard(lake, delay):
    proc = start_writer(lake, "loop")
    assert proc.stdout.readline().strip() == "committed"  # the first shard is in
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = lake.shards()
    assert shards, "at least one shard was committed"
    for s in shards:  # every visible shard is whole
        for t in ("graphs", "nodes", "edges"):
            assert pq.read_metadata(s.file(t)).num_rows == s.rows[t]
    edges = lake.read("edges")
    assert edges.num_rows == sum(s.rows["edges"] for s in shards)
    lake.cleanup(min_age_s=3600)
    assert len(shard_dirs(lake)) == len(shards)
    leftovers = [p for p in lake.fs.find(lake.path("graphs")) if layout.TMP_MARK in p]
    assert leftovers == []


def test_cleanup_age_guard_for_writers_on_other_hosts(lake):
    d = lake.path(layout.shard_dir(layout.model_key(MODEL), "c", "other-node-shard"))
    os.makedirs(d)
    with open(f"{d}/{layout.WRITING_FILE}", "w") as f:
        json.dump({"host": "some-other-node", "pid": 1, "started_at": "now"}, f)
    with open(f"{d}/.nodes.parquet{layout.TMP_MARK}abc", "wb") as f:
        f.write(b"partial")
    assert lake.cleanup(min_age_s=3600).in_progress == [d]
    assert os.path.exists(d)
    report = lake.cleanup(min_age_s=3600, dry_run=True)
    assert report.removed == [] and os.path.exists(d)
    from circuit_atlas.lake.shards import cleanup

    report = cleanup(lake, min_age_s=3600, _now_s=time.time() + 7200)
    assert report.removed == [d] and not os.path.exists(d)


def test_writer_killed_before_its_marker_was_renamed_is_debris(lake):
    """Only the marker's temporary copy is there: it still names the dead writer."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = lake.path(layout.shard_dir(layout.model_key(MODEL), "c", "killed-early"))
    os.makedirs(d)
    with open(layout.tmp_name(f"{d}/{layout.WRITING_FILE}", "abcd1234"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started_at": "now"}, f)
    assert lake.cleanup(min_age_s=3600).removed == [d] and not os.path.exists(d)


def test_committed_shard_survives_cleanup_even_with_stale_marker(lake):
    shard, _ = write_shard(lake, "c", prompts_of(2))
    with open(f"{shard.path}/{layout.WRITING_FILE}", "w") as f:  # killed just before removal
        json.dump({"host": socket.gethostname(), "pid": 2**22 + 1, "started_at": "x"}, f)
    assert lake.cleanup(min_age_s=0).removed == []
    assert len(lake.shards()) == 1


def test_lake_on_an_fsspec_url():
    url = f"memory://lake-{uuid.uuid4().hex[:8]}"
    lake = Lake.init(url)
    shard, tables = write_shard(lake, "c", prompts_of(3))
    assert Lake(url).read("edges").num_rows == tables["edges"].num_rows
    assert lake.scan("graphs").collect().height == 3
    assert lake.committed_prompt_ids(MODEL, "c", params_hash(PARAMS)) == {
        prompt_id(p) for p in prompts_of(3)}
    lake.import_prompts([{"text": "a"}], "c")
    assert lake.corpora() == ["c"]
