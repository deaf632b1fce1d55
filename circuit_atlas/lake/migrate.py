"""``lake migrate``: a lake of format 1 rewritten in place as format 2.

Format 1 kept a shard's three tables in one folder with a ``_COMMIT.json``, a derived
table's current version in a ``_MANIFEST.json`` beside its versions, and called the
neuron number ``index``. The migration, in an order a rerun can resume:

1. prompt parts stay where they are and get commit records (oldest file first);
2. each committed shard: ``graphs.parquet`` becomes the graphs table's
   ``part-0.parquet``; nodes and edges are rewritten with the neuron columns renamed
   into the graph_nodes and graph_edges folders; its record joins the shard log in
   commit order; the old files go. Uncommitted shard folders are debris and go;
3. each derived table's current version gets a record; the four tables of the
   reduce are rewritten with the columns renamed, and their fold state is dropped,
   so that the next reduce folds every shard again (it equals a reduce from scratch);
4. ``_lake.json`` says format 2, last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.lake import PART_FORMAT
from circuit_atlas.lake.log import CommitLog
from circuit_atlas.lake.records import write_json_atomic
from circuit_atlas.lake.schemas import DERIVED, parquet_options, spec

RENAMES = {"index": "neuron", "src_index": "src_neuron", "tgt_index": "tgt_neuron"}
REDUCED = ("edges", "neurons", "neuron_corpora", "neuron_tokens")
OLD_NAMES = {"graph_nodes": "nodes", "graph_edges": "edges"}


@dataclass
class MigrationReport:
    prompt_parts: int = 0
    shards: int = 0
    tables: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _read_json(fs, path: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise LakeError(f"{path}: unreadable: {e}") from e


def _rewrite(fs, src: str, dst: str, t_spec) -> int:
    """``src`` (a format-1 file) to ``dst`` with renamed columns and ``t_spec``'s
    schema; returns the rows."""
    from circuit_atlas.lake.validate import conform

    try:
        with fs.open(src, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        raise LakeError(f"{src}: not a readable Parquet file: {e}") from e
    table = table.rename_columns([RENAMES.get(c, c) for c in table.column_names])
    table = conform(table.replace_schema_metadata(None), t_spec, origin=src)
    tmp = layout.tmp_name(dst, "migrate")
    fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, **parquet_options(table.schema))
    fs.mv(tmp, dst)
    return table.num_rows


def migrate(url: str, storage_options: dict[str, Any] | None = None) -> MigrationReport:
    """Rewrite the format-1 lake at ``url`` as format 2 (see the module docstring)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    marker = f"{root}/{layout.LAKE_FILE}"
    if not fs.exists(marker):
        raise LakeError(f"{url}: not a circuit-atlas lake (no {layout.LAKE_FILE})")
    meta = _read_json(fs, marker)
    if meta.get("format_version") == 2:
        raise LakeError(f"{url}: already lake format 2; nothing to migrate")
    if meta.get("format_version") != 1:
        raise LakeError(f"{url}: lake format {meta.get('format_version')!r}; this "
                        "migration reads format 1")
    report = MigrationReport()

    def rel(path: str) -> str:
        return path[len(root) + 1:]

    # 1. prompt parts
    for corpus_dir in sorted(fs.glob(f"{root}/{layout.PROMPTS}/corpus=*")):
        corpus = layout.partition_values(rel(corpus_dir))["corpus"]
        log = CommitLog(fs, f"{root}/{layout.prompts_log(corpus)}")
        known = {r["part"] for r in log.records()}
        parts = [p for p in fs.glob(f"{corpus_dir}/part-*.parquet")
                 if p.rsplit("/", 1)[-1] not in known]
        for part in sorted(parts, key=lambda p: (fs.info(p).get("mtime") or 0, p)):
            rows = pq.read_metadata(part, filesystem=fs).num_rows
            log.commit({"format": PART_FORMAT, "part": part.rsplit("/", 1)[-1],
                        "rows": rows, "source": "migrated from format 1"})
            report.prompt_parts += 1

    # 2. shards
    commits = []
    for shard_dir in sorted(fs.glob(f"{root}/graphs/model=*/corpus=*/shard=*")):
        old = f"{shard_dir}/_COMMIT.json"
        if fs.exists(old):
            commits.append((_read_json(fs, old), shard_dir))
        elif not fs.exists(f"{shard_dir}/{layout.PART}"):  # never committed: debris
            fs.rm(shard_dir, recursive=True)
            report.removed.append(shard_dir)
    for record, shard_dir in sorted(commits, key=lambda c: c[0]["committed_at"]):
        p = layout.partition_values(rel(shard_dir))
        key, corpus, shard = p["model"], p["corpus"], p["shard"]
        rows, sizes = {"graphs": record["rows"]["graphs"]}, {}
        for table in ("graph_nodes", "graph_edges"):
            src = f"{shard_dir}/{OLD_NAMES[table]}.parquet"
            dst = f"{root}/{layout.shard_file(table, key, corpus, shard)}"
            if fs.exists(src):
                rows[table] = _rewrite(fs, src, dst, spec(table))
                fs.rm(src)
            else:  # moved by an interrupted run
                rows[table] = pq.read_metadata(dst, filesystem=fs).num_rows
            sizes[table] = fs.size(dst)
        graphs = f"{root}/{layout.shard_file('graphs', key, corpus, shard)}"
        if fs.exists(f"{shard_dir}/graphs.parquet"):
            fs.mv(f"{shard_dir}/graphs.parquet", graphs)
        sizes["graphs"] = fs.size(graphs)
        record = {**record, "rows": rows, "bytes": sizes,
                  "schema_versions": {t: spec(t).version for t in layout.GRAPH_TABLES}}
        log = CommitLog(fs, f"{root}/{layout.shards_log(key, corpus)}")
        if shard not in {r["shard"] for r in log.records()}:
            log.commit(record)
        for leftover in fs.glob(f"{shard_dir}/_*.json"):
            fs.rm(leftover)
        report.shards += 1

    # 3. derived tables
    for manifest in sorted(fs.glob(f"{root}/{layout.TABLES}/model=*/corpus=*/*/_MANIFEST.json")):
        table_dir = manifest.rsplit("/", 1)[0]
        name = table_dir.rsplit("/", 1)[-1]
        p = layout.partition_values(rel(table_dir))
        record = _read_json(fs, manifest)
        if name in REDUCED:
            for f in record["files"]:
                _rewrite(fs, f"{table_dir}/{f}", f"{table_dir}/{f}", DERIVED[name])
            record["inputs"] = {**record["inputs"], "shards": [], "state": []}
        if name in DERIVED:
            record["schema_version"] = DERIVED[name].version
        log = CommitLog(fs, f"{root}/{layout.table_log(p['model'], p['corpus'], name)}")
        if log.last() < 0:
            log.commit({k: v for k, v in record.items() if k != "seq"})
        live = {f.split("/", 1)[0] for f in record["files"]}
        for version in fs.glob(f"{table_dir}/v-*"):
            v = version.rsplit("/", 1)[-1]
            state = f"{version}/_state"
            if v not in live:
                fs.rm(version, recursive=True)
                report.removed.append(version)
            elif fs.exists(state):
                fs.rm(state, recursive=True)
        fs.rm(manifest)
        report.tables.append(f"{p['model']}/{p['corpus']}/{name}")

    # 4. the marker, last
    write_json_atomic(fs, marker, {**meta, "format_version": 2,
                                   "migrated_from": 1,
                                   "retention_seconds": meta.get("retention_seconds",
                                                                 7 * 86_400.0)})
    return report
