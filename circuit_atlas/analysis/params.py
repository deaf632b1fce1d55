"""The analysis stages' parameters (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CooccurrenceParams:
    """Neurons that appear in the same graphs."""

    k: int = 20
    """Co-occurring neurons kept per neuron."""
    min_count: int = 2
    """Keep pairs found together in at least this many graphs."""
    max_share: float = 0.5
    """Neurons in more than this share of the graphs are hubs, left out."""
    rank_by: Literal["jaccard", "npmi", "joint_count"] = "jaccard"
    """The order of the top k."""


@dataclass(frozen=True)
class SpecificityParams:
    """Domain specificity from a joint reduce of a domain and a baseline corpus."""

    domain: str = ""
    """The domain corpus (e.g. medical)."""
    baseline: str = ""
    """The baseline corpus (e.g. general)."""


@dataclass(frozen=True)
class RolesParams:
    """The rules of the circuit roles (see ``analysis.roles``)."""

    share: float = 0.5
    """Share of a neuron's links to logits (or from embeddings) that makes it an
    output formatter (or a feature detector)."""
    negative: float = 0.6
    """Share of negative outgoing weight that makes an inhibitor."""
    fan_in: float = 3.0
    """Sources per target that make an integrator."""
    min_sources: int = 5
    """An integrator has at least this many sources."""

