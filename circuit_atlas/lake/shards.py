"""Graph shards: written under temporary names, committed atomically, cleaned up.

A shard is one directory ``graphs/model=<m>/corpus=<c>/shard=<s>/`` holding
``graphs.parquet``, ``nodes.parquet`` and ``edges.parquet`` for a group of prompts.
The commit protocol:

1. ``_WRITING.json`` (host, pid, start time) marks the directory as in progress;
2. each table streams into ``.<table>.parquet.tmp-<token>``;
3. on commit the files are closed, checked for consistency and renamed to their
   final names;
4. ``_COMMIT.json`` (row counts, bytes, schema versions, model, revision, code
   version, parameters, prompt ids) is written to a temporary name and renamed
   last. Readers list only directories that have it.

A process killed at any instant therefore leaves either a committed shard or a
directory without ``_COMMIT.json`` (debris), which readers never see and
:func:`cleanup` removes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.ids import params_hash as hash_params
from circuit_atlas.lake.records import read_record, write_json_atomic
from circuit_atlas.lake.schemas import SHARD_TABLES, parquet_options, spec
from circuit_atlas.lake.validate import conform

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

COMMIT_FORMAT = "circuit-atlas-shard"


@dataclass(frozen=True)
class Shard:
    """A committed shard: where it is and what its ``_COMMIT.json`` says."""

    model: str
    corpus: str
    shard: str
    path: str
    commit: dict[str, Any]

    @property
    def rows(self) -> dict[str, int]:
        return self.commit["rows"]

    @property
    def params_hash(self) -> str:
        return self.commit["params_hash"]

    @property
    def prompt_ids(self) -> list[str]:
        return self.commit["prompt_ids"]

    def file(self, table: str) -> str:
        return f"{self.path}/{table}.parquet"


def new_shard_name() -> str:
    """Sortable by creation time, unique across concurrent writers."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:10]}"


def _now() -> str:
    # microseconds: the reduce folds shards in commit order, and ties must be rare
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


@dataclass
class _Stream:
    tmp: str
    sink: Any
    writer: pq.ParquetWriter
    rows: int = 0


@dataclass
class ShardWriter:
    """Streams the tables of one graph shard and commits them atomically.

    Use it as a context manager: leaving the block normally commits, an exception
    aborts (the partial files are removed). ``write`` may be called several times
    per table; each call appends a row group.

        with lake.open_shard("HuggingFaceTB/SmolLM2-135M-Instruct", "medical",
                             params={"max_logits": 10}) as shard:
            shard.write("graphs", graphs_table)
            shard.write("nodes", nodes_table)
            shard.write("edges", edges_table)
    """

    lake: Lake
    model: str
    corpus: str
    params: dict[str, Any]
    model_revision: str | None = None
    model_shape: dict[str, int] | None = None
    shard: str = field(default_factory=new_shard_name)

    def __post_init__(self) -> None:
        self.model_key = layout.model_key(self.model)
        self.params_hash = hash_params(self.params)
        self.dir = layout.shard_dir(self.model_key, self.corpus, self.shard)
        self._token = uuid.uuid4().hex[:8]
        self._streams: dict[str, _Stream] = {}
        self._graph_ids: list[pa.Array] = []
        self._referenced: dict[str, list[pa.Array]] = {"nodes": [], "edges": []}
        self._prompt_ids: list[str] = []
        self._state = "open"
        self.committed: Shard | None = None
        fs = self.lake.fs
        fs.makedirs(self.lake.path(self.dir), exist_ok=True)
        write_json_atomic(
            fs,
            self.lake.path(f"{self.dir}/{layout.WRITING_FILE}"),
            {"host": socket.gethostname(), "pid": os.getpid(), "started_at": _now()},
        )

    def write(self, table: str, data: pa.Table) -> None:
        """Append ``data`` (any column order; safely cast) to the shard's ``table``."""
        if self._state != "open":
            raise LakeError(f"{self.dir}: shard is already {self._state}")
        if table not in SHARD_TABLES:
            raise LakeError(f"a graph shard holds {', '.join(SHARD_TABLES)}, not {table!r}")
        t_spec = spec(table)
        data = conform(data, t_spec, origin=f"{self.dir}/{table}")
        if table == "graphs":
            self._check_graphs(data)
        else:
            self._referenced[table].append(pc.unique(data.column("graph_id")))
        stream = self._streams.get(table)
        if stream is None:
            tmp = self.lake.path(layout.tmp_name(f"{self.dir}/{table}.parquet", self._token))
            sink = self.lake.fs.open(tmp, "wb")
            writer = pq.ParquetWriter(sink, t_spec.schema, **parquet_options(t_spec.schema))
            stream = self._streams[table] = _Stream(tmp, sink, writer)
        stream.writer.write_table(data)
        stream.rows += data.num_rows

    def _check_graphs(self, data: pa.Table) -> None:
        hashes = set(data.column("params_hash").to_pylist())
        if hashes - {self.params_hash}:
            raise LakeError(
                f"{self.dir}: graphs rows carry params_hash {sorted(hashes)}, "
                f"but the shard was opened with params hashing to {self.params_hash}"
            )
        self._graph_ids.append(data.column("graph_id").combine_chunks())
        self._prompt_ids.extend(data.column("prompt_id").to_pylist())

    def _check_references(self) -> None:
        known = pa.concat_arrays(self._graph_ids) if self._graph_ids else pa.array([], pa.int64())
        if len(pc.unique(known)) != len(known):
            raise LakeError(f"{self.dir}: graphs table repeats a graph_id")
        for table, chunks in self._referenced.items():
            for ids in chunks:
                unknown = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=known)))
                if len(unknown):
                    raise LakeError(
                        f"{self.dir}: {table} rows refer to graph_id {unknown[0].as_py()} "
                        "that is not in the shard's graphs table"
                    )

    def commit(self) -> Shard:
        """Close, check, rename into place and write ``_COMMIT.json`` last."""
        if self._state != "open":
            raise LakeError(f"{self.dir}: shard is already {self._state}")
        try:
            for table in SHARD_TABLES:
                if table not in self._streams:  # an empty table is still a table
                    self.write(table, spec(table).schema.empty_table())
            self._check_references()
            fs = self.lake.fs
            rows, sizes = {}, {}
            for table, stream in self._streams.items():
                stream.writer.close()
                stream.sink.close()
                final = self.lake.path(f"{self.dir}/{table}.parquet")
                fs.mv(stream.tmp, final)
                rows[table] = stream.rows
                sizes[table] = fs.size(final)
        except BaseException:
            self.abort()
            raise
        record = {
            "format": COMMIT_FORMAT,
            "schema_versions": {t: spec(t).version for t in SHARD_TABLES},
            "rows": rows,
            "bytes": sizes,
            "model": self.model,
            "model_key": self.model_key,
            "model_revision": self.model_revision,
            "model_shape": self.model_shape,
            "corpus": self.corpus,
            "shard": self.shard,
            "code_version": __version__,
            "params": self.params,
            "params_hash": self.params_hash,
            "prompt_ids": self._prompt_ids,
            "committed_at": _now(),
        }
        write_json_atomic(fs, self.lake.path(f"{self.dir}/{layout.COMMIT_FILE}"), record)
        self._state = "committed"
        # The marker only helps cleanup; a kill before this line leaves a committed shard.
        fs.rm(self.lake.path(f"{self.dir}/{layout.WRITING_FILE}"))
        self.committed = Shard(
            self.model_key, self.corpus, self.shard, self.lake.path(self.dir), record
        )
        return self.committed

    def abort(self) -> None:
        """Remove everything this writer wrote; the shard never becomes visible."""
        if self._state == "committed":
            return
        self._state = "aborted"
        for stream in self._streams.values():
            try:
                stream.writer.close()
                stream.sink.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        fs = self.lake.fs
        path = self.lake.path(self.dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def read_commit(fs, path: str) -> dict[str, Any]:
    """A shard's ``_COMMIT.json``, checked, or a LakeError naming the file."""
    record = read_record(fs, path, COMMIT_FORMAT, "shard commit record")
    for table, version in record.get("schema_versions", {}).items():
        if table in SHARD_TABLES and version != spec(table).version:
            raise LakeError(
                f"{path}: shard written with {table} schema version {version}, "
                f"this circuit-atlas reads version {spec(table).version}"
            )
    return record


def list_shards(lake: Lake, model: str | None = None, corpus: str | None = None) -> list[Shard]:
    """Committed shards, oldest first; uncommitted directories are not listed."""
    fs = lake.fs
    key = layout.model_key(model) if model else None
    pattern = lake.path(f"{layout.shard_glob(key, corpus)}/{layout.COMMIT_FILE}")
    shards = []
    for commit_path in sorted(fs.glob(pattern)):
        shard_path = commit_path.rsplit("/", 1)[0]
        parts = layout.partition_values(shard_path[len(lake.root) :])
        shards.append(
            Shard(parts["model"], parts["corpus"], parts["shard"], shard_path,
                  read_commit(fs, commit_path))
        )
    return shards


def uncommitted_shard_dirs(lake: Lake) -> list[str]:
    """Shard directories without ``_COMMIT.json``: in progress, or debris."""
    fs = lake.fs
    return [
        p for p in sorted(fs.glob(lake.path(layout.shard_glob())))
        if not fs.exists(f"{p}/{layout.COMMIT_FILE}")
    ]


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value).timestamp()
            except ValueError:
                continue
    return None


def _read_marker(fs, marker: str) -> dict[str, Any] | None:
    """The writer marker, or its temporary copy: a writer killed between writing the
    marker and renaming it into place leaves only that."""
    for path in [marker, *sorted(fs.glob(layout.tmp_name(marker, "*")))]:
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            continue
    return None


def _writer_alive(fs, marker: str) -> bool | None:
    """True/False when the writer ran on this host and we can tell; None otherwise."""
    info = _read_marker(fs, marker)
    if not isinstance(info, dict):
        return None
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return None
    return True


def _is_debris(fs, path: str, min_age_s: float, now: float) -> bool:
    """Uncommitted and abandoned: its writer is dead, or it has not changed for min_age_s."""
    alive = _writer_alive(fs, f"{path}/{layout.WRITING_FILE}")
    if alive is False:
        return True
    if alive is True and min_age_s > 0:
        return False
    entries = fs.find(path, withdirs=True, detail=True) if fs.isdir(path) else {}
    times = [t for t in (_mtime(i) for i in [fs.info(path), *entries.values()]) if t is not None]
    return not times or now - max(times) >= min_age_s


def cleanup(
    lake: Lake, min_age_s: float = 3600.0, dry_run: bool = False, _now_s: float | None = None,
    unpublished: list[str] = (),
) -> CleanupReport:
    """Remove uncommitted shards, temporary files that no live writer owns, and the
    ``unpublished`` derived-table versions (a killed reduce) under the same age rule.

    A directory whose writer ran on this host and is dead goes at once; others go
    when nothing in them changed for ``min_age_s`` seconds (a writer on another
    node may still be working). ``min_age_s=0`` removes all debris.
    """
    import time

    fs = lake.fs
    now = time.time() if _now_s is None else _now_s
    report = CleanupReport()
    for shard_path in [*uncommitted_shard_dirs(lake), *unpublished]:
        if _is_debris(fs, shard_path, min_age_s, now):
            report.removed.append(shard_path)
            if not dry_run:
                fs.rm(shard_path, recursive=True)
        else:
            report.in_progress.append(shard_path)
    for area in (layout.PROMPTS, layout.GRAPHS):
        base = lake.path(area)
        if not fs.exists(base):
            continue
        for path, info in fs.find(base, detail=True).items():
            handled = tuple(f"{d}/" for d in report.removed + report.in_progress)
            if layout.TMP_MARK not in path.rsplit("/", 1)[-1] or path.startswith(handled):
                continue
            age = now - (_mtime(info) or 0.0)
            if age >= min_age_s:
                report.removed.append(path)
                if not dry_run:
                    fs.rm(path)
    return report
