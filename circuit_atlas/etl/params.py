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
    chunk: int = 4096
    """Shards folded per task, at most (the workers' memory limit bounds it too: a
    bucket of a 2 GB worker holds ~1.7M rows, all of 1,000 shards in one fold)."""
    fold_rows: int | None = None
    """Partial rows one fold task may hold (its bucket's state, and the shards it adds);
    default: from the workers' memory limit, ~900,000 per GiB."""
    params_hash: tuple[str, ...] = ()
    """Only the shards of this graph parameter set (repeatable; the hashes the refusal
    lists). Default: refuse a corpus whose shards were computed with several."""
    mixed_params: bool = False
    """Fold the shards of every graph parameter set together into one table set."""
