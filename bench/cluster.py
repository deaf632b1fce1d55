"""Clustering at scale: Infomap and Leiden on synthetic planted networks.

    .venv/bin/python bench/cluster.py                       # 1M and 5M links
    .venv/bin/python bench/cluster.py --links 1000000       # one size
    .venv/bin/python bench/cluster.py --flow-models [--lake demo-lake]

Each run happens in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its
own; the parent prints time, peak memory, the estimate the CLI would have made
before starting (``clustering.run.estimate_memory``) and the NMI to the planted
modules. Side by side, the original atlas's way of loading Infomap (``add_link`` once per link
from Python) against ours (one numpy array).

``--flow-models`` compares Infomap's flow models: recovery of planted modules on
layered DAG-like networks, and, with ``--lake``, how far each separates the neurons
of the demo's medical corpus from the general one (eta² of the neurons' medical
share across top modules, against a permutation null).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from circuit_atlas.machine import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYERS = 32
MODULE = 100  # planted module size
OUT_LINKS = 25  # links per node


def planted(n_links: int, seed: int = 0, p_in: float = 0.8):
    """A sparse layered network with planted modules of MODULE nodes: each link starts
    at a random node and ends inside its module with probability ``p_in``; it is
    oriented from the lower layer to the higher (same-layer pairs are dropped)."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n = max(MODULE * 2, n_links // OUT_LINKS)
    module = np.arange(n) // MODULE
    layer = rng.integers(0, LAYERS, n)
    m = int(n_links * 1.25)
    a = rng.integers(0, n, m)
    inside = rng.random(m) < p_in
    b = np.where(inside, module[a] * MODULE + rng.integers(0, MODULE, m), rng.integers(0, n, m))
    b = np.minimum(b, n - 1)
    keep = layer[a] != layer[b]
    a, b = a[keep], b[keep]
    lo = np.where(layer[a] < layer[b], a, b)
    hi = np.where(layer[a] < layer[b], b, a)
    df = pl.DataFrame({"s": lo, "t": hi}).unique().head(n_links)
    s, t = df["s"].to_numpy(), df["t"].to_numpy()
    return pl.DataFrame({
        "src_layer": layer[s].astype(np.int16), "src_neuron": s.astype(np.int32),
        "tgt_layer": layer[t].astype(np.int16), "tgt_neuron": t.astype(np.int32),
        "w": rng.uniform(0.01, 0.04, len(s)), "count": np.full(len(s), 9)}), module


def one(method: str, n_links: int, loader: str) -> dict:
    """Runs in the child: build, cluster, report."""
    from circuit_atlas.clustering.methods import cluster, method_params
    from circuit_atlas.clustering.network import build_network, network_params
    from circuit_atlas.clustering.run import estimate_memory
    from circuit_atlas.clustering.tables import assignment_table, cluster_table, nmi

    links, module = planted(n_links)
    t = time.perf_counter()
    net = build_network(links, network_params())
    del links
    if loader == "python":  # the original atlas's way: one add_link call per link
        import infomap

        t = time.perf_counter()
        im = infomap.Infomap(silent=True)
        for s, d, w in zip(net.src.tolist(), net.tgt.tolist(), net.weight.tolist(),
                           strict=True):
            im.add_link(s, d, w)
        py = time.perf_counter() - t
        t = time.perf_counter()
        network = infomap.Network()
        network.add_links(np.column_stack([net.src, net.tgt, net.weight]))
        return {"python_s": py, "numpy_s": time.perf_counter() - t, "links": net.n_links}
    build = time.perf_counter() - t
    t = time.perf_counter()
    partition = cluster(net, method, method_params(method))
    run = time.perf_counter() - t
    t = time.perf_counter()
    cluster_table(assignment_table(net, partition))
    tables = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "nodes": net.n_nodes, "links": net.n_links,
            "build_s": build, "cluster_s": run, "tables_s": tables, "peak": peak,
            "estimate": estimate_memory(method, net.n_nodes, net.n_links),
            "nmi": nmi(module[net.index], partition.top),
            "top_modules": partition.stats["top_modules"], "levels": partition.stats["levels"]}


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale(sizes: list[int]) -> None:
    print(f"{describe()}, {time.strftime('%Y-%m-%d')}")
    print("| links | nodes | method | build | cluster | tables | peak RSS | estimate "
          "| estimate/peak | top modules | levels | NMI planted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for method in ("infomap", "leiden"):
            r = child(method, str(n), "numpy")
            print(f"| {r['links']:,} | {r['nodes']:,} | {method} | {r['build_s']:.1f} s "
                  f"| {r['cluster_s']:.1f} s | {r['tables_s']:.1f} s "
                  f"| {r['peak'] / 2**30:.2f} GiB | {r['estimate'] / 2**30:.2f} GiB "
                  f"| {r['estimate'] / r['peak']:.2f} | {r['top_modules']:,} | {r['levels']} "
                  f"| {r['nmi']:.3f} |", flush=True)
    r = child("infomap", str(sizes[0]), "python")
    print(f"\nloading {r['links']:,} links into Infomap: add_link per link {r['python_s']:.2f} s,"
          f" one numpy array {r['numpy_s']:.2f} s (ratio {r['numpy_s'] / r['python_s']:.3f})")


def flow_models(lake_path: str | None) -> None:
    import polars as pl

    from circuit_atlas.clustering.methods import FLOW_MODELS, cluster, method_params
    from circuit_atlas.clustering.network import build_network, link_frame, network_params
    from circuit_atlas.clustering.tables import nmi
    from tests.factories import planted_edges

    print("planted layered modules (8 x 40 neurons, 6 layers): NMI of the top modules")
    print("| p_in | p_out | seed | " + " | ".join(FLOW_MODELS) + " | leiden |")
    print("|---" * (len(FLOW_MODELS) + 4) + "|")
    wins = dict.fromkeys(FLOW_MODELS, 0)
    for p_in, p_out in ((0.3, 0.01), (0.5, 0.01), (0.3, 0.002)):
        for seed in range(4):
            table, module, _ = planted_edges(np.random.default_rng(seed), modules=8, size=40,
                                             p_in=p_in, p_out=p_out, n_layers=6)
            params = network_params()
            net = build_network(link_frame(table.lazy(), params, 6).collect(), params)
            row = []
            for fm in FLOW_MODELS:
                score = nmi(module[net.index], cluster(net, "infomap", method_params(
                    "infomap", flow_model=fm)).top)
                wins[fm] += score >= 0.9
                row.append(f"{score:.3f}")
            leiden = cluster(net, "leiden", method_params("leiden")).top
            row.append(f"{nmi(module[net.index], leiden):.3f}")
            print(f"| {p_in} | {p_out} | {seed} | " + " | ".join(row) + " |")
    print("recovered (NMI >= 0.9): " + ", ".join(f"{k} {v}/12" for k, v in wins.items()))
    if lake_path is None:
        return
    from circuit_atlas.lake import Lake

    lake = Lake(lake_path)
    (model,) = lake.derived_tables()
    model = model.replace("--", "/")
    (corpus,) = [c for c in lake.derived_tables()[model.replace("/", "--")] if "+" in c]
    manifest = lake.table_manifest(model, corpus, "edges")
    n_layers = manifest["inputs"]["model_shape"]["n_layers"]
    share = lake.table("neuron_corpora", model, corpus).collect().pivot(
        "corpus_name", index=["layer", "neuron"], values="graph_count").fill_null(0)
    print(f"\ndemo atlas {lake_path}: eta² of the medical share across top modules (null: "
          "mean over 20 permutations)")
    print("| weight | min count | flow model | top modules | largest | eta² | null |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for weight in ("mean_abs_weight_sq", "mean_abs_weight"):
        for min_count in (3, 5):
            params = network_params(min_count=min_count, weight=weight)
            net = build_network(link_frame(lake.table("edges", model, corpus), params,
                                           n_layers).collect(), params)
            nodes = pl.DataFrame({"layer": net.layer, "neuron": net.index}).join(
                share, on=["layer", "neuron"], how="left")
            frac = (nodes["medical"] / (nodes["medical"] + nodes["general"])).to_numpy()

            def eta(labels, frac=frac):
                g = pl.DataFrame({"m": labels, "f": frac}).group_by("m").agg(
                    mu=pl.col("f").mean(), n=pl.len())
                return ((g["mu"] - frac.mean()) ** 2 * g["n"]).sum() / (
                    (frac - frac.mean()) ** 2).sum()

            for fm in FLOW_MODELS:
                p = cluster(net, "infomap", method_params("infomap", flow_model=fm))
                null = np.mean([eta(rng.permutation(p.top)) for _ in range(20)])
                print(f"| {weight} | {min_count} | {fm} | {p.stats['top_modules']} "
                      f"| {p.stats['largest_share']:.2f} | {eta(p.top):.3f} | {null:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", type=int, action="append")
    ap.add_argument("--flow-models", action="store_true")
    ap.add_argument("--lake")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        method, n, loader = args.child
        print(json.dumps(one(method, int(n), loader)))
    elif args.flow_models:
        flow_models(args.lake)
    else:
        scale(args.links or [1_000_000, 5_000_000])


if __name__ == "__main__":
    main()
