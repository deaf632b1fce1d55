"""Neuron identity: ``(layer, neuron)`` in every table; ``L12/N345`` only for people.

One place parses and formats the display form and packs the pair into one int64
(for joins and sets): ``(layer + 1) << 32 | neuron``, so that embedding nodes
(layer -1) pack too; ``neuron`` must be ``0 <= neuron < 2**32`` (remainder nodes,
neuron -1, are never packed).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import polars as pl

from circuit_atlas.errors import CircuitAtlasError

_ID = re.compile(r"L?(-?\d+)[/:]N?(\d+)")


def parse_neuron(text: str) -> tuple[int, int]:
    """``L12/N345`` or ``12:345`` -> (12, 345)."""
    m = _ID.fullmatch(str(text).strip())
    if not m:
        raise CircuitAtlasError(f"{text!r}: write a neuron as L12/N345 or 12:345")
    return int(m[1]), int(m[2])


def neuron_label(layer: int, neuron: int) -> str:
    """(12, 345) -> ``L12/N345``."""
    return f"L{int(layer)}/N{int(neuron)}"


SHIFT = 1 << 32


def pack(layer, neuron):
    """One int64 per (layer, neuron): numpy arrays or scalars, or polars expressions."""
    if isinstance(layer, pl.Expr):
        return (layer.cast(pl.Int64) + 1) * SHIFT + neuron.cast(pl.Int64)
    return ((np.asarray(layer, np.int64) + 1) << 32) | np.asarray(neuron, np.int64)


def layer_of(key):
    """The layer of packed keys (arrays or a polars expression)."""
    if isinstance(key, pl.Expr):
        return key // SHIFT - 1
    return (np.asarray(key, np.int64) >> 32) - 1


def neuron_of(key):
    """The neuron number of packed keys (arrays or a polars expression)."""
    if isinstance(key, pl.Expr):
        return key % SHIFT
    return np.asarray(key, np.int64) & 0xFFFFFFFF


def unpack(key) -> tuple[np.ndarray, np.ndarray]:
    """The (layer, neuron) arrays of packed keys."""
    return layer_of(key), neuron_of(key)


class NodeNames:
    """Display names of nodes: neurons as L12/N345, token nodes decoded."""

    def __init__(self, tokenizer: Any, n_layers: int | None) -> None:
        self.tok, self.n_layers = tokenizer, n_layers  # any object with .decode(ids)

    def token(self, token_id: int) -> str:
        return repr(self.tok.decode([token_id])) if self.tok is not None else f"#{token_id}"

    def node(self, layer: int, index: int) -> str:
        if layer < 0:
            return f"emb {self.token(index)}"
        if self.n_layers is not None and layer >= self.n_layers:
            return f"logit {self.token(index)}"
        return neuron_label(layer, index)
