"""A commit log: numbered JSON records, each created exclusively, with checkpoints.

Every write that readers may see is one record in a log directory::

    _log/<area>/.../000000000042.json        record 42, created with mode "xb"
    _log/<area>/.../_checkpoint-000000000099.parquet   records 0..99 in one file

1. A committer lists the log, prepares its record for the next number and creates
   that file exclusively and whole (:func:`create_exclusive`). Two
   committers that race for one number: one wins, the other reads what won and
   asks its ``on_conflict`` whether its record still stands (a graph shard drops
   the graphs the winner already holds), then tries the next number. So records
   are totally ordered, never overwritten, and no lock is held.
2. Numbers have no gaps (a committer takes the number after the newest it saw), so
   a reader needs no listing: it reads the newest checkpoint (``_last_checkpoint``
   names it) and then records one number after another until one is missing. That
   is one small JSON, at most one Parquet file and ``CHECKPOINT_EVERY`` records,
   however long the log.
3. The committer of every ``CHECKPOINT_EVERY``-th record writes the checkpoint (to
   a temporary name, renamed into place), then ``_last_checkpoint``. A checkpoint or
   hint that is missing, stale or unreadable only costs time: the records are all
   still there (without a hint the reader lists the log once to find the newest
   checkpoint).

Records are immutable once created; what they describe (data files) is written
before the record, so a reader that sees a record finds its files. That makes them
safe to keep in memory: a process reads each record once, and afterwards only the
ones added since (after checking that the newest it holds is still the same, so a
log deleted and begun again at the same path is read afresh).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas.errors import LakeError

CHECKPOINT_EVERY = 100
_RECORD = re.compile(r"^(\d{12})\.json$")
_CHECKPOINT = re.compile(r"^_checkpoint-(\d{12})\.parquet$")
MAX_ATTEMPTS = 10_000  # a committer racing this many others in a row: something is wrong
LAST_CHECKPOINT = "_last_checkpoint"
# log -> (its records by number, {fold name: (records folded, value)})
_CACHE: OrderedDict[tuple, tuple[dict[int, dict[str, Any]], dict[str, Any]]] = OrderedDict()
_CACHED_LOGS = 256


def record_name(seq: int) -> str:
    return f"{seq:012d}.json"


def create_exclusive(fs, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``, or raise FileExistsError if it exists, such
    that no reader ever sees it partly written. On a local filesystem: a temporary
    file hard-linked into place (``link`` fails on an existing name, atomically);
    elsewhere the filesystem's exclusive create (``open(path, "xb")``)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return
    with fs.open(path, "xb") as f:
        f.write(data)


class CommitLog:
    """The log in directory ``path`` (an fsspec path) of filesystem ``fs``."""

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/")

    def _key(self) -> tuple:
        return (type(self.fs).__name__, getattr(self.fs, "_fs_token", id(self.fs)), self.path)

    def _checkpoints(self) -> list[int]:
        """Checkpoint numbers from a listing of the log, sorted; [] without a log."""
        self.fs.invalidate_cache(self.path)  # object stores cache listings: commits are new
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _CHECKPOINT.match(n)))

    def _read(self, seq: int) -> dict[str, Any] | None:
        """Record ``seq``, or None when there is none (yet)."""
        path = f"{self.path}/{record_name(seq)}"
        try:
            with self.fs.open(path, "rb") as f:
                record = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LakeError(f"{path}: unreadable commit record: {e}") from e
        if not isinstance(record, dict):
            raise LakeError(f"{path}: not a commit record")
        record["seq"] = seq
        return record

    def _read_checkpoint(self, seq: int) -> dict[int, dict[str, Any]] | None:
        path = f"{self.path}/_checkpoint-{seq:012d}.parquet"
        try:
            table = pq.read_table(path, filesystem=self.fs)
            return {int(s): {**json.loads(r), "seq": int(s)} for s, r in zip(
                table.column("seq").to_pylist(), table.column("record").to_pylist(),
                strict=True)}
        except (OSError, ValueError, pa.ArrowException):
            return None  # a checkpoint is a shortcut: the records are the truth

    def _from_checkpoint(self) -> dict[int, dict[str, Any]]:
        """The records of the newest readable checkpoint ({} if none)."""
        for cp in self._checkpoint_candidates():
            got = self._read_checkpoint(cp)
            if got is not None and sorted(got) == list(range(cp + 1)):
                return got
        return {}

    def _checkpoint_candidates(self) -> Iterator[int]:
        """The checkpoint ``_last_checkpoint`` names, then (only if that one does not
        serve) every checkpoint a listing finds, newest first."""
        try:
            with self.fs.open(f"{self.path}/{LAST_CHECKPOINT}", "rb") as f:
                yield int(json.loads(f.read())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        yield from reversed(self._checkpoints())

    def _entry(self) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
        """(every record by number, the folds over them): those this process holds if
        the newest of them is unchanged, else from the newest checkpoint; then each
        record after them."""
        key = self._key()
        known, folds = _CACHE.pop(key, ({}, {}))
        if known:
            newest = max(known)
            if self._read(newest) != known[newest]:
                known, folds = {}, {}
        if not known:
            known = self._from_checkpoint()
        seq = max(known) + 1 if known else 0
        while (record := self._read(seq)) is not None:
            known[seq] = record
            seq += 1
        if known:
            _CACHE[key] = (known, folds)
            while len(_CACHE) > _CACHED_LOGS:
                _CACHE.popitem(last=False)
        return known, folds

    def _all(self) -> dict[int, dict[str, Any]]:
        return self._entry()[0]

    def fold(self, name: str, init: Callable[[], Any], step: Callable[[Any, dict[str, Any]],
                                                                      None]) -> Any:
        """``init()`` updated by ``step(value, record)`` for every record, oldest first,
        kept in memory and brought up to date with the records added since, so that
        an index over a long log (the prompts it commits) costs only what is new. The
        value is shared: treat it as read-only."""
        known, folds = self._entry()
        done, value = folds.get(name, (0, None))
        if value is None:
            value = init()
        for seq in range(done, len(known)):
            step(value, known[seq])
        folds[name] = (len(known), value)
        return value

    def records(self, after: int = -1) -> list[dict[str, Any]]:
        """Every record numbered above ``after``, oldest first, each with its ``seq``."""
        known = self._all()  # numbered 0..n-1 without gaps
        return [dict(known[s]) for s in range(max(after + 1, 0), len(known))]

    def last(self) -> int:
        """The number of the newest record, -1 for an empty log."""
        return len(self._all()) - 1

    def commit(self, record: dict[str, Any],
               on_conflict: Callable[[dict[str, Any], list[dict[str, Any]]],
                                     dict[str, Any] | None] | None = None,
               since: int | None = None) -> int:
        """Append ``record`` as the next number; returns it. When others committed after
        record ``since`` (what the committer based its record on; default: the log as
        it is now), ``on_conflict(record, theirs)`` returns the record to commit
        instead (or None: commit nothing, return -1)."""
        self.fs.makedirs(self.path, exist_ok=True)
        seen = self.last() if since is None else since
        for _ in range(MAX_ATTEMPTS):
            seq = seen + 1
            path = f"{self.path}/{record_name(seq)}"
            data = json.dumps({k: v for k, v in record.items() if k != "seq"}, indent=1,
                              sort_keys=True, ensure_ascii=False).encode()
            try:
                create_exclusive(self.fs, path, data)
            except FileExistsError:
                theirs = self.records(after=seen)
                seen = max([seen, *(r["seq"] for r in theirs)])
                if on_conflict is not None:
                    record = on_conflict(record, theirs)
                    if record is None:
                        return -1
                continue
            if seq and (seq + 1) % CHECKPOINT_EVERY == 0:
                self._checkpoint(seq)
            return seq
        raise LakeError(f"{self.path}: could not commit after {MAX_ATTEMPTS} attempts")

    def _checkpoint(self, seq: int) -> None:
        records = [r for r in self.records() if r["seq"] <= seq]
        table = pa.table({"seq": [r["seq"] for r in records],
                          "record": [json.dumps({k: v for k, v in r.items() if k != "seq"},
                                                sort_keys=True) for r in records]})
        final = f"{self.path}/_checkpoint-{seq:012d}.parquet"
        tmp = f"{self.path}/._checkpoint-{seq:012d}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, final)
        hint = f"{self.path}/.{LAST_CHECKPOINT}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(hint, "wb") as f:
            f.write(json.dumps({"seq": seq}).encode())
        self.fs.mv(hint, f"{self.path}/{LAST_CHECKPOINT}")
