"""The parameters of the stages that present the atlas (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ReportsParams:
    """Which neurons get a report page, and where the pages go."""

    out: str = "reports"
    """Folder for the pages and index.html."""
    neurons: tuple[str, ...] = ()
    """A page for this neuron (L12/N345; repeatable)."""
    top: int = 0
    """Pages for the N neurons in the most graphs."""
    labelled: bool = True
    """Pages for every neuron with a label."""
    method: Literal["infomap", "leiden"] = "infomap"
    """The clustering whose module a page shows."""


@dataclass(frozen=True)
class TraceParams:
    """A new prompt's graph, grouped by the atlas's clusters."""

    level: int = 1
    """Group neurons by their cluster module at this level (1: the top modules)."""
    method: Literal["infomap", "leiden"] = "infomap"
    """The clustering that groups them."""
    traces: str = "traces"
    """Corpus the prompt is imported into (its graph is stored there, like any other)."""
    out: str | None = None
    """Graph JSON file to write (default: trace-<prompt id>.json)."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    """Model precision of the graph (auto: as circuit-atlas graphs chooses)."""
