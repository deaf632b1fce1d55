"""The reduce against DuckDB on the same synthetic lake, in one run.

    .venv/bin/python bench/reduce.py                      # 20,000 graphs, ~31M edge rows
    .venv/bin/python bench/reduce.py --graphs 80000       # 4x
    .venv/bin/python bench/reduce.py --worker-memory 2GB  # our reduce under a 2 GB worker limit

The lake is generated once (seeded, through the lake's own shard writer) and cached
under --dir. Each engine runs in its own subprocess; the parent samples the RSS of
that process and all its children (Dask workers included) every 50 ms. Both compute
the edge table (count, distinct graphs, sum, abs sum, sum of squares, min, max) and
each neuron's distinct-graph count, write Parquet, and the parent checks that the
two edge tables agree before printing wall times, peak memory and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from circuit_atlas.machine import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODEL, CORPUS = "bench/llama-8b-shaped", "synthetic"
LAYERS, NEURONS = 32, 14336  # 458,752 neurons, as Llama-3.1-8B
SHAPE = {"n_layers": LAYERS, "n_neurons": NEURONS, "d_model": 4096, "vocab_size": 128256}


def generate(path: str, graphs: int, per_shard: int, seed: int) -> None:
    """Heavy-tailed: each graph's ~110 active neurons are 70 drawn from a Zipf popularity
    (a few neurons in most graphs) and 40 uniformly; edges join random active pairs."""
    from circuit_atlas.lake import GRAPH_EDGES, GRAPH_NODES, GRAPHS, Lake, graph_id, params_hash

    lake = Lake.init(path)
    rng = np.random.default_rng(seed)
    n_all = LAYERS * NEURONS
    perm = rng.permutation(n_all)
    ph = params_hash({"synthetic": seed})
    for first in range(0, graphs, per_shard):
        n_g = min(per_shard, graphs - first)
        gids = np.array([graph_id(MODEL, f"p{first + i}", ph) for i in range(n_g)], np.int64)
        per_graph = rng.integers(1200, 1900, n_g)  # ~1550 edge rows per graph
        n = int(per_graph.sum())
        graph = np.repeat(gids, per_graph)
        head = perm[np.minimum(rng.zipf(1.3, (n_g, 70)) - 1, n_all - 1)]
        active = np.concatenate([head, rng.integers(0, n_all, (n_g, 40))], axis=1)
        row_graph = np.repeat(np.arange(n_g), per_graph)
        src = active[row_graph, rng.integers(0, 110, n)]
        tgt = active[row_graph, rng.integers(0, 110, n)]
        lo, hi = np.minimum(src, tgt), np.maximum(src, tgt)
        edges = pa.table({
            "graph_id": graph, "src_layer": (lo // NEURONS).astype(np.int16),
            "src_neuron": (lo % NEURONS).astype(np.int32),
            "src_pos": rng.integers(0, 64, n).astype(np.int32),
            "tgt_layer": (hi // NEURONS).astype(np.int16),
            "tgt_neuron": (hi % NEURONS).astype(np.int32),
            "tgt_pos": rng.integers(0, 64, n).astype(np.int32),
            "weight": rng.standard_t(3, n).astype(np.float32),
        }, schema=GRAPH_EDGES.schema)
        node_ids = np.unique(np.stack([np.repeat(np.arange(n_g), 110), active.ravel()], 1),
                             axis=0)
        k = len(node_ids)
        nodes = pa.table({
            "graph_id": gids[node_ids[:, 0]], "layer": (node_ids[:, 1] // NEURONS).astype(
                np.int16), "neuron": (node_ids[:, 1] % NEURONS).astype(np.int32),
            "position": rng.integers(0, 64, k).astype(np.int32),
            "activation": rng.normal(size=k).astype(np.float32),
            "score": rng.normal(size=k).astype(np.float32),
            "influence": rng.random(k).astype(np.float32),
        }, schema=GRAPH_NODES.schema)
        tokens = rng.integers(0, 128256, (n_g, 64)).astype(np.int32)
        graphs_t = pa.table({
            "graph_id": gids, "prompt_id": [f"p{first + i}" for i in range(n_g)],
            "n_tokens": np.full(n_g, 64, np.int32), "input_tokens": list(tokens),
            "target_tokens": list(tokens[:, :3]), "target_probs": [[0.5, 0.2, 0.1]] * n_g,
            "params_hash": [ph] * n_g,
        }, schema=GRAPHS.schema)
        with lake.open_shard(MODEL, CORPUS, params={"synthetic": seed},
                             model_shape=SHAPE) as shard:
            shard.write("graphs", graphs_t)
            shard.write("graph_nodes", nodes)
            shard.write("graph_edges", edges)


def bench_lake(directory: str, graphs: int, per_shard: int, seed: int) -> str:
    return os.path.join(directory, f"lake3-{graphs}-{per_shard}-{seed}")


def ensure_lake(lake_path: str, graphs: int, per_shard: int, seed: int) -> None:
    """Generate the synthetic lake once (cached under its parameters)."""
    if not os.path.exists(os.path.join(lake_path, "_lake.json")):
        shutil.rmtree(lake_path + ".tmp", ignore_errors=True)  # an interrupted generation
        t0 = time.perf_counter()
        generate(lake_path + ".tmp", graphs, per_shard, seed)
        os.rename(lake_path + ".tmp", lake_path)
        print(f"generated {lake_path} in {time.perf_counter() - t0:.1f} s")


def run_duckdb(lake_path: str, out: str, threads: int) -> None:
    import duckdb

    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    edges = [f"'{f}'" for f in lake.files("graph_edges", MODEL, CORPUS, validate=False)]
    nodes = [f"'{f}'" for f in lake.files("graph_nodes", MODEL, CORPUS, validate=False)]
    con = duckdb.connect(config={"threads": threads})
    con.sql(f"""COPY (SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count(*) AS count,
            count(DISTINCT graph_id) AS graph_count, sum(weight::DOUBLE) AS weight_sum,
            sum(abs(weight::DOUBLE)) AS weight_abs_sum,
            sum(weight::DOUBLE * weight::DOUBLE) AS weight_sq_sum,
            min(weight) AS weight_min, max(weight) AS weight_max
            FROM read_parquet([{', '.join(edges)}]) WHERE src_neuron <> -1 GROUP BY ALL)
            TO '{out}/edges.parquet' (FORMAT parquet)""")
    con.sql(f"""COPY (SELECT layer, neuron, count(DISTINCT graph_id) AS graph_count
            FROM read_parquet([{', '.join(nodes)}]) WHERE neuron <> -1 GROUP BY ALL)
            TO '{out}/neurons.parquet' (FORMAT parquet)""")


def run_ours(lake_path: str, workers: int, worker_memory: str | None, chunk: int) -> None:
    from circuit_atlas.etl.clusters import dask_client
    from circuit_atlas.etl.reduce import reduce_lake
    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    where = f"model={MODEL.replace('/', '--')}/corpus={CORPUS}"
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):  # from scratch:
        for area in ("tables", "_log/tables", "_state"):  # versions, their log, fold state
            shutil.rmtree(lake.path(f"{area}/{where}/{table}"), ignore_errors=True)
    with dask_client(n_workers=workers, memory_limit=worker_memory, echo=None) as client:
        reduce_lake(lake, MODEL, [CORPUS], client, chunk=chunk)


def measure(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, process tree) of this script run with ``argv``."""
    from _measure import measure as run

    return run(__file__, argv, ROOT)


def compare(lake_path: str, duck_out: str) -> int:
    import polars as pl

    from circuit_atlas.lake import Lake

    key = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]
    ours = Lake(lake_path).table("edges", MODEL, CORPUS).select(
        *key, "count", "graph_count", "weight_sum", "weight_min", "weight_max").collect()
    duck = pl.read_parquet(f"{duck_out}/edges.parquet").select(
        *key, "count", "graph_count", "weight_sum", "weight_min", "weight_max")
    ours, duck = ours.sort(key), duck.with_columns(
        pl.col(c).cast(ours.schema[c]) for c in duck.columns).sort(key)
    assert ours.height == duck.height, (ours.height, duck.height)
    for c in (*key, "count", "graph_count", "weight_min", "weight_max"):
        assert (ours[c] == duck[c]).all(), c
    np.testing.assert_allclose(ours["weight_sum"].to_numpy(), duck["weight_sum"].to_numpy(),
                               rtol=1e-9, atol=1e-9)
    neurons_ours = Lake(lake_path).table("neurons", MODEL, CORPUS).filter(
        pl.col("layer").is_between(0, LAYERS - 1)).select("layer", "neuron", "graph_count")
    neurons_duck = pl.read_parquet(f"{duck_out}/neurons.parquet")
    assert neurons_ours.collect().height == neurons_duck.height
    return ours.height


def lake_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that name the synthetic lake (shared with bench/cooccurrence.py)."""
    ap.add_argument("--graphs", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "circuit-atlas-bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lake_arguments(ap)
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--worker-memory", default=None)
    ap.add_argument("--chunk", type=int, default=64, help="shards folded per task (ours)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DuckDB threads")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate the engines this many times; medians are reported")
    ap.add_argument("--engine", choices=["duckdb", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lake_path = bench_lake(args.dir, args.graphs, args.per_shard, args.seed)
    if args.engine == "duckdb":
        return run_duckdb(lake_path, args.out, args.threads)
    if args.engine == "ours":
        return run_ours(lake_path, args.workers, args.worker_memory, args.chunk)

    ensure_lake(lake_path, args.graphs, args.per_shard, args.seed)
    from circuit_atlas.lake import Lake

    info = Lake(lake_path).info()["models"][MODEL.replace("/", "--")]["corpora"][CORPUS]
    duck_out = tempfile.mkdtemp(prefix="duck-")
    common = ["--graphs", str(args.graphs), "--per-shard", str(args.per_shard), "--seed",
              str(args.seed), "--dir", args.dir]
    duck_argv = ["--engine", "duckdb", "--out", duck_out, "--threads", str(args.threads),
                 *common]
    ours_argv = ["--engine", "ours", *common, "--chunk", str(args.chunk),
                 *(["--workers", str(args.workers)] if args.workers else []),
                 *(["--worker-memory", args.worker_memory] if args.worker_memory else [])]
    runs = []
    try:
        for _ in range(args.repeat):  # alternate: the shared machine's load drifts
            runs.append((*measure(duck_argv), *measure(ours_argv)))
        unique = compare(lake_path, duck_out)
    finally:
        shutil.rmtree(duck_out, ignore_errors=True)
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    duck_s, duck_gb, ours_s, ours_gb = med
    ratios = [r[2] / r[0] for r in runs]
    print(json.dumps({
        "machine": f"{describe()}", "graphs": info["graphs"],
        "edge_rows": info["edges"], "unique_edges": unique, "shards": info["shards"],
        "duckdb_s": round(duck_s, 2), "duckdb_peak_gb": round(duck_gb, 2),
        "ours_s": round(ours_s, 2), "ours_peak_gb": round(ours_gb, 2),
        "ratio_ours_to_duckdb": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "workers": args.workers, "worker_memory": args.worker_memory,
    }, indent=1))


if __name__ == "__main__":
    main()
