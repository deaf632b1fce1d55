"""Derived tables: versioned, published atomically, with a record of their inputs.

    tables/model=<m>/corpus=<c>/<table>/_MANIFEST.json      written last (renamed into place)
    tables/model=<m>/corpus=<c>/<table>/v-<id>/<file>.parquet

A run writes a complete new version directory (any process may write its parts)
and then replaces ``_MANIFEST.json``, which names the version, its files and what
it was built from (shards, parameters). Readers follow the manifest, so they see
the old table or the new one, never a mix. Older versions are removed after the
switch; a version directory that no manifest names is debris.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.records import read_record, write_json_atomic
from circuit_atlas.lake.schemas import DERIVED, TableSpec, parquet_options
from circuit_atlas.lake.validate import check_file, conform

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = "circuit-atlas-table"


def derived_spec(name: str) -> TableSpec | None:
    return DERIVED.get(name)


class TableVersion:
    """A new version of a derived table being written. Picklable: parts may be written
    by Dask workers; :meth:`publish` (on the client) makes it the current version."""

    def __init__(self, lake: Lake, model: str, corpus: str, table: str) -> None:
        self.lake, self.model, self.corpus, self.table = lake, model, corpus, table
        self.dir = layout.table_dir(layout.model_key(model), corpus, table)
        self.version = f"v-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"

    def write(self, name: str, data: pa.Table, spec: TableSpec | None = None,
              compression: str = "zstd") -> str:
        """Write one part file (``name``, e.g. "src_layer-05.parquet"); returns its path."""
        path = self.lake.path(f"{self.dir}/{self.version}/{name}")
        if spec is not None:
            data = conform(data, spec, origin=path)
        self.lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.lake.fs.open(path, "wb") as f:
            pq.write_table(data, f, row_group_size=1 << 20,
                           **parquet_options(data.schema, compression))
        return f"{self.version}/{name}"

    def scratch(self, name: str) -> str:
        """A path for intermediate data of this run, removed by :meth:`drop_scratch`."""
        path = self.lake.path(f"{self.dir}/{self.version}/_scratch/{name}")
        self.lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return path

    def write_scratch(self, path: str, parts: list[pa.Table], schema: pa.Schema
                      ) -> list[list[int]]:
        """Write ``parts`` to one scratch file; returns each part's record batches.

        Arrow IPC, uncompressed: scratch is written once and read once soon after, so
        Parquet's encoding and compression cost more than the bytes they save (they
        were half of a reduce's shard tasks)."""
        out, n = [], 0
        with self.lake.fs.open(path, "wb") as f, pa.ipc.new_file(f, schema) as writer:
            for part in parts:
                batches = part.to_batches()
                for batch in batches:
                    writer.write_batch(batch)
                out.append(list(range(n, n + len(batches))))
                n += len(batches)
        return out

    def read_scratch(self, path: str, batches: list[int] | None = None) -> pa.Table:
        """A scratch file written by :meth:`write_scratch`, whole or some batches."""
        with self.lake.fs.open(path, "rb") as f:
            reader = pa.ipc.open_file(f)
            if batches is None:
                return reader.read_all()
            return pa.Table.from_batches([reader.get_batch(i) for i in batches],
                                         schema=reader.schema)

    def drop_scratch(self) -> None:
        path = self.lake.path(f"{self.dir}/{self.version}/_scratch")
        if self.lake.fs.exists(path):
            self.lake.fs.rm(path, recursive=True)

    def carry(self, current: dict[str, Any] | None, names: list[str]) -> list[str]:
        """The files ``names`` of the ``current`` version (its manifest), to list in this
        one: a table whose parts come from separate runs (one file per clustering
        method, label batches) keeps the parts this run does not replace. Nothing is
        copied; :meth:`publish` keeps every version directory its files are in."""
        if current is None:
            return []
        return [rel for rel in current["files"] if rel.rsplit("/", 1)[-1] in names]

    def publish(self, files: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
        """Switch readers to this version (manifest renamed into place), drop older ones."""
        record = {
            "format": MANIFEST_FORMAT, "table": self.table, "version": self.version,
            "files": sorted(files), "inputs": inputs, "code_version": __version__,
            "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        }
        spec = derived_spec(self.table)
        if spec is not None:
            record["schema_version"] = spec.version
        write_json_atomic(self.lake.fs, self.lake.path(f"{self.dir}/{MANIFEST}"), record)
        live = _live_versions(record)
        for old in self.lake.fs.glob(self.lake.path(f"{self.dir}/v-*")):
            if old.rsplit("/", 1)[-1] not in live:
                self.lake.fs.rm(old, recursive=True)
        return record


def add_part(lake: Lake, model: str, corpus: str, table: str, name: str, data: pa.Table,
             inputs: dict[str, Any]) -> str:
    """Publish ``data`` as the part ``name`` of a derived table whose parts come from
    separate runs (label batches, one file per pass): the current version's other parts
    stay listed (nothing copied); a part of the same name is replaced."""
    version = TableVersion(lake, model, corpus, table)
    current = read_manifest(lake, model, corpus, table)
    others = [f.rsplit("/", 1)[-1] for f in (current or {}).get("files", [])]
    kept = version.carry(current, [n for n in others if n != name])
    part = version.write(name, data, derived_spec(table))
    version.publish(kept + [part], inputs)
    return part


def _live_versions(record: dict[str, Any]) -> set[str]:
    """The version directories a manifest's files are in (its own and carried ones)."""
    return {record["version"], *(f.split("/", 1)[0] for f in record["files"])}


def read_manifest(lake: Lake, model: str, corpus: str, table: str) -> dict[str, Any] | None:
    path = lake.path(f"{layout.table_dir(layout.model_key(model), corpus, table)}/{MANIFEST}")
    if not lake.fs.exists(path):
        return None
    record = read_record(lake.fs, path, MANIFEST_FORMAT, "table manifest")
    spec = derived_spec(table)
    if spec is not None and record.get("schema_version") != spec.version:
        raise LakeError(f"{path}: {table} schema version {record.get('schema_version')}, "
                        f"this circuit-atlas reads version {spec.version}")
    return record


def table_files(lake: Lake, table: str, model: str | None = None, corpus: str | None = None,
                validate: bool = True) -> list[str]:
    """The current files of a derived table across (model, corpus) partitions."""
    m = layout.model_key(model) if model else "*"
    c = layout.check_name("corpus", corpus) if corpus else "*"
    files = []
    name = layout.check_name("table", table)
    pattern = lake.path(f"{layout.TABLES}/model={m}/corpus={c}/{name}/{MANIFEST}")
    for manifest in sorted(lake.fs.glob(pattern)):
        parts = layout.partition_values(manifest[len(lake.root):])
        record = read_manifest(lake, parts["model"], parts["corpus"], table)
        base = manifest.rsplit("/", 1)[0]
        files.extend(f"{base}/{f}" for f in record["files"])
    spec = derived_spec(table)
    if validate and spec is not None:
        for f in files:
            check_file(f, spec, lake.fs)
    return files


def unpublished_versions(lake: Lake) -> list[str]:
    """Version directories of derived tables that no manifest names: a reduce still
    running, or one that was killed before it published."""
    out = []
    for table_dir in sorted(lake.fs.glob(lake.path(f"{layout.TABLES}/model=*/corpus=*/*"))):
        manifest = f"{table_dir}/{MANIFEST}"
        live: set[str] = set()
        if lake.fs.exists(manifest):
            live = _live_versions(read_record(lake.fs, manifest, MANIFEST_FORMAT,
                                              "table manifest"))
        out.extend(v for v in sorted(lake.fs.glob(f"{table_dir}/v-*"))
                   if v.rsplit("/", 1)[-1] not in live)
    return out
