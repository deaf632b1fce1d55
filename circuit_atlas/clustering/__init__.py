"""clustering: network build from the edges table, Infomap and Leiden, cluster tables
and exports."""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_clustering": "run",
    "ClusteringParams": "params",
    "ClusteringReport": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
