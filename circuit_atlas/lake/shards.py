"""Graph shards: one file in each per-graph table, committed by one log record.

A shard is a group of prompts' graphs under one (model, corpus): the files
``graphs/…/shard=<s>/part-0.parquet``, ``graph_nodes/…`` and ``graph_edges/…``, and
one record in ``_log/shards/model=<m>/corpus=<c>/``. The commit protocol:

1. ``_log/writing/<s>.json`` (host, pid, start time) marks the shard as in progress;
2. each table streams into a temporary file ``.part-0.parquet.tmp-<token>`` in its
   shard directory;
3. on commit the files are closed and checked (every node and edge belongs to a
   graph of the shard); graphs that another shard committed meanwhile are dropped
   from them; they are renamed to their final names;
4. the record (row counts, bytes, schema versions, model, revision, shape, code
   version, parameters, prompt ids) is created as the log's next number (see
   :mod:`log`): readers see the shard from that instant. A shard that lost the race
   for that number to one holding some of the same graphs drops those and tries
   the next, so every graph is committed once.

A process killed at any instant leaves a committed shard or files no record names
(debris), which readers through the lake never see and :func:`cleanup` removes.
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
from circuit_atlas.lake.ids import graph_id
from circuit_atlas.lake.ids import params_hash as hash_params
from circuit_atlas.lake.log import CommitLog
from circuit_atlas.lake.records import write_json_atomic
from circuit_atlas.lake.schemas import SHARD_TABLES, parquet_options, spec
from circuit_atlas.lake.validate import conform

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

COMMIT_FORMAT = "circuit-atlas-shard"


@dataclass(frozen=True)
class Shard:
    """A committed shard: where its files are and what its commit record says."""

    model: str  # the model key (partition value)
    corpus: str
    shard: str
    commit: dict[str, Any]
    root: str = field(repr=False)

    @property
    def rows(self) -> dict[str, int]:
        return self.commit["rows"]

    @property
    def params_hash(self) -> str:
        return self.commit["params_hash"]

    @property
    def prompt_ids(self) -> list[str]:
        return self.commit["prompt_ids"]

    @property
    def seq(self) -> int:
        """The number of its record in the (model, corpus) log: commit order."""
        return self.commit["seq"]

    @property
    def id(self) -> str:
        return f"{self.corpus}/{self.shard}"

    def graph_ids(self) -> list[int]:
        return [graph_id(self.commit["model"], p, self.params_hash) for p in self.prompt_ids]

    def file(self, table: str) -> str:
        """The shard's file in the per-graph ``table``."""
        return f"{self.root}/{layout.shard_file(table, self.model, self.corpus, self.shard)}"


def new_shard_name() -> str:
    """Sortable by creation time, unique across concurrent writers."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:10]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def shards_log(lake: Lake, model_key: str, corpus: str) -> CommitLog:
    return CommitLog(lake.fs, lake.path(layout.shards_log(model_key, corpus)))


def _index_prompts(index: dict[str, Any], record: dict[str, Any]) -> None:
    held = index["held"].setdefault(record.get("params_hash"), {})
    again = [p for p in record.get("prompt_ids", ()) if p in held]
    if again:
        index["repeats"][record["seq"]] = again
    for p in record.get("prompt_ids", ()):
        held.setdefault(p, record["seq"])


def _prompt_index(log: CommitLog) -> dict[str, Any]:
    """{"held": {params hash: {prompt id: first seq}}, "repeats": {seq: prompt ids an
    earlier record of the log commits}}, kept up to date incrementally."""
    return log.fold("prompts", lambda: {"held": {}, "repeats": {}}, _index_prompts)


def committed_prompts(log: CommitLog) -> dict[str, dict[str, int]]:
    """{params hash: {prompt id: seq of the record that first commits it}} of a shard log."""
    return _prompt_index(log)["held"]


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
            shard.write("graph_nodes", nodes_table)
            shard.write("graph_edges", edges_table)
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
        layout.check_name("corpus", self.corpus)
        self.params_hash = hash_params(self.params)
        self._token = uuid.uuid4().hex[:8]
        self._streams: dict[str, _Stream] = {}
        self._graph_ids: list[pa.Array] = []
        self._referenced: dict[str, list[pa.Array]] = {t: [] for t in SHARD_TABLES[1:]}
        self._prompt_ids: list[str] = []
        self._state = "open"
        self.committed: Shard | None = None
        self.marker = self.lake.path(layout.writing_marker(self.shard))
        # the temporary copy is named for its writer: one killed while writing it leaves
        # a file cleanup can judge even when its content was cut short
        write_json_atomic(self.lake.fs, self.marker, {
            "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now(),
            "model_key": self.model_key, "corpus": self.corpus, "shard": self.shard},
            token=f"{socket.gethostname()}-{os.getpid()}")

    def final(self, table: str) -> str:
        return self.lake.path(layout.shard_file(table, self.model_key, self.corpus, self.shard))

    def dirs(self) -> list[str]:
        """The shard's directory in each per-graph table."""
        return [self.final(t).rsplit("/", 1)[0] for t in SHARD_TABLES]

    def write(self, table: str, data: pa.Table) -> None:
        """Append ``data`` (any column order; safely cast) to the shard's ``table``."""
        if self._state != "open":
            raise LakeError(f"shard {self.shard}: already {self._state}")
        if table not in SHARD_TABLES:
            raise LakeError(f"a graph shard holds {', '.join(SHARD_TABLES)}, not {table!r}")
        t_spec = spec(table)
        data = conform(data, t_spec, origin=f"shard {self.shard}/{table}")
        if table == "graphs":
            self._check_graphs(data)
        else:
            self._referenced[table].append(pc.unique(data.column("graph_id")))
        stream = self._streams.get(table)
        if stream is None:
            final = self.final(table)
            self.lake.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            tmp = layout.tmp_name(final, self._token)
            sink = self.lake.fs.open(tmp, "wb")
            writer = pq.ParquetWriter(sink, t_spec.schema, **parquet_options(t_spec.schema))
            stream = self._streams[table] = _Stream(tmp, sink, writer)
        stream.writer.write_table(data)
        stream.rows += data.num_rows

    def _check_graphs(self, data: pa.Table) -> None:
        hashes = set(data.column("params_hash").to_pylist())
        if hashes - {self.params_hash}:
            raise LakeError(
                f"shard {self.shard}: graphs rows carry params_hash {sorted(hashes)}, "
                f"but the shard was opened with params hashing to {self.params_hash}"
            )
        self._graph_ids.append(data.column("graph_id").combine_chunks())
        self._prompt_ids.extend(data.column("prompt_id").to_pylist())

    def _check_references(self) -> None:
        known = pa.concat_arrays(self._graph_ids) if self._graph_ids else pa.array([], pa.int64())
        if len(pc.unique(known)) != len(known):
            raise LakeError(f"shard {self.shard}: graphs table repeats a graph_id")
        for table, chunks in self._referenced.items():
            for ids in chunks:
                unknown = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=known)))
                if len(unknown):
                    raise LakeError(
                        f"shard {self.shard}: {table} rows refer to graph_id "
                        f"{unknown[0].as_py()} that is not in the shard's graphs table")

    def _committed(self, log: CommitLog) -> set[str]:
        """The prompts of this shard that the log already commits with its params."""
        held = committed_prompts(log).get(self.params_hash, {})
        return {p for p in self._prompt_ids if p in held}

    def _drop(self, prompts: set[str], paths: dict[str, str]) -> None:
        """Rewrite the shard's files at ``paths`` without the graphs of ``prompts``."""
        gone = pa.array([graph_id(self.model, p, self.params_hash) for p in prompts],
                        pa.int64())
        fs = self.lake.fs
        for table, path in paths.items():
            with fs.open(path, "rb") as f:
                data = pq.read_table(f)
            kept = data.filter(pc.invert(pc.is_in(data.column("graph_id"), value_set=gone)))
            tmp = layout.tmp_name(path, uuid.uuid4().hex[:8])
            with fs.open(tmp, "wb") as f:
                pq.write_table(kept.replace_schema_metadata(spec(table).schema.metadata), f,
                               **parquet_options(data.schema))
            fs.mv(tmp, path)
            self._streams[table].rows = kept.num_rows
        self._prompt_ids = [p for p in self._prompt_ids if p not in prompts]

    def commit(self) -> Shard | None:
        """Close, check, rename into place and create the commit record last. Returns
        the committed shard, or None when every graph of it was committed by another
        shard first (nothing is left then)."""
        if self._state != "open":
            raise LakeError(f"shard {self.shard}: already {self._state}")
        fs = self.lake.fs
        log = shards_log(self.lake, self.model_key, self.corpus)
        try:
            for table in SHARD_TABLES:
                if table not in self._streams:  # an empty table is still a table
                    self.write(table, spec(table).schema.empty_table())
            self._check_references()
            for stream in self._streams.values():
                stream.writer.close()
                stream.sink.close()
            since = log.last()
            taken = self._committed(log)
            if taken:
                self._drop(taken, {t: s.tmp for t, s in self._streams.items()})
            for table, stream in self._streams.items():
                fs.mv(stream.tmp, self.final(table))
        except BaseException:
            self.abort()
            raise

        def record() -> dict[str, Any]:
            return {
                "format": COMMIT_FORMAT,
                "schema_versions": {t: spec(t).version for t in SHARD_TABLES},
                "rows": {t: s.rows for t, s in self._streams.items()},
                "bytes": {t: fs.size(self.final(t)) for t in SHARD_TABLES},
                "model": self.model, "model_key": self.model_key,
                "model_revision": self.model_revision, "model_shape": self.model_shape,
                "corpus": self.corpus, "shard": self.shard, "code_version": __version__,
                "params": self.params, "params_hash": self.params_hash,
                "prompt_ids": self._prompt_ids, "committed_at": _now(),
            }

        current = {"record": record()}

        def on_conflict(mine: dict[str, Any], theirs: list[dict[str, Any]]):
            taken = self._committed(log)  # the log's index now holds theirs too
            if not taken:
                return mine
            self._drop(taken, {t: self.final(t) for t in SHARD_TABLES})
            current["record"] = record() if self._prompt_ids else None
            return current["record"]

        seq = log.commit(current["record"], on_conflict, since) if self._prompt_ids else -1
        if seq < 0:  # every graph of it was committed by another shard first
            self.abort()
            self._state = "superseded"
            return None
        self._state = "committed"
        # the marker only helps cleanup; a kill before this line leaves a committed shard
        fs.rm(self.marker)
        self.committed = Shard(self.model_key, self.corpus, self.shard,
                               {**current["record"], "seq": seq}, self.lake.root)
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
        for path in [*self.dirs(), self.marker]:
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _check_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    if record.get("format") != COMMIT_FORMAT:
        raise LakeError(f"{where}: not a circuit-atlas shard commit record")
    for table, version in record.get("schema_versions", {}).items():
        if table in SHARD_TABLES and version != spec(table).version:
            raise LakeError(
                f"{where}: shard written with {table} schema version {version}, "
                f"this circuit-atlas reads version {spec(table).version}")
    return record


def shard_logs(lake: Lake, model_key: str | None = None, corpus: str | None = None
               ) -> list[tuple[str, str]]:
    """(model key, corpus) of every shard log, or of those matching the arguments."""
    m = layout.check_name("model", model_key) if model_key else "*"
    c = layout.check_name("corpus", corpus) if corpus else "*"
    base = lake.path(f"{layout.LOG}/shards")
    lake.fs.invalidate_cache(base)
    out = []
    for path in sorted(lake.fs.glob(f"{base}/model={m}/corpus={c}")):
        parts = layout.partition_values(path[len(lake.root):])
        if "model" in parts and "corpus" in parts and lake.fs.isdir(path):
            out.append((parts["model"], parts["corpus"]))
    return out


def list_shards(lake: Lake, model: str | None = None, corpus: str | None = None) -> list[Shard]:
    """Committed shards, in commit order within each (model, corpus)."""
    key = layout.model_key(model) if model else None
    shards: list[Shard] = []
    for model_key, c in shard_logs(lake, key, corpus):
        log = shards_log(lake, model_key, c)

        def add(out: list[Shard], record: dict[str, Any], model_key=model_key, c=c,
                log=log) -> None:
            _check_record(record, f"{log.path}/{record['seq']:012d}.json")
            out.append(Shard(model_key, c, record["shard"], record, lake.root))

        shards += log.fold(f"shards@{lake.root}", list, add)
    return shards


def ordered_shards(lake: Lake, model: str, corpora: list[str]) -> list[Shard]:
    """Committed shards of (model, corpora) in commit order: the order a reduce folds."""
    return [s for s in lake.shards(model) if s.corpus in set(corpora)]


def parameter_sets(shards: list[Shard]) -> dict[str, dict[str, Any]]:
    """The graph parameter sets of ``shards``: params hash -> its parameters, shard and
    graph counts, in order of first commit."""
    out: dict[str, dict[str, Any]] = {}
    for s in shards:
        entry = out.setdefault(s.params_hash, {"params": s.commit.get("params") or {},
                                               "shards": 0, "graphs": 0})
        entry["shards"] += 1
        entry["graphs"] += len(s.prompt_ids)
    return out


def describe_parameter_sets(sets: dict[str, dict[str, Any]]) -> str:
    """One line per set: its hash, counts, and the parameters in which the sets differ."""
    keys = sorted({k for e in sets.values() for k in e["params"]})
    differ = [k for k in keys if len({json.dumps(e["params"].get(k), sort_keys=True)
                                      for e in sets.values()}) > 1]
    parts = []
    for h, e in sets.items():
        shown = ", ".join(f"{k}={e['params'].get(k)}" for k in differ)
        parts.append(f"{h} ({e['shards']} shard{'s' * (e['shards'] != 1)}, "
                     f"{e['graphs']} graphs{'; ' + shown if shown else ''})")
    return "; ".join(parts)


def repeated_graphs(lake: Lake, shards: list[Shard]) -> list[list[int]]:
    """Per shard, the graph ids an earlier shard of the list already holds: each graph
    is read once, from the first shard that has it. Within one (model, corpus) log
    the commit protocol ensures no graph is committed twice (only a filesystem
    without exclusive create lets two racing writers both commit), and the log's
    prompt index says where it did; across corpora a prompt in both is one graph."""
    indexes: dict[tuple[str, str], dict[str, Any]] = {}
    for s in shards:
        if (s.model, s.corpus) not in indexes:
            indexes[(s.model, s.corpus)] = _prompt_index(shards_log(lake, s.model, s.corpus))
    earlier: dict[str, list[dict[str, dict[str, int]]]] = {}  # model -> held of its logs
    before: dict[tuple[str, str], list[dict[str, dict[str, int]]]] = {}
    for model, corpus in indexes:
        before[(model, corpus)] = list(earlier.get(model, []))
        earlier.setdefault(model, []).append(indexes[(model, corpus)]["held"])
    out = []
    for s in shards:
        again = set(indexes[(s.model, s.corpus)]["repeats"].get(s.seq, ()))
        if not again and not before[(s.model, s.corpus)]:
            out.append([])
            continue
        for held in before[(s.model, s.corpus)]:
            other = held.get(s.params_hash)
            if other:
                again.update(p for p in s.prompt_ids if p in other)
        out.append([graph_id(s.commit["model"], p, s.params_hash)
                    for p in s.prompt_ids if p in again])
    return out
