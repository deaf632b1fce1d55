"""etl: Dask clusters (local, address, SLURM) and the reductions of the lake's graphs
into the ``edges`` and ``neurons`` tables."""
