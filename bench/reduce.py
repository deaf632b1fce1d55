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


DUCKDB_SQL = """
-- the four tables of circuit-atlas's reduce, as one SQL user would write them
CREATE TEMP VIEW edge_rows AS SELECT * FROM read_parquet({edges}) WHERE src_neuron <> -1;
CREATE TEMP VIEW node_rows AS SELECT * FROM read_parquet({nodes}) WHERE neuron <> -1;
CREATE TEMP VIEW graph_rows AS SELECT graph_id, input_tokens, target_tokens[1] AS top_output
    FROM read_parquet({graphs});
COPY (SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count(*) AS count,
        count(DISTINCT graph_id) AS graph_count, sum(weight::DOUBLE) AS weight_sum,
        sum(abs(weight::DOUBLE)) AS weight_abs_sum,
        sum(weight::DOUBLE * weight::DOUBLE) AS weight_sq_sum,
        min(weight) AS weight_min, max(weight) AS weight_max,
        sum(weight::DOUBLE) / count(*) AS mean_weight,
        sum(abs(weight::DOUBLE)) / count(*) AS mean_abs_weight
      FROM edge_rows GROUP BY ALL) TO '{out}/edges.parquet' (FORMAT parquet);
COPY (SELECT layer, neuron, count(DISTINCT graph_id) AS graph_count, count(*) AS position_count,
        avg(activation::DOUBLE) AS activation_mean, max(activation) AS activation_max,
        sum(activation::DOUBLE * activation::DOUBLE) AS activation_sq_sum,
        avg(score::DOUBLE) AS score_mean, avg(abs(score::DOUBLE)) AS score_abs_mean,
        max(score) AS score_max, sum(score::DOUBLE * score::DOUBLE) AS score_sq_sum
      FROM node_rows GROUP BY ALL) TO '{out}/neurons.parquet' (FORMAT parquet);
COPY (SELECT layer, neuron, '{corpus}' AS corpus_name, count(DISTINCT graph_id) AS graph_count
      FROM node_rows GROUP BY ALL) TO '{out}/neuron_corpora.parquet' (FORMAT parquet);
COPY (WITH counted AS (
        SELECT layer, neuron, 'input' AS kind,
               input_tokens[least(position, len(input_tokens) - 1) + 1] AS token_id,
               count(*) AS count
          FROM node_rows JOIN graph_rows USING (graph_id) GROUP BY ALL
        UNION ALL
        SELECT layer, neuron, 'output' AS kind, top_output AS token_id, count(*) AS count
          FROM (SELECT DISTINCT graph_id, layer, neuron FROM node_rows)
          JOIN graph_rows USING (graph_id) GROUP BY ALL)
      SELECT layer, neuron, kind,
             row_number() OVER (PARTITION BY layer, neuron, kind
                                ORDER BY count DESC, token_id) - 1 AS rank, token_id, count
        FROM counted QUALIFY rank < {top_k}) TO '{out}/neuron_tokens.parquet' (FORMAT parquet);
"""


def run_duckdb(lake_path: str, out: str, threads: int, memory: str | None = None) -> None:
    """DuckDB computes what our reduce writes: all four tables (the lake's graphs hold
    no graph twice, so the reduce's skipping of repeated graphs has nothing to do)."""
    import duckdb

    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    files = {t: "[" + ", ".join(f"'{f}'" for f in lake.files(t, MODEL, CORPUS, validate=False))
             + "]" for t in ("graph_edges", "graph_nodes", "graphs")}
    con = duckdb.connect(config={"threads": threads,
                                 **({"memory_limit": memory} if memory else {})})
    con.execute(DUCKDB_SQL.format(edges=files["graph_edges"], nodes=files["graph_nodes"],
                                  graphs=files["graphs"], out=out, corpus=CORPUS, top_k=10))


def from_scratch(lake_path: str) -> None:
    """The four reduce tables removed: their versions, their log and the fold state."""
    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    where = f"model={MODEL.replace('/', '--')}/corpus={CORPUS}"
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        for area in ("tables", "_log/tables", "_state"):
            shutil.rmtree(lake.path(f"{area}/{where}/{table}"), ignore_errors=True)


def run_ours(lake_path: str, workers: int, worker_memory: str | None, chunk: int = 4096
             ) -> None:
    from circuit_atlas.etl.clusters import dask_client
    from circuit_atlas.etl.reduce import reduce_lake
    from circuit_atlas.lake import Lake

    from_scratch(lake_path)
    with dask_client(n_workers=workers, memory_limit=worker_memory, echo=None) as client:
        reduce_lake(Lake(lake_path), MODEL, [CORPUS], client, chunk=chunk)


def measure(argv: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS of the process tree and of its largest process (GB) of
    this script run with ``argv``."""
    from _measure import measure as run

    return run(__file__, argv, ROOT, per_process=True)


KEYS = {"edges": ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"],
        "neurons": ["layer", "neuron"], "neuron_corpora": ["layer", "neuron", "corpus_name"],
        "neuron_tokens": ["layer", "neuron", "kind", "rank"]}


def compare(lake_path: str, duck_out: str) -> dict[str, int]:
    """Rows per table, after checking that the two engines' tables hold the same rows:
    keys, counts, minima and maxima exactly, float sums and means to 1e-9. A few
    layers at a time (the first key column), so that 200,000 graphs' edges (~150M
    rows) are compared in bounded memory."""
    import polars as pl

    from circuit_atlas.lake import Lake
    from circuit_atlas.lake.schemas import DERIVED

    rows = {}
    for table, key in KEYS.items():
        names = DERIVED[table].schema.names
        ours_all = Lake(lake_path).table(table, MODEL, CORPUS).select(names)
        duck_all = pl.scan_parquet(f"{duck_out}/{table}.parquet").select(names)
        rows[table] = 0
        for first in range(-1, LAYERS, 4):
            in_slice = pl.col(key[0]).is_between(first, first + 3)
            ours = ours_all.filter(in_slice).collect()
            duck = duck_all.filter(in_slice).collect()
            ours, duck = ours.sort(key), duck.cast(dict(ours.schema)).sort(key)
            assert ours.height == duck.height, (table, first, ours.height, duck.height)
            for c in ours.columns:
                if ours.schema[c] == pl.Float64:
                    np.testing.assert_allclose(ours[c].to_numpy(), duck[c].to_numpy(),
                                               rtol=1e-9, atol=1e-9, err_msg=f"{table}.{c}")
                else:
                    assert (ours[c] == duck[c]).all(), f"{table}.{c} differs"
            rows[table] += ours.height
    return rows


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
    ap.add_argument("--chunk", type=int, default=4096, help="shards folded per task (ours)")
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
        rows = compare(lake_path, duck_out)
    finally:
        shutil.rmtree(duck_out, ignore_errors=True)
    duck_s, duck_gb, _, ours_s, ours_gb, ours_one = (statistics.median(r[i] for r in runs)
                                                      for i in range(6))
    ratios = [r[3] / r[0] for r in runs]
    print(json.dumps({
        "machine": f"{describe()}", "graphs": info["graphs"],
        "edge_rows": info["edges"], "tables_rows": rows, "shards": info["shards"],
        "duckdb_s": round(duck_s, 2), "duckdb_peak_gb": round(duck_gb, 2),
        "ours_s": round(ours_s, 2), "ours_peak_gb": round(ours_gb, 2),
        "ours_largest_process_gb": round(ours_one, 2),
        "seconds_per_million_rows": {"duckdb": round(duck_s / info["edges"] * 1e6, 3),
                                     "ours": round(ours_s / info["edges"] * 1e6, 3)},
        "ratio_ours_to_duckdb": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "workers": args.workers, "worker_memory": args.worker_memory,
    }, indent=1))


if __name__ == "__main__":
    main()
