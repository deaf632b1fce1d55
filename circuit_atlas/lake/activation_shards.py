"""Activation shards: what one task of the activations stage saw, committed whole.

    activations/model=<m>/corpus=<c>/shard=<s>/activation_state.parquet
    activations/model=<m>/corpus=<c>/shard=<s>/activation_windows.parquet
    _log/activations/model=<m>/corpus=<c>/<n>.json        one record per shard

A shard's files are written first and its record (see :mod:`log`) last; the record
names the texts (prompt ids) whose windows the shard holds, under one parameter
hash. A shard that finds any of its texts committed by another record first (a
retried task whose first attempt did commit) commits nothing and removes its files,
so every text is counted once. Files that no record names are a writer still busy,
or debris that ``lake cleanup`` removes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas._version import __version__
from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.log import CommitLog
from circuit_atlas.lake.schemas import (
    ACTIVATION_STATE,
    ACTIVATION_TABLES,
    ACTIVATION_WINDOWS,
    TableSpec,
    parquet_options,
)
from circuit_atlas.lake.shards import committed_prompts, new_shard_name
from circuit_atlas.lake.validate import conform

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

COMMIT_FORMAT = "circuit-atlas-activation-shard"
SPECS: dict[str, TableSpec] = {"activation_state": ACTIVATION_STATE,
                               "activation_windows": ACTIVATION_WINDOWS}


@dataclass(frozen=True)
class ActivationShard:
    """A committed activation shard: its record and where its files are."""

    record: dict[str, Any]

    @property
    def shard(self) -> str:
        return self.record["shard"]

    def file(self, table: str) -> str:
        """The root-relative path of the shard's file of ``table``."""
        r = self.record
        return f"{layout.activation_dir(r['model_key'], r['corpus'], self.shard)}/{table}.parquet"


def activations_log(lake: Lake, model_key: str, corpus: str) -> CommitLog:
    return CommitLog(lake.fs, lake.path(layout.activations_log(model_key, corpus)))


def committed_texts(lake: Lake, model: str, corpus: str, params_hash: str) -> set[str]:
    """The prompt ids whose windows a committed shard holds under ``params_hash``."""
    log = activations_log(lake, layout.model_key(model), corpus)
    return set(committed_prompts(log).get(params_hash, {}))


def activation_shards(lake: Lake, model: str, corpus: str, params_hash: str | None = None
                      ) -> list[ActivationShard]:
    """The committed shards of (model, corpus), oldest first; only those of
    ``params_hash`` when given. ``model``: its name or partition key."""
    log = activations_log(lake, layout.model_key(model), corpus)
    out = []
    for record in log.records():
        if record.get("format") != COMMIT_FORMAT:
            raise LakeError(f"{log.path}/{record['seq']:012d}.json: not an activation "
                            "shard record")
        if params_hash is None or record.get("params_hash") == params_hash:
            out.append(ActivationShard(record))
    return out


def commit_activation_shard(lake: Lake, model: str, corpus: str, *, params: dict[str, Any],
                            params_hash: str, prompt_ids: list[str],
                            tables: dict[str, pa.Table], model_revision: str | None = None,
                            model_shape: dict[str, int] | None = None,
                            rows_per_group: int | None = None) -> ActivationShard | None:
    """Write a shard's tables and commit it; None (and nothing left behind) when one of
    its texts was committed by another shard first. ``rows_per_group``: Parquet row
    group size of the state (one layer's neurons, so that reading a layer skips the
    rest)."""
    if sorted(tables) != sorted(ACTIVATION_TABLES):
        raise LakeError(f"an activation shard holds {', '.join(ACTIVATION_TABLES)}, "
                        f"got {', '.join(sorted(tables))}")
    key = layout.model_key(model)
    shard = new_shard_name()
    fs = lake.fs
    directory = lake.path(layout.activation_dir(key, corpus, shard))
    fs.makedirs(directory, exist_ok=True)
    written = {}
    try:
        for name, data in tables.items():
            data = conform(data, SPECS[name], origin=f"{directory}/{name}.parquet")
            path = f"{directory}/{name}.parquet"
            with fs.open(path, "wb") as f:
                pq.write_table(data, f, row_group_size=rows_per_group or 1 << 20,
                               **parquet_options(data.schema, "lz4"))
            written[name] = data.num_rows
        record = {
            "format": COMMIT_FORMAT,
            "schema_versions": {t: SPECS[t].version for t in ACTIVATION_TABLES},
            "rows": written, "model": model, "model_key": key,
            "model_revision": model_revision, "model_shape": model_shape,
            "corpus": corpus, "shard": shard,
            "params": params, "params_hash": params_hash, "prompt_ids": list(prompt_ids),
            "tokens": int(pa.compute.sum(pa.compute.list_value_length(
                tables["activation_windows"].column("token_ids"))).as_py() or 0),
            "code_version": __version__,
            "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        }
        log = activations_log(lake, key, corpus)
        mine = set(prompt_ids)

        def on_conflict(rec: dict[str, Any], theirs: list[dict[str, Any]]):
            held = committed_prompts(log).get(params_hash, {})
            return None if mine & set(held) else rec

        since = log.last()
        if mine & set(committed_prompts(log).get(params_hash, {})):
            seq = -1
        else:
            seq = log.commit(record, on_conflict, since)
    except BaseException:
        fs.rm(directory, recursive=True)
        raise
    if seq < 0:
        fs.rm(directory, recursive=True)
        return None
    return ActivationShard({**record, "seq": seq})


def read_shard_table(lake: Lake, shard: ActivationShard, table: str,
                     layer: int | None = None) -> pa.Table:
    """One table of a committed shard (only ``layer``'s rows of the state, when given)."""
    path = lake.path(shard.file(table))
    try:
        with lake.fs.open(path, "rb") as f:
            data = pq.read_table(f, filters=None if layer is None else [("layer", "=", layer)])
    except FileNotFoundError:
        raise LakeError(f"{path}: missing, but the activation log commits shard "
                        f"{shard.shard}") from None
    except (OSError, pa.ArrowException) as e:
        raise LakeError(f"{path}: unreadable activation shard file: {e}") from e
    return conform(data, SPECS[table], origin=path)


def loose_shard_dirs(lake: Lake) -> list[str]:
    """Activation shard directories that no record commits (being written, or debris)."""
    fs = lake.fs
    out = []
    for d in sorted(p for p in fs.glob(lake.path(f"{layout.ACTIVATIONS}/model=*/corpus=*/shard=*"))
                    if fs.isdir(p)):
        p = layout.partition_values(d[len(lake.root):])
        if p["shard"] not in {s.shard for s in activation_shards(lake, p["model"], p["corpus"])}:
            out.append(d)
    return out
