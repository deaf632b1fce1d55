"""The labeling stage's parameters (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LabelParams:
    """The labeling passes and the LLM endpoint that answers them."""

    passes: tuple[Literal["output", "input"], ...] = ("output", "input")
    """Pass(es) to run, in this order."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM); default: the
    OPENAI_BASE_URL variable, else OpenAI."""
    llm: str = "gpt-5-mini"
    """Model name at the endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key."""
    concurrency: int = 8
    """Requests in flight."""
    timeout: float = 60.0
    """Seconds per request."""
    max_retries: int = 5
    """Retries with exponential backoff on 429, 5xx and timeouts."""
    batch: bool = False
    """Use the Batch API (a batch per layer, half the price)."""
    poll: float = 30.0
    """Batch polling interval, seconds."""
    dry_run: bool = False
    """No LLM: write every assembled prompt to the label_prompts table."""
    only_failed: bool = False
    """Ask again only where a reply failed."""
    layers: tuple[int, ...] = ()
    """Only this layer (repeatable; default: every layer)."""
    per_layer: int | None = None
    """Only the N neurons of each layer in most graphs."""
    price_in: float = 0.0
    """USD per million prompt tokens, for the cost printed at the end."""
    price_out: float = 0.0
    """USD per million completion tokens."""
    name_clusters: bool = True
    """Name the clusters after the neuron passes, when a clustering exists."""
    cluster_method: Literal["infomap", "leiden"] = "infomap"
    """Clustering whose modules to name."""

    def settings(self):
        """The LLM settings, or None for a dry run."""
        import os

        from circuit_atlas.labeling.client import LLMSettings

        if self.dry_run:
            return None
        return LLMSettings(model=self.llm, base_url=self.base_url or os.environ.get(
            "OPENAI_BASE_URL"), api_key_env=self.api_key_env, concurrency=self.concurrency,
            timeout=self.timeout, max_retries=self.max_retries, price_in=self.price_in,
            price_out=self.price_out, batch=self.batch, poll_s=self.poll)
