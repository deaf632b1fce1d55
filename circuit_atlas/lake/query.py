"""SQL over a lake: every table as a view, for polars SQL and for DuckDB, no copy.

Derived tables keep their names (``neurons``, ``edges``, ``clusters``, ...), with
``model`` and ``corpus`` columns; the per-graph tables are ``prompts``, ``graphs``,
``graph_nodes`` and ``graph_edges`` (``edges`` is the reduced table). The views are
over the snapshot current when they are made: committed shards and published versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from circuit_atlas.errors import LakeError
from circuit_atlas.lake.derived import table_files, table_logs

if TYPE_CHECKING:
    import polars as pl

    from circuit_atlas.lake.lake import Lake

GRAPH_VIEWS = ("prompts", "graphs", "graph_nodes", "graph_edges")


def derived_names(lake: Lake) -> list[str]:
    return sorted({t for corpora in lake.derived_tables().values()
                   for tables in corpora.values() for t in tables})


def frames(lake: Lake) -> dict[str, pl.LazyFrame]:
    """Every table of the lake as a LazyFrame, by view name."""
    out = {name: lake.table(name) for name in derived_names(lake)}
    for view in GRAPH_VIEWS:
        out[view] = lake.scan(view)
    return out


def sql(lake: Lake, query: str, views: dict[str, pl.LazyFrame | pl.DataFrame] | None = None
        ) -> pl.DataFrame:
    """Run ``query`` (polars SQL) over every table (or over ``views`` instead); errors
    are one line."""
    import polars as pl

    ctx = pl.SQLContext(views if views is not None else frames(lake), eager=False)
    try:
        return ctx.execute(query).collect()
    except (pl.exceptions.PolarsError, ValueError) as e:
        raise LakeError(f"SQL: {_first_line(e)}") from e


def duckdb_connection(lake: Lake, database: str = ":memory:",
                      views: dict[str, pl.DataFrame] | None = None) -> Any:
    """A DuckDB connection with every table of the lake as a view over the files of its
    snapshot (or with ``views``, polars frames, registered instead)."""
    import duckdb
    from fsspec.implementations.local import LocalFileSystem

    con = duckdb.connect(database)
    if not isinstance(lake.fs, LocalFileSystem):
        con.register_filesystem(lake.fs)
    if views is not None:
        for name, df in views.items():
            con.register(name, df.to_arrow())
        return con
    for name in derived_names(lake):
        parts = []
        for key, corpus in table_logs(lake, name):
            files = table_files(lake, name, key, corpus)
            if files:
                # the partition columns from the log, not from DuckDB's reading of
                # the path (which would add them a second time)
                parts.append(f"SELECT *, {_lit(key)} AS model, {_lit(corpus)} AS "
                             f"corpus FROM read_parquet({_list(lake, files)}, "
                             "hive_partitioning = false)")
        if parts:
            con.execute(f'CREATE VIEW "{name}" AS ' + " UNION ALL BY NAME ".join(parts))
    for view in GRAPH_VIEWS:
        parts = lake._files_and_repeats(view, None, None)
        clean = [f for f, r in parts if not r]
        selects = [f"SELECT * FROM read_parquet({_list(lake, clean)}, hive_partitioning = true)"
                   ] if clean else []
        selects += [f"SELECT * FROM read_parquet({_list(lake, [f])}, hive_partitioning = true) "
                    f"WHERE graph_id NOT IN ({', '.join(map(str, r))})" for f, r in parts if r]
        if selects:
            con.execute(f'CREATE VIEW "{view}" AS ' + " UNION ALL BY NAME ".join(selects))
    return con


def _list(lake: Lake, files: list[str]) -> str:
    """A DuckDB list literal of ``files``: local paths, or URLs of the lake's fsspec
    filesystem (registered with the connection)."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(lake.fs, LocalFileSystem):
        files = [lake.fs.unstrip_protocol(f) for f in files]
    return "[" + ", ".join(_lit(f) for f in files) + "]"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
