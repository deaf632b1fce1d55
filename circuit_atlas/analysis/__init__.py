"""analysis: co-occurrence, domain specificity, circuit roles and neuron profiles, from
the lake's derived tables."""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_cooccurrence": "cooccurrence",
    "run_specificity": "specificity",
    "run_roles": "roles",
    "CooccurrenceParams": "params",
    "SpecificityParams": "params",
    "RolesParams": "params",
    "CooccurrenceReport": "cooccurrence",
    "SpecificityReport": "specificity",
    "RolesReport": "roles",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
