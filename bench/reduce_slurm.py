"""The reduce on SLURM under load: adaptive worker jobs, one cancelled mid-run, the
tables then equal to a LocalCluster's, in one run.

    sudo bash scripts/slurm start                     # the single-node SLURM, once
    .venv/bin/python bench/reduce_slurm.py --graphs 200000 --worker-memory 2GB

On bench/reduce.py's synthetic lake (generated once, cached). The SLURM reduce runs on
a twin of the lake (its shards linked, not copied; its own tables and scratch) with
``adapt`` = (min, max) jobs of one single-threaded worker each, limited to
--worker-memory; when --cancel-at of the shard tasks are done, the oldest worker job is
cancelled (scancel) and the adaptive cluster must start another. Then the same reduce
on a LocalCluster of as many workers under the same limit, on the lake itself. Every
row of the four tables (edges, neurons, neuron_corpora, neuron_tokens) must be equal,
bit for bit, a few layers at a time. Prints wall times, the jobs cancelled and
started, and the peak RSS of the SLURM workers still alive at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from reduce import CORPUS, KEYS, LAYERS, MODEL, bench_lake, ensure_lake, run_ours  # noqa: E402

from circuit_atlas.machine import describe  # noqa: E402

GRAPH_TABLES = ("graphs", "graph_nodes", "graph_edges")


def twin(lake_path: str, path: str) -> str:
    """A lake at ``path`` that shares ``lake_path``'s committed shards (its per-graph
    tables linked, its shard log copied) and has no derived table of its own."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    shutil.copy(os.path.join(lake_path, "_lake.json"), path)
    shutil.copytree(os.path.join(lake_path, "_log", "shards"),
                    os.path.join(path, "_log", "shards"))
    for table in GRAPH_TABLES:
        os.symlink(os.path.join(lake_path, table), os.path.join(path, table))
    return path


def worker_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-n", "dask-worker"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.split(), key=int)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def on_slurm(lake_path: str, jobs: int, memory: str, cancel_at: float, tmp: str) -> dict:
    from circuit_atlas.etl.clusters import dask_client
    from circuit_atlas.etl.reduce import reduce_lake
    from circuit_atlas.lake import Lake

    cancelled: list[str] = []
    t0 = time.perf_counter()
    with dask_client("slurm", adapt=(jobs, jobs), cores=1, processes=1, memory=memory,
                     walltime="01:00:00", interface="lo", death_timeout=60,
                     scheduler_options={"dashboard_address": ":0"},
                     local_directory=os.path.join(tmp, "dask"),
                     log_directory=os.path.join(tmp, "logs"), wait_s=300, echo=print) as c:
        c.wait_for_workers(jobs, timeout=300)
        before = worker_jobs()
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if not cancelled and done >= cancel_at * total:
                victim = before[0]
                subprocess.run(["scancel", victim], check=True)
                cancelled.append(victim)
                print(f"cancelled worker job {victim} at {done}/{total} shard tasks",
                      flush=True)

        reduce_lake(Lake(lake_path), MODEL, [CORPUS], c, on_progress=progress)
        reduce_s = time.perf_counter() - started
        after = worker_jobs()
        rss = c.run(peak_rss_gb)
    return {"reduce_s": round(reduce_s, 2), "with_start_s": round(time.perf_counter() - t0, 2),
            "jobs_before": before, "cancelled": cancelled,
            "jobs_started_after": [j for j in after if j not in before],
            "surviving_workers_peak_rss_gb": sorted(round(v, 2) for v in rss.values())}


def equal_tables(a_path: str, b_path: str) -> dict[str, int]:
    """Rows per table, after checking that the two lakes' tables are equal, every
    column exactly, four layers at a time (bounded memory at 200,000 graphs)."""
    import polars as pl

    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.schemas import DERIVED

    rows = {}
    for table, key in KEYS.items():
        names = DERIVED[table].schema.names
        a_all, b_all = (Lake(p).table(table, MODEL, CORPUS).select(names)
                        for p in (a_path, b_path))
        rows[table] = 0
        for first in range(-1, LAYERS, 4):
            in_slice = pl.col(key[0]).is_between(first, first + 3)
            a, b = (t.filter(in_slice).collect().sort(key) for t in (a_all, b_all))
            assert a.equals(b), f"{table}, layers {first}..{first + 3}: the tables differ"
            rows[table] += a.height
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", type=int, default=200000)
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "circuit-atlas-bench"))
    ap.add_argument("--jobs", type=int, default=2, help="adaptive minimum = maximum")
    ap.add_argument("--worker-memory", default="2GB")
    ap.add_argument("--cancel-at", type=float, default=0.3,
                    help="share of the shard tasks done when one worker job is cancelled")
    args = ap.parse_args()
    lake_path = bench_lake(args.dir, args.graphs, args.per_shard, args.seed)
    ensure_lake(lake_path, args.graphs, args.per_shard, args.seed)
    twin_path = twin(lake_path, lake_path + "-slurm-twin")
    tmp = tempfile.mkdtemp(prefix="slurm-bench-", dir=args.dir)
    try:
        slurm = on_slurm(twin_path, args.jobs, args.worker_memory, args.cancel_at, tmp)
        t0 = time.perf_counter()
        run_ours(lake_path, args.jobs, args.worker_memory)
        local_s = round(time.perf_counter() - t0, 2)
        rows = equal_tables(twin_path, lake_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(twin_path, ignore_errors=True)
    print(json.dumps({"machine": describe(), "graphs": args.graphs, "tables_rows": rows,
                      "tables_equal": True, "slurm": slurm, "local_s": local_s,
                      "worker_memory": args.worker_memory}, indent=1))


if __name__ == "__main__":
    main()
