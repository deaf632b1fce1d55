"""compute: model loading, RelP attribution graphs, activation exemplars, projections,
weight-based wiring, effects and the causal battery (torch).

Writes graph and activation shards through :mod:`circuit_atlas.lake`; imports torch
only here.
"""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_graphs": "graphs",
    "run_activations": "activation_run",
    "run_negatives": "negatives",
    "NegativesParams": "params",
    "ActivationsParams": "params",
    "ActivationsReport": "activation_run",
    "run_projections": "projections",
    "run_wiring": "wiring",
    "WiringParams": "params",
    "WiringReport": "wiring",
    "run_effects": "effects",
    "run_interventions": "battery",
    "run_steer": "steer",
    "InterventionsParams": "params",
    "SteerParams": "params",
    "InterventionsReport": "battery",
    "GraphsParams": "params",
    "ProjectionsParams": "params",
    "EffectsParams": "params",
    "AttributionParams": "params",
    "GraphsReport": "graphs",
    "ProjectionsReport": "projections",
    "EffectsReport": "effects",
    "load_model": "models",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
