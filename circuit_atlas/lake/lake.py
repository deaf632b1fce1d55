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
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.derived import (
    TableVersion,
    read_manifest,
    table_files,
    unpublished_versions,
)
from circuit_atlas.lake.ids import prompt_id
from circuit_atlas.lake.prompt_files import Record, meta_json
from circuit_atlas.lake.records import read_record, write_json_atomic
from circuit_atlas.lake.schemas import DERIVED, PROMPTS, TableSpec, parquet_options, spec
from circuit_atlas.lake.shards import (
    CleanupReport,
    Shard,
    ShardWriter,
    cleanup,
    list_shards,
    uncommitted_shard_dirs,
)
from circuit_atlas.lake.validate import check_file, conform

if TYPE_CHECKING:
    import polars as pl

FORMAT_NAME = "circuit-atlas-lake"
FORMAT_VERSION = 1


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
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.url = os.fspath(path)
        self.fs, root = fsspec.core.url_to_fs(self.url)
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
                },
            )
        self.meta = self._read_marker(marker)

    @classmethod
    def init(cls, path: str | os.PathLike) -> Lake:
        """Open the lake at ``path``, creating it (and ``_lake.json``) if needed."""
        return cls(path, create=True)

    def _read_marker(self, marker: str) -> dict[str, Any]:
        meta = read_record(self.fs, marker, FORMAT_NAME, "lake marker")
        if meta.get("format_version") != FORMAT_VERSION:
            raise LakeError(
                f"{marker}: lake format version {meta.get('format_version')}, "
                f"this circuit-atlas {__version__} reads version {FORMAT_VERSION}"
            )
        return meta

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (a layout path) under the root."""
        return f"{self.root}/{rel}" if rel else self.root

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    # prompts ---------------------------------------------------------------------

    def corpora(self) -> list[str]:
        """Names of the corpora that hold prompts."""
        return sorted(self._prompt_files_by_corpus())

    def _prompt_files_by_corpus(self) -> dict[str, list[str]]:
        """{corpus: its prompt part files}, from one glob."""
        out: dict[str, list[str]] = {}
        for f in sorted(self.fs.glob(self.path(f"{layout.PROMPTS}/corpus=*/part-*.parquet"))):
            out.setdefault(layout.partition_values(f[len(self.root):])["corpus"], []).append(f)
        return out

    def _prompt_files(self, corpus: str) -> list[str]:
        return sorted(self.fs.glob(self.path(f"{layout.prompts_dir(corpus)}/part-*.parquet")))

    def check_corpus(self, corpus: str) -> str:
        """``corpus`` if it holds prompts, else a LakeError listing the corpora."""
        layout.check_name("corpus", corpus)
        if not self._prompt_files(corpus):
            known = ", ".join(self.corpora()) or "none yet; add some with `prompts import`"
            raise LakeError(f"unknown corpus {corpus!r} in lake {self.url} (corpora: {known})")
        return corpus

    def import_prompts(
        self, records: Iterable[Record], corpus: str, source: str | None = None,
        domain: str | None = None,
    ) -> ImportReport:
        """Add the prompts of ``records`` that ``corpus`` does not hold yet.

        Ids are content hashes, so importing the same prompts again adds nothing.
        ``domain`` fills in records that have none. The new prompts land as one
        Parquet part, written to a temporary name and renamed.
        """
        layout.check_name("corpus", corpus)
        existing = self._existing_prompt_ids(corpus)
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
        already = n_in - dup_in - len(rows)
        if rows:
            table = conform(pa.Table.from_pylist(list(rows.values())), PROMPTS, source or corpus)
            part = self.path(layout.prompts_part(corpus, uuid.uuid4().hex[:16]))
            tmp = layout.tmp_name(part, uuid.uuid4().hex[:8])
            self.fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f, **parquet_options(table.schema))
            self.fs.mv(tmp, part)
        return ImportReport(corpus, len(rows), already, dup_in, source)

    def _existing_prompt_ids(self, corpus: str) -> set[str]:
        files = self._prompt_files(corpus)
        if not files:
            return set()
        return set(self._dataset(PROMPTS, files).to_table(columns=["prompt_id"])
                   .column("prompt_id").to_pylist())

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
        """Committed graph shards, optionally of one model and/or corpus."""
        return list_shards(self, model, corpus)

    def models(self) -> list[str]:
        """Model keys (partition values) with at least one committed shard."""
        return sorted({s.model for s in self.shards()})

    def committed_prompt_ids(self, model: str, corpus: str, params_hash: str) -> set[str]:
        """Prompt ids whose graphs are committed for (model, corpus, params): a rerun skips them."""
        return {
            pid
            for s in self.shards(model, corpus)
            if s.params_hash == params_hash
            for pid in s.prompt_ids
        }

    def cleanup(self, min_age_s: float = 3600.0, dry_run: bool = False) -> CleanupReport:
        """Remove debris of uncommitted shards, imports and unpublished table versions;
        see :func:`shards.cleanup`."""
        return cleanup(self, min_age_s=min_age_s, dry_run=dry_run,
                       unpublished=unpublished_versions(self))

    # readers ---------------------------------------------------------------------

    def files(self, table: str, model: str | None = None, corpus: str | None = None,
              validate: bool = True) -> list[str]:
        """The committed Parquet files of a lake table, each checked against its schema."""
        t_spec = spec(table)
        if t_spec is PROMPTS:
            if corpus:
                files = self._prompt_files(self.check_corpus(corpus))
            else:
                files = [f for fs in self._prompt_files_by_corpus().values() for f in fs]
        else:
            files = [s.file(table) for s in self.shards(model, corpus)]
        if validate:
            for f in files:
                check_file(f, t_spec, self.fs)
        return files

    def _dataset(self, t_spec: TableSpec, files: list[str]) -> ds.Dataset:
        base = self._base(t_spec)
        values = [layout.partition_values(f[len(base):]) for f in files]
        if DERIVED.get(t_spec.name) is t_spec:  # tables/model=/corpus=/<name>/v-*/<file>
            return ds.dataset(files, schema=t_spec.schema, format="parquet",
                              filesystem=self.fs)
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

    def dataset(self, table: str, model: str | None = None, corpus: str | None = None
                ) -> ds.Dataset:
        """A pyarrow dataset over the committed files of ``table``, partitions as columns."""
        return self._dataset(spec(table), self.files(table, model, corpus))

    def _base(self, t_spec: TableSpec) -> str:
        if DERIVED.get(t_spec.name) is t_spec:
            return self.path(layout.TABLES)
        return self.path(layout.PROMPTS if t_spec is PROMPTS else layout.GRAPHS)

    def scan(self, table: str, model: str | None = None, corpus: str | None = None
             ) -> pl.LazyFrame:
        """A polars LazyFrame over the committed files of ``table``, partitions as columns."""
        return self._scan(spec(table), self.files(table, model, corpus))

    def table(self, name: str, model: str | None = None, corpus: str | None = None
              ) -> pl.LazyFrame:
        """A derived table (``edges``, ``neurons``, ...) as a polars LazyFrame, with
        ``model`` and ``corpus`` as columns: ``lake.table("neurons").collect()``."""
        if name not in DERIVED:
            raise LakeError(f"unknown derived table {name!r}; known: {', '.join(DERIVED)}")
        files = table_files(self, name, model, corpus)
        if not files:
            raise LakeError(f"lake {self.url} has no {name} table"
                            + (f" for model {model!r}" if model else "")
                            + (f" and corpus {corpus!r}" if corpus else "")
                            + "; build it with: circuit-atlas reduce")
        return self._scan(DERIVED[name], files)

    def new_table_version(self, model: str, corpus: str, name: str) -> TableVersion:
        """Start a new version of a derived table; see :class:`derived.TableVersion`."""
        return TableVersion(self, model, corpus, name)

    def table_manifest(self, model: str, corpus: str, name: str) -> dict[str, Any] | None:
        """What the current version of a derived table was built from, or None."""
        return read_manifest(self, model, corpus, name)

    def _scan(self, t_spec: TableSpec, files: list[str]) -> pl.LazyFrame:
        import polars as pl

        if not files:
            return pl.from_arrow(t_spec.dataset_schema.empty_table()).lazy().with_columns(
                pl.col(p).cast(pl.String) for p in t_spec.partitions)
        if not isinstance(self.fs, LocalFileSystem):
            return pl.scan_pyarrow_dataset(self._dataset(t_spec, files))
        return pl.scan_parquet(
            files,
            schema=pl.Schema(pl.from_arrow(t_spec.schema.empty_table()).schema),
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
        corpora = {}
        for c, files in sorted(self._prompt_files_by_corpus().items()):
            corpora[c] = {
                "prompts": sum(pq.read_metadata(f, filesystem=self.fs).num_rows for f in files),
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
            c["nodes"] += s.rows["nodes"]
            c["edges"] += s.rows["edges"]
            c["bytes"] += sum(s.commit["bytes"].values())
        return {
            "lake": self.url,
            "format_version": self.meta["format_version"],
            "created_by": self.meta.get("created_by"),
            "corpora": corpora,
            "models": models,
            "uncommitted_shards": len(uncommitted_shard_dirs(self)),
            "tables": self.derived_tables(),
        }

    def derived_tables(self) -> dict[str, dict[str, list[str]]]:
        """{model: {corpus: [table, ...]}} of the derived tables under ``tables/``."""
        out: dict[str, dict[str, list[str]]] = {}
        pattern = self.path(f"{layout.TABLES}/model=*/corpus=*/*/_MANIFEST.json")
        for p in sorted(self.fs.glob(pattern)):
            parts = layout.partition_values(p[len(self.root):])
            name = p.rsplit("/", 2)[-2]
            out.setdefault(parts["model"], {}).setdefault(parts["corpus"], []).append(name)
        return out
