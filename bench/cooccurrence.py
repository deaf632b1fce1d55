"""Co-occurrence on the reduce benchmark's synthetic lake, against DuckDB, in one run.

    .venv/bin/python bench/cooccurrence.py                 # 20,000 graphs
    .venv/bin/python bench/cooccurrence.py --graphs 5000

The lake is bench/reduce.py's (generated once, cached) and is reduced first if it has
no neurons table. Each engine runs in its own subprocess; the parent samples the RSS
of its process tree. Both compute, over the graphs' MLP-neuron sets, the pairs of
non-hub neurons (hubs: in more than half of the graphs) found together in at least
--min-count graphs, with their Jaccard and normalised PMI, and each neuron's top-k by
Jaccard (ties: joint count, then the other neuron); DuckDB does it as a self-join on
graph_id. The parent checks that the two tables hold the same rows (metrics to 1e-12)
before printing times, peak memory and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _measure import measure  # noqa: E402
from reduce import CORPUS, LAYERS, MODEL, bench_lake, ensure_lake, lake_arguments  # noqa: E402

from circuit_atlas.machine import describe  # noqa: E402


def run_ours(lake_path: str, k: int, min_count: int, workers: int | None,
             worker_memory: str | None) -> None:
    from circuit_atlas.analysis.cooccurrence import cooccurrence_lake
    from circuit_atlas.etl.clusters import dask_client
    from circuit_atlas.lake import Lake

    with dask_client(n_workers=workers, memory_limit=worker_memory, echo=None) as client:
        report = cooccurrence_lake(Lake(lake_path), MODEL, [CORPUS], client, k=k,
                                   min_count=min_count)
    print(json.dumps({"hubs": report.hubs, "graphs": report.graphs}))


def run_duckdb(lake_path: str, out: str, k: int, min_count: int, threads: int,
               memory: str | None) -> None:
    import duckdb

    from circuit_atlas.lake import Lake

    files = Lake(lake_path).files("graph_nodes", MODEL, CORPUS)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    if memory:  # DuckDB's own default is 80% of RAM; it spills beyond the limit
        con.execute(f"SET memory_limit = '{memory}'")
    con.execute(f"""
        CREATE TABLE gn AS SELECT DISTINCT graph_id, layer::BIGINT * 4294967296 + "neuron" AS k
        FROM read_parquet({files!r}) WHERE layer >= 0 AND layer < {LAYERS} AND "neuron" >= 0""")
    (n,) = con.execute("SELECT count(DISTINCT graph_id) FROM gn").fetchone()
    con.execute("CREATE TABLE cnt AS SELECT k, count(*) AS c FROM gn GROUP BY k")
    con.execute(f"CREATE TABLE g2 AS SELECT gn.* FROM gn JOIN cnt USING (k) WHERE c <= {n} * 0.5")
    con.execute(f"""
        COPY (
          WITH pairs AS (
            SELECT a.k AS a, b.k AS b, count(*) AS joint FROM g2 a JOIN g2 b
            ON a.graph_id = b.graph_id AND a.k <> b.k GROUP BY ALL HAVING joint >= {min_count}),
          m AS (
            SELECT a, b, joint, ca.c AS count, cb.c AS other_count,
                   joint / (ca.c + cb.c - joint) AS jaccard,
                   CASE WHEN joint < {n} THEN ln((joint / {n}) / ((ca.c / {n}) * (cb.c / {n})))
                        / -ln(joint / {n}) ELSE 1.0 END AS npmi
            FROM pairs JOIN cnt ca ON ca.k = a JOIN cnt cb ON cb.k = b)
          SELECT (a // 4294967296)::SMALLINT AS layer, (a % 4294967296)::INTEGER AS neuron,
                 (b // 4294967296)::SMALLINT AS other_layer,
                 (b % 4294967296)::INTEGER AS other_neuron, joint AS joint_count, count,
                 other_count, jaccard, npmi
          FROM m QUALIFY row_number() OVER (
            PARTITION BY a ORDER BY jaccard DESC, joint DESC, b) <= {k}
        ) TO '{out}/cooccurrence.parquet' (FORMAT parquet)""")


def compare(lake_path: str, out: str) -> int:
    import numpy as np
    import polars as pl

    from circuit_atlas.lake import Lake

    cols = ["layer", "neuron", "other_layer", "other_neuron", "joint_count", "count",
            "other_count"]
    ours = Lake(lake_path).table("cooccurrence", MODEL, CORPUS).select(cols).collect()
    duck = pl.read_parquet(f"{out}/cooccurrence.parquet").select(cols).cast(
        dict(ours.schema))
    if len(ours) != len(duck) or not ours.sort(cols).equals(duck.sort(cols)):
        raise SystemExit(f"tables differ: ours {len(ours)} rows, DuckDB {len(duck)}")
    metrics = ["jaccard", "npmi"]
    ours_m = Lake(lake_path).table("cooccurrence", MODEL, CORPUS).select(
        cols + metrics).collect().sort(cols)
    duck_m = pl.read_parquet(f"{out}/cooccurrence.parquet").select(cols + metrics).cast(
        dict(ours_m.schema)).sort(cols)
    for m in metrics:
        np.testing.assert_allclose(ours_m[m].to_numpy(), duck_m[m].to_numpy(), rtol=1e-12,
                                   atol=1e-12, err_msg=m)
    return len(ours)


def ensure_reduced(lake_path: str) -> None:
    from circuit_atlas.etl.clusters import dask_client
    from circuit_atlas.etl.reduce import reduce_lake
    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    if lake.table_manifest(MODEL, CORPUS, "neurons") is None:
        with dask_client(echo=None) as client:
            reduce_lake(lake, MODEL, [CORPUS], client)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lake_arguments(ap)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--worker-memory", default=None, help="our workers' memory limit")
    ap.add_argument("--duckdb-memory", default=None, help="DuckDB's memory_limit")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DuckDB threads")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate the engines this many times; medians are reported")
    ap.add_argument("--engine", choices=["duckdb", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lake_path = bench_lake(args.dir, args.graphs, args.per_shard, args.seed)
    if args.engine == "ours":
        return run_ours(lake_path, args.k, args.min_count, args.workers, args.worker_memory)
    if args.engine == "duckdb":
        return run_duckdb(lake_path, args.out, args.k, args.min_count, args.threads,
                          args.duckdb_memory)
    ensure_lake(lake_path, args.graphs, args.per_shard, args.seed)
    ensure_reduced(lake_path)
    out = tempfile.mkdtemp(prefix="duck-co-")
    duck_memory = ["--duckdb-memory", args.duckdb_memory] if args.duckdb_memory else []
    ours_options = [*(["--workers", str(args.workers)] if args.workers else []),
                    *(["--worker-memory", args.worker_memory] if args.worker_memory else [])]
    common = ["--graphs", str(args.graphs), "--per-shard", str(args.per_shard), "--seed",
              str(args.seed), "--dir", args.dir, "--k", str(args.k), "--min-count",
              str(args.min_count)]
    runs = []
    try:
        for _ in range(args.repeat):  # alternate: the shared machine's load drifts
            runs.append((*measure(__file__, ["--engine", "duckdb", "--out", out, "--threads",
                                             str(args.threads), *duck_memory, *common], ROOT,
                                  per_process=True),
                         *measure(__file__, ["--engine", "ours", *common, *ours_options], ROOT,
                                  per_process=True)))
        rows = compare(lake_path, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    duck_s, duck_gb, _, ours_s, ours_gb, ours_one = (statistics.median(r[i] for r in runs)
                                                      for i in range(6))
    ratios = [r[3] / r[0] for r in runs]
    print(json.dumps({
        "machine": f"{describe()}", "graphs": args.graphs,
        "rows": rows, "duckdb_s": round(duck_s, 2), "duckdb_peak_gb": round(duck_gb, 2),
        "ours_s": round(ours_s, 2), "ours_peak_gb": round(ours_gb, 2),
        "ours_largest_process_gb": round(ours_one, 2),
        "worker_memory": args.worker_memory,
        "ratio_ours_to_duckdb": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios]}, indent=1))


if __name__ == "__main__":
    main()
