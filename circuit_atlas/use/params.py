"""The parameters of the stages that present the atlas (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuit_atlas.labeling.params import EndpointParams


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
    html: bool = True
    """Also write the supernode graph as a self-contained HTML view beside it (.html)."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    """Model precision of the graph (auto: as circuit-atlas graphs chooses)."""


@dataclass(frozen=True)
class InvestigateParams(EndpointParams):
    """The agent that investigates a neuron, the endpoint it runs on, and its budgets."""

    max_tool_calls: int = 40
    """Tool calls in all (the investigation stops with status budget after them)."""
    max_tokens: int = 200_000
    """Prompt and completion tokens in all."""
    max_seconds: float = 900.0
    """Wall time in all, seconds (a resumed investigation counts its earlier time)."""
    model_calls: int = 20
    """Runs of the model (activations of new prompts, intervene, steer; 0: none)."""
    temperature: float = 0.0
    """Sampling temperature of the agent."""
    again: bool = False
    """Start a new investigation even when the neuron already has a verdict."""

    def __post_init__(self) -> None:
        from circuit_atlas.errors import CircuitAtlasError

        if self.max_tool_calls < 1 or self.max_tokens < 1 or self.max_seconds <= 0:
            raise CircuitAtlasError("the budgets (--max-tool-calls, --max-tokens, "
                                    "--max-seconds) must be positive")
        if self.model_calls < 0:
            raise CircuitAtlasError("--model-calls must be 0 or more")
