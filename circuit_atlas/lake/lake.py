"""The ``Lake``: a root (local path or fsspec URL) and everything read or written under it."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.cleanup import DAY, CleanupReport, cleanup
from circuit_atlas.lake.derived import (
    TableVersion,
    read_manifest,
    table_files,
    table_logs,
)
from circuit_atlas.lake.ids import prompt_id
from circuit_atlas.lake.log import CommitLog
from circuit_atlas.lake.prompt_files import Record, meta_json
from circuit_atlas.lake.records import read_record, write_json_atomic
from circuit_atlas.lake.schemas import DERIVED, PROMPTS, TableSpec, parquet_options, spec
from circuit_atlas.lake.shards import Shard, ShardWriter, list_shards, repeated_graphs
from circuit_atlas.lake.validate import check_file, conform, read_parquet

if TYPE_CHECKING:
    import polars as pl
    import pyarrow.dataset as ds  # imported where used: it imports pandas (~1 s)

FORMAT_NAME = "circuit-atlas-lake"
FORMAT_VERSION = 2
PART_FORMAT = "circuit-atlas-prompts"
RETENTION_S = 7 * DAY

Version = int | str | dt.datetime | None


@dataclass(frozen=True)
class ImportReport:
    corpus: str
    added: int
    already_present: int
    duplicates_in_input: int
    file: str | None


class Lake:
    """A circuit-atlas lake. ``Lake(path)`` opens an existing one; ``Lake.init(path)`` creates.

    ``path`` is a local folder or any fsspec URL (``s3://bucket/atlas``, ``memory://x``).
    ``storage_options`` go to fsspec (credentials, an S3 endpoint).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        marker = self.path(layout.LAKE_FILE)
        if not self.fs.exists(marker):
            if not create:
                raise LakeError(
                    f"{self.url}: not a circuit-atlas lake (no {layout.LAKE_FILE}); "
                    f"create one with: circuit-atlas lake init --lake {self.url}"
                )
            if self.fs.exists(self.root) and self.fs.ls(self.root):
                raise LakeError(
                    f"{self.url}: folder exists and is not empty, but is not a lake "
                    f"(no {layout.LAKE_FILE}); choose a new or empty folder"
                )
            self.fs.makedirs(self.root, exist_ok=True)
            write_json_atomic(
                self.fs,
                marker,
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "created_by": f"circuit-atlas {__version__}",
                    "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "retention_seconds": RETENTION_S,
                },
            )
        self.meta = self._read_marker(marker)

    @classmethod
    def init(cls, path: str | os.PathLike, **kwargs: Any) -> Lake:
        """Open the lake at ``path``, creating it (and ``_lake.json``) if needed."""
        return cls(path, create=True, **kwargs)

    def _read_marker(self, marker: str) -> dict[str, Any]:
        meta = read_record(self.fs, marker, FORMAT_NAME, "lake marker")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            how = (f"migrate it with: circuit-atlas lake migrate --lake {self.url}"
                   if isinstance(version, int) and version < FORMAT_VERSION
                   else "upgrade circuit-atlas to read it")
            raise LakeError(
                f"{marker}: lake format version {version}, this circuit-atlas "
                f"{__version__} reads version {FORMAT_VERSION}; {how}"
            )
        return meta

    @property
    def retention_s(self) -> float:
        """How long superseded versions of derived tables stay readable (``_lake.json``:
        ``retention_seconds``)."""
        return float(self.meta.get("retention_seconds", RETENTION_S))

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (a layout path) under the root."""
        return f"{self.root}/{rel}" if rel else self.root

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    # prompts ---------------------------------------------------------------------

    def _prompt_log(self, corpus: str) -> CommitLog:
        return CommitLog(self.fs, self.path(layout.prompts_log(corpus)))

    def corpora(self) -> list[str]:
        """Names of the corpora that hold prompts."""
        base = self.path(f"{layout.LOG}/{layout.PROMPTS}")
        self.fs.invalidate_cache(base)
        return sorted(layout.partition_values(p[len(self.root):])["corpus"]
                      for p in self.fs.glob(f"{base}/corpus=*")
                      if self._prompt_log(layout.partition_values(
                          p[len(self.root):])["corpus"]).last() >= 0)

    def _prompt_files(self, corpus: str) -> list[str]:
        """The committed prompt parts of ``corpus``, in commit order."""
        return [self.path(f"{layout.prompts_dir(corpus)}/{r['part']}")
                for r in self._prompt_log(corpus).records()]

    def check_corpus(self, corpus: str) -> str:
        """``corpus`` if it holds prompts, else a LakeError listing the corpora."""
        layout.check_name("corpus", corpus)
        if self._prompt_log(corpus).last() < 0:
            known = ", ".join(self.corpora()) or "none yet; add some with `prompts import`"
            raise LakeError(f"unknown corpus {corpus!r} in lake {self.url} (corpora: {known})")
        return corpus

    def import_prompts(
        self, records: Iterable[Record], corpus: str, source: str | None = None,
        domain: str | None = None,
    ) -> ImportReport:
        """Add the prompts of ``records`` that ``corpus`` does not hold yet.

        Ids are content hashes, so importing the same prompts again adds nothing. The
        new prompts land as one Parquet part, committed by one log record; an import
        that races another one for the same prompts drops those the other committed
        first, so each prompt is stored once.
        """
        layout.check_name("corpus", corpus)
        log = self._prompt_log(corpus)
        seen_seq = log.last()
        existing = self._ids_of(self._prompt_files(corpus))
        rows: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        n_in, dup_in = 0, 0
        for record in records:
            n_in += 1
            pid = prompt_id(record["text"])
            if pid in seen:
                dup_in += 1
                continue
            seen.add(pid)
            if pid in existing:
                continue
            rows[pid] = {
                "prompt_id": pid,
                "text": record["text"],
                "domain": record.get("domain") or domain,
                "source": source,
                "meta": meta_json(record.get("meta")),
            }
        if rows:
            table = conform(pa.Table.from_pylist(list(rows.values())), PROMPTS, source or corpus)
            name = f"part-{uuid.uuid4().hex[:16]}.parquet"
            part = self.path(f"{layout.prompts_dir(corpus)}/{name}")
            self._write_part(part, table)

            def on_conflict(mine: dict[str, Any], theirs: list[dict[str, Any]]):
                nonlocal table
                taken = self._ids_of([self.path(f"{layout.prompts_dir(corpus)}/{r['part']}")
                                      for r in theirs])
                kept = table.filter(pc.invert(pc.is_in(
                    table.column("prompt_id"), value_set=pa.array(sorted(taken), pa.string()))))
                if kept.num_rows == table.num_rows:
                    return mine
                for pid in set(rows) & taken:
                    del rows[pid]
                table = kept
                if not kept.num_rows:
                    self.fs.rm(part)
                    return None
                self._write_part(part, kept)
                return {**mine, "rows": kept.num_rows}

            log.commit({"format": PART_FORMAT, "part": name, "rows": table.num_rows,
                        "source": source, "code_version": __version__}, on_conflict,
                       since=seen_seq)
        already = n_in - dup_in - len(rows)
        return ImportReport(corpus, len(rows), already, dup_in, source)

    def _write_part(self, part: str, table: pa.Table) -> None:
        tmp = layout.tmp_name(part, uuid.uuid4().hex[:8])
        self.fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, **parquet_options(table.schema))
        self.fs.mv(tmp, part)

    def _ids_of(self, files: list[str]) -> set[str]:
        ids: set[str] = set()
        for f in files:
            ids.update(read_parquet(f, PROMPTS, self.fs, ["prompt_id"])
                       .column("prompt_id").to_pylist())
        return ids

    # graph shards ----------------------------------------------------------------

    def open_shard(
        self, model: str, corpus: str, params: dict[str, Any], model_revision: str | None = None,
        model_shape: dict[str, int] | None = None,
    ) -> ShardWriter:
        """A writer for a new graph shard; see :class:`ShardWriter`. ``model_shape``
        (n_layers, n_neurons, d_model, vocab_size) lets later stages tell logit nodes,
        whose layer is n_layers, from neurons."""
        return ShardWriter(self, model, corpus, params, model_revision, model_shape)

    def shards(self, model: str | None = None, corpus: str | None = None) -> list[Shard]:
        """Committed graph shards, optionally of one model and/or corpus, in commit order
        (by commit time across corpora, by record number within one)."""
        shards = list_shards(self, model, corpus)
        return sorted(shards, key=lambda s: (s.commit["committed_at"], s.corpus, s.seq))

    def models(self) -> list[str]:
        """Model keys (partition values) with at least one committed shard."""
        return sorted({s.model for s in self.shards()})

    def committed_prompt_ids(self, model: str, corpus: str, params_hash: str) -> set[str]:
        """Prompt ids whose graphs are committed for (model, corpus, params): a rerun skips them."""
        from circuit_atlas.lake.shards import committed_prompts, shards_log

        return set(committed_prompts(shards_log(self, layout.model_key(model), corpus)).get(
            params_hash, ()))

    def cleanup(self, min_age_s: float = 3600.0, dry_run: bool = False) -> CleanupReport:
        """Remove debris and expired versions; see :mod:`circuit_atlas.lake.cleanup`."""
        return cleanup(self, min_age_s=min_age_s, dry_run=dry_run)

    # readers ---------------------------------------------------------------------

    def files(self, table: str, model: str | None = None, corpus: str | None = None,
              validate: bool = True, version: Version = None) -> list[str]:
        """The files a snapshot of ``table`` reads, each checked against its schema: the
        committed prompt parts or graph shards, or the current version (``version``) of
        a derived table. Any engine given this list reads exactly the snapshot, except
        that a graph committed twice (only where the filesystem cannot create files
        exclusively) is then read twice: :meth:`scan` drops the repeat."""
        if table in DERIVED:
            return table_files(self, table, model, corpus, validate, version)
        return [f for f, _ in self._files_and_repeats(table, model, corpus, validate)]

    def _files_and_repeats(self, table: str, model: str | None, corpus: str | None,
                           validate: bool = True) -> list[tuple[str, list[int]]]:
        """(file, graph ids to leave out of it) of a per-graph table or prompts."""
        t_spec = spec(table)
        if t_spec is PROMPTS:
            corpora = [self.check_corpus(corpus)] if corpus else self.corpora()
            out = [(f, []) for c in corpora for f in self._prompt_files(c)]
        else:
            shards = self.shards(model, corpus)
            out = list(zip([s.file(table) for s in shards], repeated_graphs(self, shards),
                           strict=True))
        if validate:
            for f, _ in out:
                check_file(f, t_spec, self.fs)
        return out

    def _dataset(self, t_spec: TableSpec, files: list[str]) -> ds.Dataset:
        import pyarrow.dataset as ds

        base = self._base(t_spec)
        values = [layout.partition_values(f[len(base):]) for f in files]
        dictionaries = {
            p: pa.array(sorted({v[p] for v in values}), pa.string()) for p in t_spec.partitions
        }
        return ds.dataset(
            files,
            schema=t_spec.dataset_schema,
            format="parquet",
            filesystem=self.fs,
            partitioning=ds.partitioning(
                t_spec.partitioning_schema, flavor="hive", dictionaries=dictionaries
            ),
            partition_base_dir=base,
        )

    def _base(self, t_spec: TableSpec) -> str:
        if DERIVED.get(t_spec.name) is t_spec:
            return self.path(layout.TABLES)
        return self.path(layout.PROMPTS if t_spec is PROMPTS else t_spec.name)

    def dataset(self, table: str, model: str | None = None, corpus: str | None = None,
                version: Version = None) -> ds.Dataset:
        """A pyarrow dataset over a snapshot of ``table``, partitions as columns."""
        if table in DERIVED:
            return self._dataset(DERIVED[table], self._derived_files(table, model, corpus,
                                                                      version))
        parts = self._files_and_repeats(table, model, corpus)
        data = self._dataset(spec(table), [f for f, _ in parts])
        if not any(r for _, r in parts):
            return data
        return data.filter(~_repeat_filter(
            [(layout.partition_values(f)["shard"], r) for f, r in parts]))

    def scan(self, table: str, model: str | None = None, corpus: str | None = None
             ) -> pl.LazyFrame:
        """A polars LazyFrame over the committed prompts or graphs of ``table``
        (``prompts``, ``graphs``, ``graph_nodes``, ``graph_edges``), partitions as
        columns, each graph once."""
        if table in DERIVED:
            raise LakeError(f"{table!r} is a derived table: read it with Lake.table({table!r})"
                            " (the per-graph tables are graphs, graph_nodes, graph_edges)")
        import polars as pl

        parts = self._files_and_repeats(table, model, corpus)
        t_spec = spec(table)
        clean = [f for f, r in parts if not r]
        frames = [self._scan(t_spec, clean)] if clean or not parts else []
        frames += [self._scan(t_spec, [f]).filter(~pl.col("graph_id").is_in(r))
                   for f, r in parts if r]
        return frames[0] if len(frames) == 1 else pl.concat(frames)

    def corpus_prompts(self, corpora: list[str]) -> pl.LazyFrame:
        """The prompts of ``corpora`` by id, each once (a text in two corpora has one id)."""
        import polars as pl

        return (pl.concat([self.scan("prompts", corpus=c) for c in corpora])
                .unique("prompt_id").sort("prompt_id"))

    def _derived_files(self, name: str, model: str | None, corpus: str | None,
                       version: Version) -> list[str]:
        if name not in DERIVED:
            raise LakeError(f"unknown derived table {name!r}; known: {', '.join(DERIVED)}")
        files = table_files(self, name, model, corpus, version=version)
        if not files and not table_logs(self, name, model, corpus):
            raise LakeError(f"lake {self.url} has no {name} table"
                            + (f" for model {model!r}" if model else "")
                            + (f" and corpus {corpus!r}" if corpus else "")
                            + "; build it with: circuit-atlas reduce")
        return files

    def table(self, name: str, model: str | None = None, corpus: str | None = None,
              version: Version = None) -> pl.LazyFrame:
        """A table as a polars LazyFrame: ``lake.table("neurons").collect()``.

        Derived tables (``edges``, ``neurons``, ...) have ``model`` and ``corpus``
        columns, and ``version`` reads an earlier one still kept (its number, id or a
        datetime); the per-graph tables (``graphs``, ``graph_nodes``, ``graph_edges``)
        and ``prompts`` are :meth:`scan`'s. ``model`` is a hub id or its partition key.
        """
        if name not in DERIVED:
            self._no_versions(name, version)
            return self.scan(name, model, corpus)
        return self._scan(DERIVED[name], self._derived_files(name, model, corpus, version))

    def optional_table(self, name: str, model: str, corpus: str) -> pl.LazyFrame | None:
        """A derived table that a stage may not have built: None when it was never
        published. A table that exists but cannot be read is an error, never absent."""
        if not table_logs(self, name, model, corpus):
            return None
        return self.table(name, model, corpus).drop("model", "corpus")

    def _no_versions(self, name: str, version: Version) -> None:
        if version is not None:
            raise LakeError(f"{name} is read as committed (shards are never replaced); "
                            "version= applies to derived tables")

    def arrow(self, name: str, model: str | None = None, corpus: str | None = None,
              version: Version = None) -> ds.Dataset:
        """A table as a pyarrow Dataset (the same rows as :meth:`table`)."""
        if name not in DERIVED:
            self._no_versions(name, version)
        return self.dataset(name, model, corpus, version)

    def dask(self, name: str, model: str | None = None, corpus: str | None = None,
             version: Version = None):
        """A table as a dask.dataframe (the same rows as :meth:`table`), one partition
        per file: per shard for the per-graph tables, per source layer for ``edges``
        (indexed by ``src_layer``, divisions known)."""
        from circuit_atlas.lake.frames import dask_frame

        if name in DERIVED:
            files = self._derived_files(name, model, corpus, version)
            return dask_frame(self, DERIVED[name], [(f, []) for f in files])
        self._no_versions(name, version)
        return dask_frame(self, spec(name), self._files_and_repeats(name, model, corpus))

    def table_path(self, name: str, model: str, corpus: str, version: Version = None) -> str:
        """The directory of a derived table's current version (or ``version``): it
        holds exactly that version's files, for engines that read a folder."""
        record = read_manifest(self, model, corpus, name, version)
        if record is None:
            raise LakeError(f"lake {self.url} has no {name} table for {model!r} / {corpus!r}")
        base = layout.table_dir(layout.model_key(model), corpus, name)
        return self.path(f"{base}/{record['version']}")

    def new_table_version(self, model: str, corpus: str, name: str) -> TableVersion:
        """Start a new version of a derived table; see :class:`derived.TableVersion`."""
        return TableVersion(self, model, corpus, name)

    def table_manifest(self, model: str, corpus: str, name: str, version: Version = None
                       ) -> dict[str, Any] | None:
        """What the current version (or ``version``) of a derived table was built
        from, or None."""
        return read_manifest(self, model, corpus, name, version)

    def _scan(self, t_spec: TableSpec, files: list[str]) -> pl.LazyFrame:
        import polars as pl

        if not files:
            return pl.LazyFrame(schema={**polars_schema(t_spec.schema),
                                        **{p: pl.String for p in t_spec.partitions}})
        if not isinstance(self.fs, LocalFileSystem):
            return pl.scan_pyarrow_dataset(self._dataset(t_spec, files)).with_columns(
                pl.col(p).cast(pl.String) for p in t_spec.partitions)
        return pl.scan_parquet(
            files,
            schema=polars_schema(t_spec.schema),
            hive_partitioning=True,
            hive_schema={p: pl.String for p in t_spec.partitions},
        )

    def read(self, table: str, model: str | None = None, corpus: str | None = None,
             columns: list[str] | None = None) -> pa.Table:
        """``table`` (or some of its columns) in memory as a pyarrow Table."""
        dataset = self.dataset(table, model, corpus)
        try:
            return dataset.to_table(columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise LakeError(f"{self.url}: cannot read {table}: {e}") from e

    def sql(self, query: str, views: dict | None = None) -> pl.DataFrame:
        """Run a SQL query (polars SQL) over every table of the lake as a view:
        ``lake.sql("SELECT layer, count(*) FROM neurons GROUP BY layer")``; ``views``
        (name: polars frame) replaces them."""
        from circuit_atlas.lake.query import sql

        return sql(self, query, views)

    def duckdb(self, database: str = ":memory:", views: dict | None = None):
        """A DuckDB connection with every table of the lake as a view over its files
        (or ``views``, name: polars frame, instead)."""
        from circuit_atlas.lake.query import duckdb_connection

        return duckdb_connection(self, database, views)

    # summary ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Corpora, models, shards, graphs, rows and bytes: what ``lake info`` prints."""
        from circuit_atlas.lake.cleanup import uncommitted_shards

        corpora = {}
        for c in self.corpora():
            files = self._prompt_files(c)
            for f in files:
                check_file(f, PROMPTS, self.fs)
            corpora[c] = {
                "prompts": sum(_metadata(f, self.fs).num_rows for f in files),
                "files": len(files),
                "bytes": sum(self.fs.size(f) for f in files),
            }
        models: dict[str, dict[str, Any]] = {}
        for s in self.shards():
            entry = models.setdefault(s.model, {"model": s.commit["model"], "corpora": {}})
            c = entry["corpora"].setdefault(
                s.corpus, {"shards": 0, "graphs": 0, "nodes": 0, "edges": 0, "bytes": 0}
            )
            c["shards"] += 1
            c["graphs"] += s.rows["graphs"]
            c["nodes"] += s.rows["graph_nodes"]
            c["edges"] += s.rows["graph_edges"]
            c["bytes"] += sum(s.commit["bytes"].values())
        return {
            "lake": self.url,
            "format_version": self.meta["format_version"],
            "created_by": self.meta.get("created_by"),
            "retention_seconds": self.retention_s,
            "corpora": corpora,
            "models": models,
            "uncommitted_shards": len(uncommitted_shards(self)),
            "tables": self.derived_tables(),
        }

    def reduced_corpus(self, model: str, corpora: str | list[str] | tuple[str, ...] | None
                       = None) -> str:
        """The corpus key of a reduced table set of ``model``: ``corpora``'s, or when none
        are given the only set with a ``neurons`` table (an error naming the sets
        otherwise; per-corpus tables such as exemplars do not make a set)."""
        if corpora:
            return layout.corpus_key([corpora] if isinstance(corpora, str) else list(corpora))
        keys = sorted(c for c, tables in self.derived_tables().get(layout.model_key(model),
                                                                   {}).items()
                      if "neurons" in tables)
        if len(keys) != 1:
            raise LakeError(
                f"the lake holds reduced tables of {model!r} for {len(keys)} corpus sets "
                f"({', '.join(keys) or 'none'}); say which with --corpus")
        return keys[0]

    def derived_tables(self) -> dict[str, dict[str, list[str]]]:
        """{model: {corpus: [table, ...]}} of the published derived tables."""
        out: dict[str, dict[str, list[str]]] = {}
        base = self.path(f"{layout.LOG}/{layout.TABLES}")
        self.fs.invalidate_cache(base)
        for p in sorted(self.fs.glob(f"{base}/model=*/corpus=*/*")):
            parts = layout.partition_values(p[len(self.root):])
            name = p.rsplit("/", 1)[-1]
            out.setdefault(parts["model"], {}).setdefault(parts["corpus"], []).append(name)
        return out


def polars_schema(schema: pa.Schema) -> pl.Schema:
    """The polars schema of a lake table's Arrow schema (``pl.from_arrow`` would do, but
    it imports pandas where installed: a second on every command's start)."""
    import polars as pl

    def dtype(t: pa.DataType):
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return pl.List(dtype(t.value_type))
        if pa.types.is_dictionary(t):
            return pl.String
        return {pa.int8(): pl.Int8, pa.int16(): pl.Int16, pa.int32(): pl.Int32,
                pa.int64(): pl.Int64, pa.float32(): pl.Float32, pa.float64(): pl.Float64,
                pa.string(): pl.String, pa.large_string(): pl.String,
                pa.bool_(): pl.Boolean}[t]

    return pl.Schema({f.name: dtype(f.type) for f in schema})


def _metadata(path: str, fs) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise LakeError(f"{path}: not a readable Parquet file (truncated or corrupt?): "
                        f"{e}") from e


def _repeat_filter(parts: list[tuple[str, list[int]]]) -> ds.Expression:
    import pyarrow.dataset as ds

    """An expression true on the rows of graphs read from an earlier shard already."""
    expr = None
    for shard, repeats in parts:
        if repeats:
            one = (ds.field("shard") == shard) & ds.field("graph_id").isin(repeats)
            expr = one if expr is None else expr | one
    return expr
