"""What ``lake cleanup`` removes, and what it must leave.

Removed:

1. shards no record commits: files of a writer that was killed, or that died before
   its record (its ``_log/writing`` marker says who wrote it); activation shards
   (which have no marker) once nothing in them changed for ``min_age_s``;
2. versions of derived tables that no record names (a run killed before it
   published), with their state;
3. versions whose retention ran out: superseded for longer than the lake's retention
   period (``_lake.json``: ``retention_seconds``, default 7 days), with their state;
4. scratch data of jobs and temporary files that no live writer owns.

Debris goes at once when its writer ran on this host and is dead; otherwise when
nothing in it changed for ``min_age_s`` seconds, since a writer on another node may
still be busy. Committed shards and retained versions are never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from circuit_atlas.lake import layout

if TYPE_CHECKING:
    from circuit_atlas.lake.lake import Lake

DAY = 86_400.0


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


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


def _age(fs, paths: list[str], now: float) -> float:
    """Seconds since anything in ``paths`` (files or directories) last changed."""
    times = []
    for path in paths:
        if not fs.exists(path):
            continue
        entries = fs.find(path, withdirs=True, detail=True) if fs.isdir(path) else {}
        times += [t for t in (_mtime(i) for i in [fs.info(path), *entries.values()])
                  if t is not None]
    return now - max(times) if times else float("inf")


def _read_marker(fs, marker: str) -> dict[str, Any] | None:
    """The writer marker, or its temporary copy: a writer killed between writing the
    marker and renaming it into place leaves only that."""
    tmps = sorted(fs.glob(layout.tmp_name(marker, "*")))
    for path in [marker, *tmps]:
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            continue
    for path in tmps:  # cut short by a kill: its name still says who wrote it
        host, _, pid = path.rsplit(layout.TMP_MARK, 1)[-1].rpartition("-")
        if host and pid.isdigit():
            return {"host": host, "pid": int(pid)}
    return None


def writer_alive(info: dict[str, Any] | None) -> bool | None:
    """True/False when the writer ran on this host and we can tell; None otherwise."""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return None
    return True


def _stamp(record: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(record["published_at"]).timestamp()


def _version_dirs(record: dict[str, Any]) -> set[str]:
    return {record["version"], *(f.split("/", 1)[0] for f in record["files"])}


def _state_dirs(record: dict[str, Any]) -> set[str]:
    """The state directories (root-relative) a record's inputs name."""
    return {p.rsplit("/", 1)[0] for p in record.get("inputs", {}).get("state", [])
            if p.startswith(layout.STATE + "/")}


def version_lifetimes(lake: Lake, model_key: str, corpus: str, table: str,
                      now: float | None = None) -> tuple[set[str], set[str], set[str]]:
    """(retained version dirs, expired version dirs, retained state dirs) of a table."""
    from circuit_atlas.lake.derived import table_records

    now = time.time() if now is None else now
    records = table_records(lake, model_key, corpus, table)
    keep, gone, states = set(), set(), set()
    for i, record in enumerate(records):
        later = records[i + 1] if i + 1 < len(records) else None
        if later is None or now - _stamp(later) < lake.retention_s:
            keep |= _version_dirs(record)
            states |= _state_dirs(record)
        else:
            gone |= _version_dirs(record)
    return keep, gone - keep, states


def remove_expired_versions(lake: Lake, model_key: str, corpus: str, table: str,
                            now: float | None = None, dry_run: bool = False) -> list[str]:
    """Remove the versions of one table (and their state) whose retention ran out."""
    _, gone, _ = version_lifetimes(lake, model_key, corpus, table, now)
    fs = lake.fs
    base = lake.path(layout.table_dir(model_key, corpus, table))
    state_base = lake.path(layout.state_dir(model_key, corpus, table))
    removed = []
    for v in sorted(gone):
        for path in (f"{base}/{v}", f"{state_base}/{v}"):
            if fs.exists(path):
                removed.append(path)
                if not dry_run:
                    fs.rm(path, recursive=True)
    return removed


def _shard_debris(lake: Lake) -> list[tuple[list[str], dict[str, Any] | None, bool]]:
    """Per shard that left files or a writer marker but is not committed: (its shard
    directories and marker files, what the marker says, False); and (marker files,
    None, True) for committed shards whose writer died before removing its marker."""
    from circuit_atlas.lake.shards import list_shards

    fs = lake.fs
    committed = {(s.model, s.corpus, s.shard) for s in list_shards(lake)}
    loose: dict[tuple[str, str, str], list[str]] = {}
    for table in layout.GRAPH_TABLES:
        for d in _dirs(fs, lake.path(f"{table}/model=*/corpus=*/shard=*")):
            p = layout.partition_values(d[len(lake.root):])
            key = (p["model"], p["corpus"], p["shard"])
            if key not in committed:
                loose.setdefault(key, []).append(d)
    markers: dict[str, list[str]] = {}
    for path in fs.glob(lake.path(f"{layout.LOG}/writing/*")):
        shard = path.rsplit("/", 1)[-1].split(".json", 1)[0].lstrip(".")
        markers.setdefault(shard, []).append(path)
    out = []
    for shard, paths in sorted(markers.items()):
        info = _read_marker(fs, lake.path(layout.writing_marker(shard)))
        key = (info or {}).get("model_key"), (info or {}).get("corpus"), shard
        if key in committed:
            out.append((paths, None, True))
            continue
        dirs = loose.pop(key, []) if info else []
        out.append((dirs + paths, info, False))
    out += [(dirs, None, False) for _, dirs in sorted(loose.items())]
    return out


def uncommitted_shards(lake: Lake) -> list[str]:
    """Shards being written, or debris: the first of each one's paths."""
    return [paths[0] for paths, _, committed in _shard_debris(lake) if not committed]


def _dirs(fs, pattern: str) -> list[str]:
    return sorted(p for p in fs.glob(pattern) if fs.isdir(p))


def cleanup(lake: Lake, min_age_s: float = 3600.0, dry_run: bool = False,
            _now_s: float | None = None) -> CleanupReport:
    """Remove debris and expired versions (see the module docstring)."""
    fs = lake.fs
    now = time.time() if _now_s is None else _now_s
    report = CleanupReport()

    def judge(paths: list[str], what: str, info: dict[str, Any] | None = None) -> None:
        alive = writer_alive(info)
        if alive is False or (not (alive and min_age_s > 0)
                              and _age(fs, paths, now) >= min_age_s):
            report.removed.append(what)
            if not dry_run:
                for p in paths:
                    if fs.exists(p):
                        fs.rm(p, recursive=True)
        else:
            report.in_progress.append(what)

    # 1. shards that no record commits
    for paths, info, committed in _shard_debris(lake):
        if committed:  # killed after its record, before removing the marker
            if not dry_run:
                for p in paths:
                    fs.rm(p)
            continue
        judge(paths, paths[0], info)

    # 1b. activation shards that no record commits
    from circuit_atlas.lake.activation_shards import loose_shard_dirs

    for d in loose_shard_dirs(lake):
        judge([d], d)

    # 2 and 3. derived tables: unpublished versions by age, expired ones by retention
    for table_dir in _dirs(fs, lake.path(f"{layout.TABLES}/model=*/corpus=*/*")):
        p = layout.partition_values(table_dir[len(lake.root):])
        table = table_dir.rsplit("/", 1)[-1]
        keep, gone, _ = version_lifetimes(lake, p["model"], p["corpus"], table, now)
        named = keep | gone
        for v in _dirs(fs, f"{table_dir}/v-*"):
            name = v.rsplit("/", 1)[-1]
            state = lake.path(f"{layout.state_dir(p['model'], p['corpus'], table)}/{name}")
            if name in gone:
                report.expired.append(v)
                if not dry_run:
                    for path in (v, state):
                        if fs.exists(path):
                            fs.rm(path, recursive=True)
            elif name not in named:
                judge([v, state], v)
    for state in _dirs(fs, lake.path(f"{layout.STATE}/model=*/corpus=*/*/v-*")):
        rel = state[len(lake.root) + 1:]
        table_dir = lake.path(layout.TABLES + rel[len(layout.STATE):]).rsplit("/", 1)[0]
        if not fs.exists(f"{table_dir}/{state.rsplit('/', 1)[-1]}"):
            judge([state], state)  # its version is gone or was never written

    # 4. scratch of jobs, and temporary files
    for scratch in _dirs(fs, lake.path(f"{layout.SCRATCH}/**/v-*")):
        judge([scratch], scratch)
    handled = tuple(f"{d}/" for d in report.removed + report.in_progress)
    for area in (layout.PROMPTS, *layout.GRAPH_TABLES, layout.ACTIVATIONS, layout.TABLES,
                 layout.LOG):
        base = lake.path(area)
        if not fs.exists(base):
            continue
        for path, info in fs.find(base, detail=True).items():
            if layout.TMP_MARK not in path.rsplit("/", 1)[-1] or path.startswith(handled):
                continue
            if path in report.removed or (area == layout.LOG and "/writing/" in path):
                continue
            if now - (_mtime(info) or 0.0) >= min_age_s:
                report.removed.append(path)
                if not dry_run:
                    fs.rm(path)
    return report
