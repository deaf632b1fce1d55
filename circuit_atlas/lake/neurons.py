"""Neuron identity: ``(layer, neuron)`` in every table; ``L12/N345`` only for people.

One place parses and formats the display form and packs the pair into one int64
(for joins and sets): ``(layer + 1) << 32 | neuron``, so that embedding nodes
(layer -1) pack too; ``neuron`` must be ``0 <= neuron < 2**32`` (remainder nodes,
neuron -1, are never packed).
"""

from __future__ import annotations

import re

import numpy as np

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


def pack(layer, neuron) -> np.ndarray:
    """One int64 per (layer, neuron), arrays or scalars."""
    return ((np.asarray(layer, np.int64) + 1) << 32) | np.asarray(neuron, np.int64)


def unpack(key) -> tuple[np.ndarray, np.ndarray]:
    """The (layer, neuron) arrays of packed keys."""
    key = np.asarray(key, np.int64)
    return (key >> 32) - 1, key & 0xFFFFFFFF
