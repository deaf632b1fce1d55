"""circuit-atlas: a circuit atlas of an LLM's MLP neurons, built on a Parquet lake.

Heavy dependencies (torch, dask) are imported only by the stages that use them,
so ``import circuit_atlas`` and ``circuit-atlas --help`` stay fast.
"""

from circuit_atlas._version import __version__
from circuit_atlas.errors import CircuitAtlasError

__all__ = ["CircuitAtlasError", "Lake", "__version__", "open_lake"]


def open_lake(path, **storage_options):
    """The lake at ``path`` (a folder or fsspec URL; ``storage_options`` go to fsspec):
    ``open_lake("demo-lake").table("neurons").collect()``."""
    from circuit_atlas.lake import Lake

    return Lake(path, storage_options=storage_options or None)


def __getattr__(name: str):
    if name == "Lake":
        from circuit_atlas.lake import Lake

        return Lake
    raise AttributeError(f"module 'circuit_atlas' has no attribute {name!r}")
