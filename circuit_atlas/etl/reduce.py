"""The reduce on a Dask cluster: committed graph shards to the ``edges`` and ``neurons``
tables (and ``neuron_corpora``, ``neuron_tokens``). A thin wrapper around
:mod:`edge_reduce` and :mod:`neuron_reduce`:

1. one task per shard aggregates its edge rows per key (keys packed, split by source
   layer) and computes its neuron partials, and counts their rows per layer and
   block of neurons;
2. per table and bucket of parts (layers, or neuron ranges of a layer too big for
   one fold), a chain of tasks folds the shards' partials in commit order. Parts,
   buckets and chunks are sized from the workers' memory limit (:mod:`plan`), so no
   task holds more than a bucket's state and a budget of rows, however many graphs
   the lake holds;
3. per bucket, its last fold finalises and writes the published files and the state:
   for edges one file per part, for the neuron tables one per bucket;
4. the client publishes each table's manifest, which records the shards folded in,
   in order, the parameters, and the state files.

A second reduce folds only the shards committed since onto the stored state; the
result is bit-for-bit what a reduce from scratch gives (see :mod:`fold`), as long as
the shards' commit times order them as they were committed (one clock, or clocks in
sync; otherwise sums may differ in the last bit). A lost worker's tasks are
recomputed from the lake by Dask.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.etl import edge_reduce as er
from circuit_atlas.etl import neuron_reduce as nr
from circuit_atlas.etl import plan
from circuit_atlas.etl.fold import fold
from circuit_atlas.etl.params import ReduceParams
from circuit_atlas.etl.plan import Part
from circuit_atlas.lake import GRAPH_EDGES, GRAPH_NODES, GRAPHS, Lake, layout
from circuit_atlas.lake.schemas import EDGE_STATS, NEURON_CORPORA, NEURON_STATS, NEURON_TOKENS
from circuit_atlas.lake.shards import (
    Shard,
    describe_parameter_sets,
    ordered_shards,
    parameter_sets,
    repeated_graphs,
)
from circuit_atlas.lake.validate import read_parquet
from circuit_atlas.stage import Progress, Report, as_corpora, connect, open_lake

# The stored state's files: one per table and part. A state of an older layout is
# not extended (its parameters differ): the reduce starts over.
STATE_LAYOUT = "per-part"
EDGE_COLUMNS = ["graph_id", "src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "weight"]
NODE_COLUMNS = ["graph_id", "layer", "neuron", "position", "activation", "score"]
MERGES = {"edges": er.EDGE_MERGE, "neurons": nr.STATS_MERGE, "neuron_tokens": nr.COUNT_MERGE,
          "neuron_corpora": nr.COUNT_MERGE}


@dataclass
class ReduceReport(Report):
    corpus: str
    shards: int
    new_shards: int
    from_scratch: bool
    rows: dict[str, int]
    seconds: float

    def __str__(self) -> str:
        what = "from scratch" if self.from_scratch else f"{self.new_shards} new shard(s)"
        tables = ", ".join(f"{t} {n:,} rows" for t, n in self.rows.items()) or "unchanged"
        return (f"reduce {self.corpus}: {self.shards} shard(s), {what}; {tables}; "
                f"{self.seconds:.1f} s")


def run_reduce(lake, *, model, corpora, params: ReduceParams | None = None, cluster=None,
               progress: Progress | None = None) -> ReduceReport:
    """Reduce the committed graph shards of ``model`` over ``corpora`` into the
    edges, neurons, neuron_corpora and neuron_tokens tables, on a Dask cluster (a
    local one by default). A rerun folds only the shards committed since."""
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or ReduceParams()
    progress = progress or Progress()
    with connect(cluster, default="local", progress=progress) as client:
        return reduce_lake(lake, model_name(model), as_corpora(corpora), client,
                           min_count=params.min_count, top_k=params.top_k,
                           chunk=params.chunk, fold_rows=params.fold_rows,
                           params_hash=params.params_hash,
                           mixed_params=params.mixed_params,
                           on_progress=lambda d, t: progress.update("reduce", d, t))


def _read(lake: Lake, path: str, spec, columns: list[str]) -> pa.Table:
    return read_parquet(path, spec, lake.fs, columns)


def _without(table: pa.Table, skip: list[int]) -> pa.Table:
    if not skip:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("graph_id"),
                                           value_set=pa.array(skip, pa.int64()))))


def shard_task(lake: Lake, shard: Shard, corpus_id: int, skip: list[int], version,
               bits: int) -> dict[str, Any]:
    """One shard: its edge partial (one batch per source layer: a fold reads only its
    layers') and neuron partials (one batch each: they are small), written to scratch
    files of the edges table ``version``; returns, per table, the file's name, its
    batches (per layer, or ALL) and the partial's rows per layer and block of
    ``2**bits`` neurons. Plain data: the client gathers it, and the folds take only
    the names and batches they read (no task waits on a thousand others' results).
    ``skip``: graph ids already counted from an earlier shard."""
    edges = er.shard_partials(_without(
        _read(lake, shard.file("graph_edges"), GRAPH_EDGES, EDGE_COLUMNS), skip))
    stats, tokens = nr.shard_partials(
        _without(_read(lake, shard.file("graph_nodes"), GRAPH_NODES, NODE_COLUMNS), skip),
        _without(_read(lake, shard.file("graphs"), GRAPHS,
                       ["graph_id", "input_tokens", "target_tokens"]), skip))
    split = {"edges": edges, "neurons": {ALL: stats}, "neuron_tokens": {ALL: tokens},
             "neuron_corpora": {ALL: nr.corpus_partial(stats, corpus_id)}}
    out = {}
    for table, parts in split.items():
        name = f"{shard.corpus}-{shard.shard}.{table}.arrow"
        ids = version.write_scratch(version.scratch(name), list(parts.values()),
                                    MERGES[table].schema)
        keys = [t.column("key").to_numpy() for t in parts.values()]
        out[table] = {"name": name, "batches": dict(zip(parts, ids, strict=True)),
                      "hist": plan.histogram(table, np.concatenate(keys) if keys
                                             else np.zeros(0, int), bits)}
    return out


ALL = -2  # the scratch batches of a partial not split by layer
# Shards per shard task, at most: a Dask task costs ~30-80 ms beyond its work on a
# 2-core machine (scheduling, the worker's bookkeeping), a third of a shard's work;
# a lake with few shards per worker keeps one per task (every core busy).
SHARDS_PER_TASK = 8


def shards_task(lake: Lake, shards: list[tuple[Shard, int, list[int]]], version, bits: int
                ) -> list[dict[str, Any]]:
    """:func:`shard_task` for each (shard, corpus index, graphs to skip)."""
    return [shard_task(lake, shard, corpus_id, skip, version, bits)
            for shard, corpus_id, skip in shards]


def in_range(data: pa.Table, lo: int, hi: int) -> pa.Table:
    """The rows of ``data`` (sorted by key) with key in [lo, hi)."""
    key = data.column("key").to_numpy()
    a, b = np.searchsorted(key, [lo, hi])
    return data if (a, b) == (0, len(key)) else data.slice(int(a), int(b - a))


def scratch_reads(scratch: dict[str, Any], parts: list[Part]) -> tuple[str, list[int]]:
    """A shard's scratch file of a table (as :func:`shard_task` described it) and
    the batches of it that hold ``parts``."""
    held = scratch["batches"]
    batches = held[ALL] if ALL in held else [
        i for x in sorted({p.layer for p in parts}) for i in held.get(x, [])]
    return scratch["name"], batches


def read_part(version, table: str, name: str, batches: list[int], lo: int, hi: int
              ) -> pa.Table:
    """The rows with key in [lo, hi) of ``batches`` of a shard's scratch partial."""
    if not batches:
        return MERGES[table].schema.empty_table()
    return version.read_scratch(version.scratch(name, create=False), batches,
                                keep=lambda data: in_range(data, lo, hi))


def fold_task(version, table: str, keys: tuple[int, int], state: pa.Table | None,
              reads: list[tuple[str, list[int]]]) -> pa.Table:
    """Fold the scratch partials ``reads`` (shards' files and batches, in commit
    order) with keys in [lo, hi) onto ``state``."""
    partials = [read_part(version, table, name, batches, *keys) for name, batches in reads]
    return fold([state, *partials] if state is not None else partials, MERGES[table])


def fold_and_finish(scratch, version, table: str, parts: list[Part], keys: tuple[int, int],
                    params: dict[str, Any], state: pa.Table | None,
                    reads: list[tuple[str, list[int]]]) -> tuple[list[str], list[str], int]:
    """The last fold of a bucket (``scratch``: the version holding the scratch
    files), then :func:`finish_task` on its state."""
    return finish_task(version, table, parts,
                       fold_task(scratch, table, keys, state, reads), params)


def read_state(lake: Lake, paths: list[str], table: str, keys: tuple[int, int]) -> pa.Table:
    """The stored state of ``table`` with keys in [lo, hi), from the files that hold
    them (in key order)."""
    parts = []
    for path in paths:
        with lake.fs.open(path, "rb") as f:
            data = pq.read_table(f)
        if table == "edges" and "src_layer" in data.column_names:  # the published table
            key = er.pack(*(data.column(c).to_numpy() for c in (
                "src_layer", "src_neuron", "tgt_layer", "tgt_neuron")))
            data = pa.table({"key": key, **{n: data.column(n)
                                            for n in er.PARTIAL_SCHEMA.names[1:]}},
                            schema=er.PARTIAL_SCHEMA)
        parts.append(data)
    return in_range(pa.concat_tables(parts), *keys)


def finish_task(version, table: str, bucket: list[Part], state: pa.Table,
                params: dict[str, Any]) -> tuple[list[str], list[str], int]:
    """Write a bucket's published files and state files, each named by where it
    starts: for edges one per part (from its start to the next part's), for the
    neuron tables one; returns (part files, state files, rows). With min_count 1 the
    published edge part holds the whole state (keys unpacked), so it is its own state
    file."""
    parts, states, rows = [], [], 0
    starts = bucket if table == "edges" else bucket[:1]
    cuts = [0, *(plan.start(table, p) for p in starts[1:]), plan.LAST_KEY]
    for part, lo, hi in zip(starts, cuts, cuts[1:], strict=False):
        part_state = in_range(state, lo, hi)
        if not part_state.num_rows:
            continue
        name = plan.file_name(table, part)
        if table == "edges":
            out, spec = er.finalize(part_state, params["min_count"]), EDGE_STATS
        elif table == "neurons":
            out, spec = nr.finalize_neurons(part_state), NEURON_STATS
        elif table == "neuron_tokens":
            out, spec = nr.finalize_tokens(part_state, params["top_k"]), NEURON_TOKENS
        else:
            out, spec = nr.finalize_corpora(part_state, params["corpora"]), NEURON_CORPORA
        part = version.write(name, out, spec)
        parts.append(part)
        rows += out.num_rows
        states.append(version.part_path(part) if table == "edges" and params["min_count"] == 1
                      else version.write_state(name, part_state))
    return parts, states, rows


def reduce_lake(lake: Lake, model: str, corpora: list[str], client: Any, min_count: int = 1,
                top_k: int = 10, chunk: int = 4096, params_hash: tuple[str, ...] = (),
                mixed_params: bool = False, fold_rows: int | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> ReduceReport:
    """Reduce the committed shards of ``model`` over ``corpora`` into the derived tables.

    Several corpora reduce into one table set under ``corpus=<c1>+<c2>``. Shards of
    different graph parameter sets (e.g. --candidates 500 and 100) are not mixed
    silently: ``params_hash`` picks sets, ``mixed_params`` folds them all; otherwise
    several sets are refused with a line listing them. The tables' manifests record
    the sets they hold (``graph_params``). ``fold_rows``: the rows one fold may
    hold (default: from the workers' memory limit).
    """
    t0 = time.perf_counter()
    corpora = sorted(set(corpora))
    corpus_key = layout.corpus_key(corpora)
    if min_count < 1:
        raise CircuitAtlasError(f"--min-count must be at least 1, got {min_count}")
    shards = ordered_shards(lake, model, corpora)
    missing = sorted(set(corpora) - {s.corpus for s in shards})
    if missing:
        held = sorted({f"{s.commit['model']} / {s.corpus}" for s in lake.shards()})
        raise CircuitAtlasError(
            f"no committed graphs of model {model!r} for corpus {', '.join(missing)} in "
            f"{lake.url} (graphs held: {'; '.join(held) or 'none'}); "
            "run `circuit-atlas graphs` first")
    shards = one_parameter_set(shards, corpora, params_hash, mixed_params)
    params = {"min_count": min_count, "top_k": top_k, "corpora": corpora,
              "layout": STATE_LAYOUT,
              "graph_params": {h: e["params"] for h, e in parameter_sets(shards).items()}}
    ids = [f"{s.corpus}/{s.shard}" for s in shards]
    shape = model_shape(shards)
    manifests = {t: lake.table_manifest(model, corpus_key, t) for t in MERGES}
    old = _reusable(manifests, params, ids)
    fresh = [i for i, sid in enumerate(ids) if old is None or sid not in old]
    if not fresh:
        return ReduceReport(corpus_key, len(shards), 0, False, {}, time.perf_counter() - t0)
    fold_order = (old or []) + [ids[i] for i in fresh]
    versions = {t: lake.new_table_version(model, corpus_key, t) for t in MERGES}
    skips = repeated_graphs(lake, shards)
    bits = plan.block_bits(shape)
    workers = list(client.scheduler_info()["workers"].values())
    group = min(SHARDS_PER_TASK, max(1, len(fresh) // (max(1, len(workers)) * 16)))
    tasks = [[(shards[i], corpora.index(shards[i].corpus), skips[i]) for i in fresh[a:a + group]]
             for a in range(0, len(fresh), group)]
    scratch = versions["edges"]
    try:
        jobs = _fold_all(lake, client, workers, tasks, scratch, versions, manifests, old,
                         params, bits, chunk, fold_rows, on_progress)
        written = client.gather([job for _, job in jobs])
    finally:  # a failed run leaves no scratch behind (a killed one: `lake cleanup`)
        scratch.drop_scratch()
    rows: dict[str, int] = {}
    for table in MERGES:
        mine = [w for (t, _), w in zip(jobs, written, strict=True) if t == table]
        rows[table] = sum(w[2] for w in mine)
        versions[table].publish(
            [f for w in mine for f in w[0]],
            {"shards": fold_order, "params": params,
             "state": sorted(f for w in mine for f in w[1]), "model": model,
             "model_shape": shape})
    return ReduceReport(corpus_key, len(shards), len(fresh), old is None, rows,
                        time.perf_counter() - t0)


def _fold_all(lake: Lake, client: Any, workers: list[dict], tasks: list, scratch,
              versions: dict, manifests: dict, old: list[str] | None, params: dict[str, Any],
              bits: int, chunk: int, fold_rows: int | None,
              on_progress: Callable[[int, int], None] | None) -> list[tuple[str, Any]]:
    """Run the shard tasks (``tasks``: their groups of shards), plan each table's folds
    from their histograms and submit them; returns (table, finish) per bucket, once all
    have finished."""
    from distributed import as_completed

    futures = client.map(shards_task, [lake] * len(tasks), tasks, [scratch] * len(tasks),
                         [bits] * len(tasks), pure=False)

    grouped: list[Any] = [None] * len(futures)
    index = {f.key: i for i, f in enumerate(futures)}
    for done, (future, result) in enumerate(as_completed(futures, with_results=True), 1):
        grouped[index[future.key]] = result
        if on_progress:
            on_progress(done, len(futures))
    del futures  # their results are here now: nothing stays on the workers
    results = [r for group in grouped for r in group]
    memory = min((w.get("memory_limit") or 0 for w in workers), default=0) or 4 * 2**30
    budget = fold_rows or max(10_000, int(memory * plan.FOLD_MEMORY_SHARE / plan.BYTES_PER_ROW))
    jobs: list[tuple[str, Any]] = []  # (table, its bucket's finish)
    for table in MERGES:
        stored = sorted((plan.start_of_file(name), _state_path(lake, manifests[table], name))
                        for name in _state_names(manifests[table], old))
        table_hists = [r[table]["hist"] for r in results]
        if not stored and not any(table_hists):  # no rows at all
            continue
        # a stored file holds the keys from its start to the next one's
        starts = [plan.start(table, p) for p, _ in stored] + [plan.LAST_KEY]
        stored_rows = {p: _rows(lake, path) for p, path in stored}
        plans = plan.plan_folds(table_hists, len(workers), budget, chunk, bits, stored_rows)
        ranges = plan.bucket_ranges(table, [parts for parts, _ in plans])
        for (bucket, chunks), (lo, hi) in zip(plans, ranges, strict=True):
            files = [path for (_, path), a, b in zip(stored, starts, starts[1:], strict=False)
                     if a < hi and b > lo]
            state = client.submit(read_state, lake, files, table, (lo, hi),
                                  pure=False) if files else None
            reads = [[scratch_reads(results[i][table], bucket) for i in c] for c in chunks]
            for shard_reads in reads[:-1]:
                state = client.submit(fold_task, scratch, table, (lo, hi), state,
                                      shard_reads, pure=False)
            # the last fold writes the bucket: no finished state waits in memory
            jobs.append((table, client.submit(
                fold_and_finish, scratch, versions[table], table, bucket, (lo, hi), params,
                state, reads[-1], pure=False)))
    total = len(grouped) + len(jobs)
    for done, _ in enumerate(as_completed([job for _, job in jobs]), start=len(grouped) + 1):
        if on_progress:
            on_progress(done, total)
    return jobs


def model_shape(shards: list) -> dict[str, int] | None:
    """The model's sizes as the shards recorded them (None for shards written before
    they did); shards that disagree were not made by one model."""
    shapes = {json.dumps(s.commit["model_shape"], sort_keys=True)
              for s in shards if s.commit.get("model_shape")}
    if len(shapes) > 1:
        raise CircuitAtlasError(f"shards of one model record different shapes: {sorted(shapes)}")
    return json.loads(shapes.pop()) if shapes else None


def _rows(lake: Lake, path: str) -> int:
    with lake.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def one_parameter_set(shards: list[Shard], corpora: list[str], wanted: tuple[str, ...],
                      mixed: bool) -> list[Shard]:
    """The shards a reduce folds: those of the ``wanted`` parameter sets, all of them
    when ``mixed``, else the only set (several: an error listing them)."""
    sets = parameter_sets(shards)
    if wanted:
        unknown = sorted(set(wanted) - set(sets))
        if unknown:
            raise CircuitAtlasError(
                f"no shards of {', '.join(corpora)} with graph parameters {unknown[0]}; "
                f"the sets are: {describe_parameter_sets(sets)}")
        return [s for s in shards if s.params_hash in set(wanted)]
    if len(sets) > 1 and not mixed:
        raise CircuitAtlasError(
            f"the graphs of {', '.join(corpora)} were computed with {len(sets)} parameter "
            f"sets: {describe_parameter_sets(sets)}. Reduce one with --params-hash HASH, "
            "or fold them together with --mixed-params")
    return shards


def _reusable(manifests: dict[str, Any], params: dict[str, Any], ids: list[str]
              ) -> list[str] | None:
    """The shards the stored tables hold, if they can be extended; None: start over."""
    records = list(manifests.values())
    if any(r is None for r in records):
        return None
    inputs = [r["inputs"] for r in records]
    first = inputs[0]["shards"]
    if any(i["shards"] != first or i["params"] != params for i in inputs):
        return None
    if not set(first) <= set(ids):  # a shard was removed: the state cannot lose it
        return None
    return first


def _state_names(manifest: dict[str, Any] | None, old: list[str] | None) -> list[str]:
    if manifest is None or old is None:
        return []
    return [f.rsplit("/", 1)[-1] for f in manifest["inputs"]["state"]]


def _state_path(lake: Lake, manifest: dict[str, Any], name: str) -> str:
    """A state file of ``manifest`` by name (its entries are relative to the root)."""
    (rel,) = [f for f in manifest["inputs"]["state"] if f.endswith(f"/{name}")]
    return lake.path(rel)
