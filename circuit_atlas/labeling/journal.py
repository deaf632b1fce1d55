"""The journal: every answer recorded the moment it arrives, folded into its table.

Each answer is appended to a journal file of the run and fsync'd as it arrives; at the
end of each layer (and at the start of any run) the journals are folded into the
``labels`` table (cluster names: ``cluster_labels``). So killing a run at any instant
loses no answer that was recorded, and a rerun asks none of them again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import uuid
from typing import Any

import polars as pl

from circuit_atlas.lake import Lake, layout
from circuit_atlas.lake.derived import add_part
from circuit_atlas.lake.schemas import DERIVED


def journal_dir(lake: Lake, model: str, corpus: str, table: str = "labels") -> str:
    """Where the answers for ``table`` (labels, cluster_labels) wait to be folded."""
    return lake.path(f"{layout.LOG}/journal/{table}/model={layout.model_key(model)}/"
                     f"corpus={corpus}")


class Journal:
    """Every answer as it arrives, through the lake's filesystem.

    On a local filesystem: one JSONL file per run, each line fsync'd as it is written,
    so a kill loses no answer. Elsewhere (object stores cannot append): answers are
    written in parts of ``FLUSH_ROWS`` or every ``FLUSH_S`` seconds, each part a new
    file, so a kill loses at most the answers since the last part."""

    FLUSH_ROWS, FLUSH_S = 32, 10.0

    def __init__(self, lake: Lake, model: str, corpus: str, table: str = "labels") -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.dir = lake.fs, journal_dir(lake, model, corpus, table)
        self.fs.makedirs(self.dir, exist_ok=True)
        self.run = f"run-{uuid.uuid4().hex[:12]}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self._pending: list[str] = []
        self._parts, self._last = 0, time.monotonic()
        self._f = open(f"{self.dir}/{self.run}.jsonl", "a", encoding="utf-8") if (  # noqa: SIM115
            self.local) else None

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self._f is not None:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            return
        self._pending.append(line)
        if (len(self._pending) >= self.FLUSH_ROWS
                or time.monotonic() - self._last >= self.FLUSH_S):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            path = f"{self.dir}/{self.run}-{self._parts:06d}.jsonl"
            tmp = layout.tmp_name(path, uuid.uuid4().hex[:8])
            with self.fs.open(tmp, "wb") as f:
                f.write("".join(self._pending).encode("utf-8"))
            self.fs.mv(tmp, path)
            self._pending, self._parts = [], self._parts + 1
        self._last = time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        else:
            self._flush()


def read_jsonl(fs: Any, path: str) -> list[dict[str, Any]]:
    """The records of a JSONL journal file; a line cut by a kill is a record that was
    not written."""
    rows = []
    with fs.open(path, "rb") as f:
        for line in f.read().decode("utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def fold_journals(lake: Lake, model: str, corpus: str, table: str = "labels") -> int:
    """Move every journaled answer into ``table`` (one batch); rows moved."""
    fs, d = lake.fs, journal_dir(lake, model, corpus, table)
    if not fs.exists(d):
        return 0
    paths = sorted(p for p in fs.ls(d, detail=False) if p.endswith(".jsonl")
                   and layout.TMP_MARK not in p)
    rows = [row for p in paths for row in read_jsonl(fs, p)]
    if rows:
        spec = DERIVED[table]
        frame = pl.DataFrame(rows, schema=pl.from_arrow(spec.schema.empty_table()).schema)
        add_part(lake, model, corpus, table, f"batch-{uuid.uuid4().hex[:12]}.parquet",
                 frame.select(spec.schema.names).to_arrow(), {"model": model})
    for p in paths:
        fs.rm(p)
    return len(rows)


def label_row(layer: int, neuron: int, pass_: str, labeler: str, phash: str,
              parsed: dict[str, Any] | None, error: str | None, status: str | None = None
              ) -> dict[str, Any]:
    """A labels row; ``status`` default "ok" for a reply, "failed" without one (a
    best-of-N sample that was not kept: "candidate")."""
    return {"layer": layer, "neuron": neuron, "pass": pass_,
            "label": parsed["label"] if parsed else None,
            "description": parsed["description"] if parsed else None,
            "type": parsed["type"] if parsed else None,
            "interpretability": parsed["interpretability"] if parsed else None,
            "labeler": labeler, "prompt_hash": phash,
            "status": status or ("ok" if parsed else "failed"),
            "error": error, "created_at": dt.datetime.now(dt.UTC).isoformat(
                timespec="microseconds")}
