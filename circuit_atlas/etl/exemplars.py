"""The merge of activation shards: per layer, every shard's exemplar state folded into
one (top k of the top k's, sums summed, histograms added), published as the
``activation_stats`` table, kept as state for the next run, and turned into the
exemplar index that the replay fills with each context's activations.

One task per layer, so a worker holds one layer's state and one shard's rows of it
at a time, however many shards the corpus has. A later run starts from the state of
the version it finds (when its parameters match) and merges only the shards
committed since: top k and histograms come out equal to a merge from scratch, sums
equal up to float rounding.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from circuit_atlas.compute.exemplars import (
    BIN_EDGES,
    QUANTILES,
    LayerState,
    merge,
    quantiles,
    state_from_table,
    state_table,
)
from circuit_atlas.errors import LakeError
from circuit_atlas.lake.activation_shards import ActivationShard, read_shard_table
from circuit_atlas.lake.derived import TableVersion
from circuit_atlas.lake.schemas import ACTIVATION_STATE, ACTIVATION_STATS
from circuit_atlas.lake.validate import conform

INDEX_SCHEMA = pa.schema([("layer", pa.int16()), ("neuron", pa.int32()), ("sign", pa.int8()),
                          ("rank", pa.int16()), ("activation", pa.float32()),
                          ("window_id", pa.int64()), ("position", pa.int32())])


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.parquet"


def merge_layer(lake, shards: list[ActivationShard], layer: int, base: str | None = None
                ) -> LayerState | None:
    """The state of ``layer`` over ``shards`` (and the state file ``base``, root-relative,
    when a run resumes from one); None with neither."""
    state = None
    if base is not None:
        path = lake.path(base)
        try:
            with lake.fs.open(path, "rb") as f:
                state = state_from_table(conform(pq.read_table(f), ACTIVATION_STATE, path))
        except (OSError, pa.ArrowException, ValueError) as e:
            raise LakeError(f"{path}: unreadable activation state: {e}") from e
    for shard in shards:
        rows = read_shard_table(lake, shard, "activation_state", layer)
        try:
            part = state_from_table(rows)
        except ValueError as e:
            raise LakeError(f"activation shard {shard.shard}, layer {layer}: {e}") from e
        state = part if state is None else merge(state, part)
    return state


def stats_table(layer: int, state: LayerState, corr: np.ndarray | None = None,
                corr_tokens: int = 0) -> pa.Table:
    """The activation_stats rows of a layer (``corr``: the rank correlation of each
    neuron's token means with its static input projection, over ``corr_tokens``)."""
    n = state.total.shape[0]
    count = max(state.count, 1)
    q = quantiles(state, QUANTILES)
    corr = np.full(n, np.nan) if corr is None else corr
    return pa.table({
        "layer": np.full(n, layer, np.int16), "neuron": np.arange(n, dtype=np.int32),
        "count": np.full(n, state.count, np.int64), "mean": state.mean(), "std": state.std(),
        "frac_positive": state.positive / count, "min": state.min, "max": state.max,
        "quantiles": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), len(QUANTILES)
                                                        ).cast(pa.list_(pa.float32())),
        "hist": state_table(layer, state).column("hist"),
        "static_rank_corr": pa.array(corr, pa.float64(), mask=~np.isfinite(corr)),
        "corr_tokens": np.full(n, corr_tokens, np.int32),
    })


def exemplar_index(layer: int, state: LayerState) -> pa.Table:
    """Every filled top and bottom slot of a layer: (layer, neuron, sign, rank,
    activation, window_id, position), without the contexts' activations, in the
    exemplars table's order (neuron, sign descending, rank)."""
    n, k = state.top_window.shape
    value = np.concatenate([state.top_value, state.bottom_value], axis=1)  # (n, 2k)
    window = np.concatenate([state.top_window, state.bottom_window], axis=1)
    pos = np.concatenate([state.top_pos, state.bottom_pos], axis=1)
    neuron, slot = np.nonzero(window >= 0)  # row-major: neuron, then top before bottom
    return pa.table({
        "layer": np.full(len(neuron), layer, np.int16), "neuron": neuron.astype(np.int32),
        "sign": np.where(slot < k, 1, -1).astype(np.int8),
        "rank": (slot % k).astype(np.int16), "activation": value[neuron, slot],
        "window_id": window[neuron, slot], "position": pos[neuron, slot]}, schema=INDEX_SCHEMA)


def merge_task(lake, version: TableVersion, shards: list[ActivationShard], layer: int,
               base: str | None) -> tuple[str, pa.Table, tuple[np.ndarray, np.ndarray]]:
    """A Dask task: merge one layer and write its state; returns (state file,
    exemplar index, the bounds of its quantile samples)."""
    from circuit_atlas.compute.samples import bounds

    state = merge_layer(lake, shards, layer, base)
    if state is None:
        raise LakeError(f"layer {layer}: no activation shards to merge")
    state_file = version.write_state(layer_file(layer), state_table(layer, state))
    return state_file, exemplar_index(layer, state), bounds(state)


def stats_task(lake, version: TableVersion, layer: int, state_file: str,
               corr: np.ndarray | None, corr_tokens: int) -> str:
    """A Dask task: a layer's activation_stats part, from its merged state."""
    state = merge_layer(lake, [], layer, state_file)
    return version.write(layer_file(layer), stats_table(layer, state, corr, corr_tokens),
                         ACTIVATION_STATS)


def bin_edges() -> list[float]:
    """The histogram's bin edges, as the activation_stats manifest records them."""
    return [float(e) for e in BIN_EDGES]
