"""etl: Dask clusters (local, address, SLURM) and the reductions of the lake's graphs
into the ``edges`` and ``neurons`` tables."""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_reduce": "reduce",
    "ReduceParams": "params",
    "ReduceReport": "reduce",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
