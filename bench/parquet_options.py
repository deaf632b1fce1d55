"""The lake's Parquet options against pyarrow's defaults, and dictionary-encoded
partition columns against plain strings, on one reduced edge table, in one run.

    .venv/bin/python bench/parquet_options.py [--rows 3300000] [--repeat 3]

Prints the best of ``--repeat`` write and read times and the file sizes (zstd in
both): the figures ``lake.schemas.parquet_options`` and
``TableSpec.partitioning_schema`` cite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from circuit_atlas.lake.schemas import EDGE_STATS, parquet_options  # noqa: E402
from circuit_atlas.machine import describe  # noqa: E402


def edge_table(rows: int, seed: int = 0) -> pa.Table:
    """A reduced edge table sorted by its key, as one source layer's file is."""
    rng = np.random.default_rng(seed)
    key = np.sort(rng.choice(32 * 14336 * 40, rows, replace=False))
    count = rng.geometric(0.3, rows).astype(np.int64)
    w = rng.normal(size=rows) * 1e-3
    cols = {
        "src_layer": np.full(rows, 3, np.int16),
        "src_neuron": (key // (32 * 40) % 14336).astype(np.int32),
        "tgt_layer": (key // 14336 % 32).astype(np.int16),
        "tgt_neuron": (key % 14336).astype(np.int32),
        "count": count, "graph_count": np.minimum(count, rng.geometric(0.4, rows)),
        "weight_sum": w * count, "weight_abs_sum": np.abs(w) * count,
        "weight_sq_sum": w * w * count, "weight_min": (w - 1e-4).astype(np.float32),
        "weight_max": (w + 1e-4).astype(np.float32), "mean_weight": w,
        "mean_abs_weight": np.abs(w),
    }
    return pa.table(cols, schema=EDGE_STATS.schema)


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_300_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    table = edge_table(args.rows)
    tmp = tempfile.mkdtemp(prefix="parquet-options-")
    ours, plain = os.path.join(tmp, "ours.parquet"), os.path.join(tmp, "plain.parquet")
    options = parquet_options(table.schema)
    w_ours = best(lambda: pq.write_table(table, ours, **options), args.repeat)
    w_plain = best(lambda: pq.write_table(table, plain, compression="zstd"), args.repeat)
    r_ours = best(lambda: pq.read_table(ours), args.repeat)
    r_plain = best(lambda: pq.read_table(plain), args.repeat)
    for path in (ours, plain):  # the options change the encoding, never the data
        if not pq.read_table(path).equals(table):
            raise SystemExit(f"{path}: read back differs from what was written")
    print(f"{describe()}, {time.strftime('%Y-%m-%d')}; an edge table of {args.rows:,} rows, "
          f"best of {args.repeat}")
    print("| | pyarrow defaults (zstd) | the lake's options | ratio |")
    print("|---|---|---|---|")
    print(f"| write | {w_plain:.2f} s | {w_ours:.2f} s | {w_ours / w_plain:.2f} |")
    print(f"| read | {r_plain:.2f} s | {r_ours:.2f} s | {r_ours / r_plain:.2f} |")
    s_plain, s_ours = os.path.getsize(plain), os.path.getsize(ours)
    print(f"| size | {s_plain / 1e6:.0f} MB | {s_ours / 1e6:.0f} MB | {s_ours / s_plain:.2f} |")

    # partition columns: what a dataset read adds for model and corpus
    parts = os.path.join(tmp, "parts")
    for i in range(2):
        d = os.path.join(parts, "model=m", f"corpus=c{i}")
        os.makedirs(d)
        pq.write_table(table, os.path.join(d, "part.parquet"), **options)
    times = {}
    for name, kind in (("dictionary", pa.dictionary(pa.int32(), pa.string())),
                       ("string", pa.string())):
        values = {"model": pa.array(["m"]), "corpus": pa.array(["c0", "c1"])}
        partitioning = ds.partitioning(pa.schema([("model", kind), ("corpus", kind)]),
                                       flavor="hive",
                                       dictionaries=values if name == "dictionary" else None)
        data = ds.dataset(parts, format="parquet", partitioning=partitioning)
        times[name] = best(data.to_table, args.repeat)
    print(f"read {2 * args.rows:,} rows with 2 partition columns: dictionary "
          f"{times['dictionary']:.2f} s, plain string {times['string']:.2f} s (+"
          f"{times['string'] - times['dictionary']:.2f} s)")
    for root, _, files in os.walk(tmp, topdown=False):
        for f in files:
            os.remove(os.path.join(root, f))
        os.rmdir(root)


if __name__ == "__main__":
    main()
