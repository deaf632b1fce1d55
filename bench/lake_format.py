"""Commit latency and snapshot-open time at many commits: our shard format against
Delta Lake (delta-rs), for the graph job's workload.

One *shard commit* is what a graph job does per shard: a graphs table (one row per
graph), a nodes table and an edges table for ``--graphs-per-shard`` graphs.

* ours: ``Lake.open_shard`` ... commit (three Parquet files renamed into place, then
  the shard's commit record created exclusively in the log); opening a snapshot is
  reading the log (the last checkpoint and the records after it) plus the file list;
* Delta: one ``write_deltalake(mode="append")`` per table (three tables: Delta commits
  one table at a time), with the commit metadata in ``custom_metadata``; opening a
  snapshot is ``DeltaTable(path)`` plus ``file_uris()`` for each of the three tables.

Latency p50/p99 is printed per block of commits, so its growth with the table's
size shows; ``--processes`` commits from that many processes at once (contention).

    .venv/bin/python bench/lake_format.py --commits 20000 --every 2000
    .venv/bin/python bench/lake_format.py --commits 400 --processes 8 --every 400
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from circuit_atlas.machine import describe  # noqa: E402
from tests.factories import graph_tables, prompts_of  # noqa: E402

MODEL = "bench/model"
PARAMS = {"candidates": 50}


def tables_for(worker: int, i: int, graphs: int) -> dict[str, pa.Table]:
    rng = np.random.default_rng(worker * 1_000_003 + i)
    return graph_tables(rng, prompts_of(graphs, f"w{worker}-s{i}"), MODEL, PARAMS,
                        max_nodes=60, max_edges=400)


def ours(root: str, worker: int, start: int, n: int, graphs: int) -> list[float]:
    from circuit_atlas.lake import Lake

    lake = Lake(root)
    out = []
    for i in range(start, start + n):
        tables = tables_for(worker, i, graphs)
        t0 = time.perf_counter()
        with lake.open_shard(MODEL, "c", params=PARAMS, model_revision="r") as shard:
            for name, table in tables.items():
                shard.write(name, table)
        out.append(time.perf_counter() - t0)
    return out


def delta(root: str, worker: int, start: int, n: int, graphs: int) -> list[float]:
    from deltalake import CommitProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError

    out = []
    for i in range(start, start + n):
        tables = tables_for(worker, i, graphs)
        meta = {"shard": f"{worker}-{i}", "prompt_ids": json.dumps(
            tables["graphs"].column("prompt_id").to_pylist())}
        t0 = time.perf_counter()
        for name, table in tables.items():
            for attempt in range(50):  # delta-rs retries too; contention can exhaust it
                try:
                    write_deltalake(f"{root}/{name}", table, mode="append",
                                    commit_properties=CommitProperties(custom_metadata=meta))
                    break
                except CommitFailedError:
                    if attempt == 49:
                        raise
        out.append(time.perf_counter() - t0)
    return out


def open_snapshot(kind: str, root: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    if kind == "ours":
        from circuit_atlas.lake import Lake, log

        log._CACHE.clear()  # a reader's first open, not the records this process holds
        lake = Lake(root)
        files = [f for t in ("graphs", "graph_nodes", "graph_edges")
                 for f in lake.files(t, validate=False)]
    else:
        from deltalake import DeltaTable

        files = [f for t in ("graphs", "graph_nodes", "graph_edges")
                 for f in DeltaTable(f"{root}/{t}").file_uris()]
    return time.perf_counter() - t0, len(files)


def _work(args):
    kind, root, worker, start, n, graphs = args
    return (ours if kind == "ours" else delta)(root, worker, start, n, graphs)


def run(kind: str, commits: int, every: int, processes: int, graphs: int) -> None:
    tmp = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    root = f"{tmp}/lake"
    if kind == "ours":
        from circuit_atlas.lake import Lake

        Lake.init(root)
    done = 0
    try:
        with mp.get_context("spawn").Pool(processes) as pool:
            while done < commits:
                block = min(every, commits - done)
                per = -(-block // processes)
                jobs = [(kind, root, w, done + w * per, min(per, block - w * per), graphs)
                        for w in range(processes) if block - w * per > 0]
                t0 = time.perf_counter()
                lat = np.concatenate([np.array(x) for x in pool.map(_work, jobs)])
                wall = time.perf_counter() - t0
                done += len(lat)
                opened, files = open_snapshot(kind, root)
                if files != 3 * done:  # every commit landed, each one shard's 3 files
                    raise SystemExit(f"{kind}: {files} files after {done} commits")
                p50, p99 = np.percentile(lat, [50, 99]) * 1e3
                print(f"| {kind} | {processes} | {done:,} | {p50:.0f} ms | {p99:.0f} ms | "
                      f"{len(lat) / wall:.1f} | "
                      f"{opened * 1e3:.0f} ms ({files:,} files) |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--every", type=int, default=500, help="print a row per this many")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--graphs-per-shard", type=int, default=4)
    ap.add_argument("--format", choices=["ours", "delta", "both"], default="both")
    args = ap.parse_args()
    print(f"{describe()}, {time.strftime('%Y-%m-%d')}; {args.graphs_per_shard} graphs per "
          "shard (3 tables)")
    print("| format | processes | commits so far | p50 | p99 | commits/s | open snapshot |")
    print("|---|---|---|---|---|---|---|")
    for kind in (["ours", "delta"] if args.format == "both" else [args.format]):
        run(kind, args.commits, args.every, args.processes, args.graphs_per_shard)


if __name__ == "__main__":
    main()
