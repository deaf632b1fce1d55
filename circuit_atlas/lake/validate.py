"""Checking data against the lake's schemas, with one-line errors.

Writers call :func:`conform` before anything touches the disk; readers call
:func:`check_file` on every file they hand out. Both raise :class:`LakeError`
whose message names the file (or the writer's origin) and what is wrong, never a
traceback from deep inside pyarrow.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas.errors import LakeError
from circuit_atlas.lake.schemas import META_TABLE, META_VERSION, TableSpec


class MissingFile(LakeError):
    """A file that a commit record names is not there."""


def _normal(t: pa.DataType) -> pa.DataType:
    """Large variants are the same column to us: polars writes large_string."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_normal(t.value_type))
    return t


def schema_problems(actual: pa.Schema, spec: TableSpec) -> list[str]:
    """What keeps ``actual`` from holding ``spec``'s table; empty when it fits."""
    problems = []
    meta = actual.metadata or {}
    table = meta.get(META_TABLE)
    if table is not None and table.decode() != spec.name:
        problems.append(f"holds table {table.decode()!r}, expected {spec.name!r}")
    version = meta.get(META_VERSION)
    if version is not None and version.decode() != str(spec.version):
        problems.append(
            f"has {spec.name} schema version {version.decode()}, "
            f"this circuit-atlas reads version {spec.version}"
        )
    for field in spec.fields:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif _normal(actual.field(idx).type) != _normal(field.type):
            problems.append(
                f"column {field.name!r} has type {actual.field(idx).type}, expected {field.type}"
            )
    return problems


def read_schema(path: str, filesystem=None) -> pa.Schema:
    """The schema in a Parquet file's footer, or a LakeError naming the file."""
    try:
        return pq.read_schema(path, filesystem=filesystem)
    except FileNotFoundError as e:
        raise MissingFile(f"{path}: missing: a commit record lists it, but it is not there "
                        "(removed by hand, or by a cleanup after its retention period)") from e
    except (pa.ArrowException, OSError) as e:
        raise LakeError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e


def check_file(path: str, spec: TableSpec, filesystem=None) -> pa.Schema:
    """Raise a one-line LakeError unless the Parquet file at ``path`` fits ``spec``."""
    actual = read_schema(path, filesystem)
    problems = schema_problems(actual, spec)
    if problems:
        raise LakeError(f"{path}: not a valid {spec.name} file: {'; '.join(problems)}")
    return actual


def conform(table: pa.Table, spec: TableSpec, origin: str) -> pa.Table:
    """``table`` with exactly ``spec``'s columns, order and types, ready to write.

    Integer and float columns are cast safely (an int64 layer of 40000 does not
    silently wrap to int16); extra columns are an error, so a typo cannot drop data.
    """
    names = set(table.column_names)
    expected = [f.name for f in spec.fields]
    missing = [n for n in expected if n not in names]
    extra = [n for n in table.column_names if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown column(s) {', '.join(extra)}")
        raise LakeError(f"{origin}: {spec.name} table has {'; '.join(parts)}")
    columns = []
    for field in spec.fields:
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            raise LakeError(
                f"{origin}: {spec.name} column {field.name!r} has {col.null_count} null value(s)"
            )
        if col.type != field.type:
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise LakeError(
                    f"{origin}: {spec.name} column {field.name!r} of type {col.type} "
                    f"does not fit {field.type}: {e}"
                ) from e
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=spec.schema)


def read_parquet(path: str, spec: TableSpec, filesystem=None, columns: list[str] | None = None
                 ) -> pa.Table:
    """The Parquet file at ``path``, checked against ``spec`` (some ``columns``), or a
    one-line LakeError naming the file."""
    check_file(path, spec, filesystem)
    try:
        return pq.read_table(path, columns=columns, filesystem=filesystem)
    except (pa.ArrowException, OSError) as e:
        raise LakeError(f"{path}: not a readable {spec.name} file (truncated or corrupt?): "
                        f"{e}") from e
