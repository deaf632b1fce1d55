"""analysis: co-occurrence, domain specificity, neuron profiles, label prompts and
LLM labeling, from the lake's derived tables."""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_cooccurrence": "cooccurrence",
    "run_specificity": "specificity",
    "run_roles": "roles",
    "run_labels": "labeler",
    "CooccurrenceParams": "params",
    "SpecificityParams": "params",
    "RolesParams": "params",
    "LabelParams": "params",
    "CooccurrenceReport": "cooccurrence",
    "SpecificityReport": "specificity",
    "RolesReport": "roles",
    "LabelsReport": "labeler",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
