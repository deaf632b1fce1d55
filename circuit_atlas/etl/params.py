"""The reduce's parameters, importable without Dask (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReduceParams:
    """The reduce of graph shards into the edges, neurons, neuron_corpora and
    neuron_tokens tables."""

    min_count: int = 1
    """Publish only edges seen at least this often (the original atlas used 3)."""
    top_k: int = 10
    """Token associations per neuron."""
    chunk: int = 64
    """Shards folded per task (bounds the memory of one task)."""
