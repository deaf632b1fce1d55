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
