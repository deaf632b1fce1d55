"""labeling: LLM labels of every neuron's output and input function, and names of the
clusters: evidence and templates (the prompts), replies (the schemas), client (one
bounded fan-out), batch (the Batch API), journal (resume), run (the passes' order),
label files (labels you have) and browse (a terminal view).

Talks to any OpenAI-compatible endpoint (``openai``)."""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_labels": "run",
    "LabelParams": "params",
    "run_label_scores": "scoring",
    "ScoreParams": "params",
    "LabelsReport": "run",
    "LLMSettings": "client",
    "label_lake": "run",
    "label_clusters": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
