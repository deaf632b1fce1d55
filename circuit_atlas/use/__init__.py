"""use: the atlas for agents and people: the MCP server (mcp), the per-neuron report
pages (reports) and new prompts' graphs grouped by the atlas's clusters (supernodes).

Reads the lake only; imports no torch (a tokenizer, where one is at hand, names
tokens).
"""

from __future__ import annotations

from circuit_atlas.stage import lazy_exports

# the stage's public names, imported on first use (heavy dependencies load late)
_EXPORTS = {
    "run_reports": "reports",
    "ReportsParams": "params",
    "run_mcp": "mcp",
    "run_trace": "supernodes",
    "TraceParams": "params",
    "run_investigate": "investigate",
    "InvestigateParams": "params",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
