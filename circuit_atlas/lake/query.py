"""SQL over a lake: every table as a view, for polars SQL and for DuckDB, no copy.

Derived tables keep their names (``neurons``, ``edges``, ``clusters``, ...), with
``model`` and ``corpus`` columns; the per-graph tables are ``prompts``, ``graphs``,
``graph_nodes`` and ``graph_edges`` (``edges`` is the reduced table). The views are
over the files current when they are made: committed shards and published versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout
from circuit_atlas.lake.derived import table_files

if TYPE_CHECKING:
    import polars as pl

    from circuit_atlas.lake.lake import Lake

GRAPH_VIEWS = {"prompts": "prompts", "graphs": "graphs", "graph_nodes": "nodes",
               "graph_edges": "edges"}


def derived_names(lake: Lake) -> list[str]:
    return sorted({t for corpora in lake.derived_tables().values()
                   for tables in corpora.values() for t in tables})


def frames(lake: Lake) -> dict[str, pl.LazyFrame]:
    """Every table of the lake as a LazyFrame, by view name."""
    out = {name: lake.table(name) for name in derived_names(lake)}
    for view, table in GRAPH_VIEWS.items():
        out[view] = lake.scan(table)
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
    """A DuckDB connection with every table of the lake as a view over its files (or
    with ``views``, polars frames, registered instead)."""
    import duckdb

    con = duckdb.connect(database)
    if views is not None:
        for name, df in views.items():
            con.register(name, df.to_arrow())
        return con
    for name in derived_names(lake):
        parts = []
        pattern = lake.path(f"{layout.TABLES}/model=*/corpus=*/{name}/_MANIFEST.json")
        for manifest in sorted(lake.fs.glob(pattern)):
            p = layout.partition_values(manifest[len(lake.root):])
            files = table_files(lake, name, p["model"].replace("--", "/"), p["corpus"])
            if files:
                parts.append(f"SELECT *, {_lit(p['model'])} AS model, {_lit(p['corpus'])} AS "
                             f"corpus FROM read_parquet({_list(lake, files)})")
        if parts:
            con.execute(f'CREATE VIEW "{name}" AS ' + " UNION ALL BY NAME ".join(parts))
    for view, table in GRAPH_VIEWS.items():
        files = lake.files(table)
        if files:
            con.execute(f'CREATE VIEW "{view}" AS SELECT * FROM read_parquet('
                        f"{_list(lake, files)}, hive_partitioning = true)")
    return con


def _list(lake: Lake, files: list[str]) -> str:
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(lake.fs, LocalFileSystem):
        raise LakeError("DuckDB views need a local lake (this one is "
                        f"{lake.url}); use Lake.sql (polars) instead")
    return "[" + ", ".join(_lit(f) for f in files) + "]"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
