"""The self-report stages' parameters (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass

from circuit_atlas.errors import CircuitAtlasError


@dataclass(frozen=True)
class ScanParams:
    """Which neurons are worth reporting, from the activation statistics."""

    threshold: float = 0.5
    """A token is active for a neuron where |activation| reaches this share of the
    neuron's largest |activation|; selectivity is the share of tokens that are not."""
    min_count: int = 100
    """Neurons measured on fewer tokens are left out."""
    top: int = 0
    """Candidates kept per corpus (0: every neuron, ranked)."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise CircuitAtlasError("--threshold must lie between 0 and 1")
        if self.min_count < 1 or self.top < 0:
            raise CircuitAtlasError("--min-count must be at least 1 and --top at least 0")
