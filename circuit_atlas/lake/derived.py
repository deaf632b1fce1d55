"""Derived tables: versioned, published by one log record, kept for a retention period.

    tables/model=<m>/corpus=<c>/<table>/v-<id>/<file>.parquet   a version's files
    _log/tables/model=<m>/corpus=<c>/<table>/<n>.json           record n: version n
    _state/model=<m>/corpus=<c>/<table>/v-<id>/...              what a later run resumes from

A run writes a complete new version directory (any process may write its parts)
and then publishes it: one record in the table's log (see :mod:`log`) naming the
version, its files and what it was built from. The newest record is the current
version; readers see the old table or the new one, never a mix. Each version
directory holds all of its version's files, so a reader that is handed the
directory (``Lake.table_path``) reads exactly that version with any engine.

Superseded versions stay readable for the lake's retention period (a reader that
opened a version before a publish keeps reading it; ``version=`` reads any that is
kept); ``lake cleanup`` and later publishes of the table remove the expired ones.
A version directory that no record names is a run still writing, or debris.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.log import CommitLog
from circuit_atlas.lake.schemas import DERIVED, TableSpec, parquet_options
from circuit_atlas.lake.validate import MissingFile, check_file, conform

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

MANIFEST_FORMAT = "circuit-atlas-table"


def derived_spec(name: str) -> TableSpec | None:
    return DERIVED.get(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def table_log(lake: Lake, model_key: str, corpus: str, table: str) -> CommitLog:
    return CommitLog(lake.fs, lake.path(layout.table_log(model_key, corpus, table)))


class TableVersion:
    """A new version of a derived table being written. Picklable: parts may be written
    by Dask workers; :meth:`publish` (on the client) makes it the current version."""

    def __init__(self, lake: Lake, model: str, corpus: str, table: str) -> None:
        self.lake, self.model, self.corpus, self.table = lake, model, corpus, table
        self.model_key = layout.model_key(model)
        self.dir = layout.table_dir(self.model_key, corpus, table)
        self.version = f"v-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"

    def _write(self, path: str, data: pa.Table, compression: str,
               row_group_size: int = 1 << 20) -> None:
        self.lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.lake.fs.open(path, "wb") as f:
            pq.write_table(data, f, row_group_size=row_group_size,
                           **parquet_options(data.schema, compression))

    def write(self, name: str, data: pa.Table, spec: TableSpec | None = None,
              compression: str = "zstd", row_group_size: int = 1 << 20) -> str:
        """Write one part file (``name``, e.g. "src_layer-05.parquet"); returns its path
        relative to the table's directory. Smaller row groups let a reader that filters
        on the sort key skip more of the file."""
        path = self.lake.path(f"{self.dir}/{self.version}/{name}")
        if spec is not None:
            data = conform(data, spec, origin=path)
        self._write(path, data, compression, row_group_size)
        return f"{self.version}/{name}"

    def write_state(self, name: str, data: pa.Table, compression: str = "lz4") -> str:
        """Write one file of the state a later run resumes from (not table data: it
        lives outside the table's directory); returns its path relative to the root."""
        rel = f"{layout.state_dir(self.model_key, self.corpus, self.table)}/{self.version}/{name}"
        self._write(self.lake.path(rel), data, compression)
        return rel

    def part_path(self, part: str) -> str:
        """A part (as :meth:`write` returned it) relative to the root."""
        return f"{self.dir}/{part}"

    def scratch(self, name: str, create: bool = True) -> str:
        """A path for intermediate data of this run, removed by :meth:`drop_scratch`
        (``create``: make its folder, for a writer)."""
        path = self.lake.path(f"{self._scratch_dir()}/{name}")
        if create:
            self.lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return path

    def _scratch_dir(self) -> str:
        return f"{layout.SCRATCH}/{self.dir}/{self.version}"

    def write_scratch(self, path: str, parts: list[pa.Table], schema: pa.Schema
                      ) -> list[list[int]]:
        """Write ``parts`` to one scratch file; returns each part's record batches.

        Arrow IPC, uncompressed: scratch is written once and read once soon after, so
        Parquet's encoding and compression cost more than the bytes they save (they
        were half of a reduce's shard tasks)."""
        out, n = [], 0
        sink = pa.BufferOutputStream()  # one write to the file system, not one per buffer
        with pa.ipc.new_file(sink, schema) as writer:
            for part in parts:
                batches = part.to_batches()
                for batch in batches:
                    writer.write_batch(batch)
                out.append(list(range(n, n + len(batches))))
                n += len(batches)
        with self.lake.fs.open(path, "wb") as f:
            f.write(sink.getvalue())
        return out

    def read_scratch(self, path: str, batches: list[int] | None = None,
                     keep: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
        """A scratch file written by :meth:`write_scratch`, whole or some batches;
        ``keep`` selects the rows wanted (a slice, say).

        A local file is memory-mapped and only what ``keep`` returns is copied out
        before the map closes: a fold reads a thousand shards' files and keeps a key
        range of each, so this reads half as long as Python's file objects, and the
        mapped pages (which count in the memory Dask's limit watches) go at once."""
        from fsspec.implementations.local import LocalFileSystem

        keep = keep or (lambda t: t)
        if not isinstance(self.lake.fs, LocalFileSystem):
            with self.lake.fs.open(path, "rb") as f:
                return keep(_batches(pa.ipc.open_file(f), batches))
        with pa.memory_map(path, "r") as mapped:
            return _copy(keep(_batches(pa.ipc.open_file(mapped), batches)))

    def drop_scratch(self) -> None:
        """Remove this run's scratch. Local files are unlinked by several threads: a
        reduce of 200,000 graphs leaves 9 GB in 4,000 files, which one thread took 10 s
        to free (the kernel's work, in parallel)."""
        from concurrent.futures import ThreadPoolExecutor

        from fsspec.implementations.local import LocalFileSystem

        path = self.lake.path(self._scratch_dir())
        if not self.lake.fs.exists(path):
            return
        if isinstance(self.lake.fs, LocalFileSystem):
            files = [f"{d}/{n}" for d, _, names in os.walk(path) for n in names]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(os.unlink, files))
        self.lake.fs.rm(path, recursive=True)

    def carry(self, current: dict[str, Any] | None, names: list[str]) -> list[str]:
        """Copy the files ``names`` of the ``current`` version (its record) into this
        one: a table whose parts come from separate runs (one file per clustering
        method, per labeling pass) keeps the parts this run does not replace, and the
        new version's directory still holds all of its files."""
        if current is None:
            return []
        out = []
        for rel in current["files"]:
            name = rel.rsplit("/", 1)[-1]
            if name in names:
                src = self.lake.path(f"{self.dir}/{rel}")
                dst = self.lake.path(f"{self.dir}/{self.version}/{name}")
                self.lake.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                self.lake.fs.copy(src, dst)
                out.append(f"{self.version}/{name}")
        return out

    def publish(self, files: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
        """Make this version current (one log record), then remove the versions whose
        retention has run out."""
        foreign = [f for f in files if not f.startswith(f"{self.version}/")]
        if foreign:
            raise LakeError(f"{self.dir}: files of another version in this one: {foreign[:3]}")
        if not files:  # an empty table is still a table: its directory must exist
            self.lake.fs.makedirs(self.lake.path(f"{self.dir}/{self.version}"), exist_ok=True)
        record = {
            "format": MANIFEST_FORMAT, "table": self.table, "version": self.version,
            "files": sorted(files), "inputs": inputs, "code_version": __version__,
            "published_at": _now().isoformat(timespec="microseconds"),
        }
        spec = derived_spec(self.table)
        if spec is not None:
            record["schema_version"] = spec.version
        log = table_log(self.lake, self.model_key, self.corpus, self.table)
        record["seq"] = log.commit(record)
        from circuit_atlas.lake.cleanup import remove_expired_versions

        remove_expired_versions(self.lake, self.model_key, self.corpus, self.table)
        return record


def add_part(lake: Lake, model: str, corpus: str, table: str, name: str, data: pa.Table,
             inputs: dict[str, Any]) -> str:
    """Publish ``data`` as the part ``name`` of a derived table whose parts come from
    separate runs (label batches, one file per pass): the current version's other parts
    are carried over; a part of the same name is replaced."""
    version = TableVersion(lake, model, corpus, table)
    current = read_manifest(lake, model, corpus, table)
    others = [f.rsplit("/", 1)[-1] for f in (current or {}).get("files", [])]
    kept = version.carry(current, [n for n in others if n != name])
    part = version.write(name, data, derived_spec(table))
    version.publish(kept + [part], inputs)
    return part


def _check_record(record: dict[str, Any], where: str, table: str) -> dict[str, Any]:
    if record.get("format") != MANIFEST_FORMAT:
        raise LakeError(f"{where}: not a circuit-atlas table record")
    spec = derived_spec(table)
    if spec is not None and record.get("schema_version") != spec.version:
        raise LakeError(f"{where}: {table} schema version {record.get('schema_version')}, "
                        f"this circuit-atlas reads version {spec.version}")
    return record


def table_records(lake: Lake, model_key: str, corpus: str, table: str) -> list[dict[str, Any]]:
    """Every published version of a table, oldest first."""
    return table_log(lake, model_key, corpus, table).records()


def pick_version(records: list[dict[str, Any]], version: int | str | dt.datetime | None,
                 where: str) -> dict[str, Any]:
    """The record of ``version``: None the newest, an int its number (negative: from the
    newest back, -1 the newest), a str its id ("v-…"), a datetime the one current then."""
    if version is None:
        return records[-1]
    if isinstance(version, int):
        by_seq = {r["seq"]: r for r in records}
        want = records[-1]["seq"] + 1 + version if version < 0 else version
        if want in by_seq:
            return by_seq[want]
        raise LakeError(f"{where}: no version {version} (versions "
                        f"{records[0]['seq']}..{records[-1]['seq']})")
    if isinstance(version, str):
        for r in records:
            if r["version"] == version:
                return r
        raise LakeError(f"{where}: no version {version!r}")
    when = version if version.tzinfo else version.replace(tzinfo=dt.UTC)
    before = [r for r in records if dt.datetime.fromisoformat(r["published_at"]) <= when]
    if not before:
        raise LakeError(f"{where}: no version was published by {when.isoformat()}")
    return before[-1]


def read_manifest(lake: Lake, model: str, corpus: str, table: str,
                  version: int | str | dt.datetime | None = None) -> dict[str, Any] | None:
    """The record of a table's current version (or of ``version``), or None when the
    table was never published."""
    key = layout.model_key(model)
    records = table_records(lake, key, corpus, table)
    if not records:
        return None
    where = f"table {table} of {key} / {corpus}"
    record = pick_version(records, version, where)
    return _check_record(record, f"{lake.path(layout.table_log(key, corpus, table))}/"
                         f"{record['seq']:012d}.json", table)


def table_logs(lake: Lake, table: str, model: str | None = None, corpus: str | None = None
               ) -> list[tuple[str, str]]:
    """(model key, corpus) of every published partition of ``table``."""
    m = layout.model_key(model) if model else "*"
    c = layout.check_name("corpus", corpus) if corpus else "*"
    name = layout.check_name("table", table)
    base = lake.path(f"{layout.LOG}/{layout.TABLES}")
    lake.fs.invalidate_cache(base)
    out = []
    for path in sorted(lake.fs.glob(f"{base}/model={m}/corpus={c}/{name}")):
        parts = layout.partition_values(path[len(lake.root):])
        out.append((parts["model"], parts["corpus"]))
    return out


def table_files(lake: Lake, table: str, model: str | None = None, corpus: str | None = None,
                validate: bool = True, version: int | str | dt.datetime | None = None
                ) -> list[str]:
    """The files of a derived table's current version (or of ``version``), across the
    (model, corpus) partitions that match."""
    files: list[tuple[str, int]] = []
    for key, c in table_logs(lake, table, model, corpus):
        record = read_manifest(lake, key, c, table, version)
        if record is None:
            continue
        base = lake.path(layout.table_dir(key, c, table))
        files.extend((f"{base}/{rel}", record["seq"]) for rel in record["files"])
    spec = derived_spec(table)
    if validate and spec is not None:
        for f, seq in files:
            try:
                check_file(f, spec, lake.fs)
            except MissingFile:
                raise MissingFile(
                    f"{f}: missing: version {seq} of {table} lists it, but it was removed "
                    "(by lake cleanup after the retention period, or by hand)") from None
    return [f for f, _ in files]


def _batches(reader: pa.ipc.RecordBatchFileReader, batches: list[int] | None) -> pa.Table:
    if batches is None:
        return reader.read_all()
    return pa.Table.from_batches([reader.get_batch(i) for i in batches], schema=reader.schema)


def _copy(table: pa.Table) -> pa.Table:
    """``table`` in memory of its own (not a view of a file about to close)."""
    import numpy as np

    cols = []
    for col in table.columns:
        if pa.types.is_primitive(col.type) and not col.null_count:
            cols.append(pa.array(np.copy(col.to_numpy()), col.type))
        else:
            cols.append(col.take(pa.array(np.arange(len(col)))))
    return pa.Table.from_arrays(cols, schema=table.schema)
