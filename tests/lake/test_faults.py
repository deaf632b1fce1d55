"""Nothing lost under faults: writers SIGKILLed at random instants, then rerun; two
imports of the same prompts at once; a reduce killed mid-run, then rerun."""

import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from circuit_atlas.lake import Lake, layout, prompt_id
from tests.factories import MODEL, PARAMS, prompts_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = prompts_of(60)

def run_job(url: str, started=None) -> None:
    """A graph job: skip what is committed, commit the rest in shards of six."""
    import numpy as np

    from circuit_atlas.lake import params_hash
    from tests.factories import graph_tables

    lake = Lake(url)
    done = lake.committed_prompt_ids(MODEL, "c", params_hash(PARAMS))
    todo = [p for p in PROMPTS if prompt_id(p) not in done]
    if started is not None:
        started.set()
    for i in range(0, len(todo), 6):
        with lake.open_shard(MODEL, "c", params=PARAMS) as shard:
            for p in todo[i:i + 6]:  # each graph a function of its prompt alone
                seed = int(prompt_id(p), 16) % 2**32
                for name, table in graph_tables(np.random.default_rng(seed), [p],
                                                max_nodes=400, max_edges=3000).items():
                    shard.write(name, table)


def test_a_graph_job_killed_at_random_instants_commits_every_prompt_once(tmp_path):
    """50 kills at random instants, each followed by a cleanup and the next run; then a
    run to the end. Every prompt is committed once, every committed shard is whole,
    nothing else is left, and the tables equal an uninterrupted run's. The jobs are
    forked from this process (a fresh interpreter per kill would cost a second each)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    whole = Lake.init(tmp_path / "whole")  # the uninterrupted run, and how long it takes
    t0 = time.perf_counter()
    run_job(whole.url)
    span = time.perf_counter() - t0
    lake = Lake.init(tmp_path / "lake")
    rng = random.Random(7)
    kills = 0
    for _ in range(50):
        started = fork.Event()
        proc = fork.Process(target=run_job, args=(lake.url, started))
        proc.start()
        assert started.wait(30)
        time.sleep(rng.uniform(0, span / 10))
        if proc.is_alive():
            proc.kill()  # SIGKILL
            kills += 1
        proc.join()
        for s in lake.shards():  # what readers see is whole at every instant
            for t in layout.GRAPH_TABLES:
                assert pq.read_metadata(s.file(t)).num_rows == s.rows[t]
        lake.cleanup(min_age_s=3600)  # the dead writer ran here: its debris goes at once
    assert kills > 25
    run_job(lake.url)
    ids = lake.table("graphs").collect()["prompt_id"].to_list()
    assert sorted(ids) == sorted(prompt_id(p) for p in PROMPTS)  # each exactly once
    assert lake.cleanup(min_age_s=0).removed == []
    # the tables are those an uninterrupted run writes
    for table in layout.GRAPH_TABLES:
        cols = [c for c in whole.table(table).collect_schema().names()
                if c not in ("model", "corpus", "shard")]
        key = [c for c in cols if not c.endswith(("tokens", "probs"))]
        a = lake.table(table).select(cols).sort(key).collect()
        b = whole.table(table).select(cols).sort(key).collect()
        assert a.equals(b), table


def test_two_imports_of_the_same_prompts_at_once_store_each_once(tmp_path):
    lake = Lake.init(tmp_path / "lake")
    lake.import_prompts([{"text": "seed"}], "c")
    prompts = tmp_path / "p.txt"
    for trial in range(4):
        prompts.write_text("\n".join(prompts_of(40, f"t{trial}")) + "\n")
        procs = [subprocess.Popen([sys.executable, "-m", "circuit_atlas.cli", "prompts",
                                   "import", str(prompts), "--corpus", "c", "--lake",
                                   lake.url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        ids = lake.table("prompts").collect()["prompt_id"]
        assert ids.n_unique() == ids.len() == 1 + 40 * (trial + 1)
    # and the parquet parts themselves hold each prompt once (plain readers agree)
    plain = pq.read_table(lake.path("prompts")).column("prompt_id").to_pylist()
    assert len(plain) == len(set(plain))


@pytest.mark.timeout(600)
def test_a_reduce_killed_mid_run_then_rerun_equals_an_uninterrupted_one(tmp_path, client):
    from circuit_atlas.etl.reduce import reduce_lake
    from tests.factories import write_shard

    lake = Lake.init(tmp_path / "lake")
    for s in range(6):
        write_shard(lake, "c", prompts_of(6, f"s{s}"), seed=s, neurons=40)
    whole = tmp_path / "whole"
    import shutil

    shutil.copytree(lake.root, whole)
    reduce_lake(Lake(whole), MODEL, ["c"], client)
    cmd = [sys.executable, "-m", "circuit_atlas.cli", "reduce", "--lake", lake.url, "--corpus",
           "c", "--model", MODEL, "--workers", "1"]
    for delay in (2.0, 4.0):  # in the cluster's start, then in its tasks
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its workers
        proc.wait()
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    lake.cleanup(min_age_s=0)
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        a = lake.table(table).drop("model", "corpus").collect()
        b = Lake(whole).table(table).drop("model", "corpus").collect()
        assert a.equals(b), table
    assert not lake.fs.glob(lake.path(f"{layout.SCRATCH}/**/v-*"))
