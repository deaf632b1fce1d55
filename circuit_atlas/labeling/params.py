"""The labeling stages' parameters (the CLI's options): the LLM endpoint they share,
the labeling passes and the label scorers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuit_atlas.labeling.replies import DESCRIPTION


@dataclass(frozen=True)
class EndpointParams:
    """An OpenAI-compatible endpoint and how to talk to it."""

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
    price_in: float = 0.0
    """USD per million prompt tokens, for the cost printed at the end."""
    price_out: float = 0.0
    """USD per million completion tokens."""

    def llm_settings(self, **extra):
        """The client's settings (``extra``: the stage's own, e.g. batch)."""
        import os

        from circuit_atlas.labeling.client import LLMSettings

        return LLMSettings(model=self.llm, base_url=self.base_url or os.environ.get(
            "OPENAI_BASE_URL"), api_key_env=self.api_key_env, concurrency=self.concurrency,
            timeout=self.timeout, max_retries=self.max_retries, price_in=self.price_in,
            price_out=self.price_out, **extra)


@dataclass(frozen=True)
class LabelParams(EndpointParams):
    """The labeling passes and the LLM endpoint that answers them."""

    passes: tuple[Literal["output", "input", "negative"], ...] = ("output", "input",
                                                                  "negative")
    """Pass(es) to run, in this order: output (what a neuron does), input (what drives
    its activation up), negative (what drives it most negative; only neurons whose
    negative side is strong, see circuit_atlas.labeling.evidence.NEGATIVE_SHARE)."""
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
    """Only the N neurons of each layer in most graphs (with --order priority: of
    highest priority)."""
    order: Literal["graphs", "priority"] = "graphs"
    """Which neurons of a layer come first: in most graphs, or by priority (strength in
    the edge graph times one plus the neighbours still unlabelled: the labels that show
    in the most other prompts)."""
    name_clusters: bool = True
    """Name the clusters after the neuron passes, when a clustering exists."""
    cluster_method: Literal["infomap", "leiden"] = "infomap"
    """Clustering whose modules to name."""
    description_chars: int = DESCRIPTION
    """The longest description a reply may hold (the reply schema's limit; a small
    local model tends to write to it, and each character costs it a decode step)."""
    samples: int = 1
    """Best of N: ask N candidate labels per neuron (at --temperature, a seed each),
    score each on held-out contexts by --select-by (output labels: by the intervention
    check) and keep the best; the others are kept as status "candidate"."""
    select_by: Literal["detection", "fuzzing", "simulation"] = "detection"
    """The scorer that picks the best of --samples candidates of an input or negative
    label (the kept label's figure by it is optimistic: it was the best of N)."""
    temperature: float = 1.0
    """Sampling temperature of the candidates when --samples is above 1."""

    def __post_init__(self) -> None:
        from circuit_atlas.errors import CircuitAtlasError

        if self.samples < 1:
            raise CircuitAtlasError(f"--samples must be at least 1, got {self.samples}")
        if self.samples > 1 and self.batch:
            raise CircuitAtlasError("--samples above 1 scores every candidate before it "
                                    "keeps one, which the Batch API does not do yet: drop "
                                    "--batch or --samples")

    def best_of(self):
        """Best-of-N settings, or None for one label per neuron."""
        from circuit_atlas.labeling.run import BestOf

        if self.samples <= 1:
            return None
        return BestOf(self.samples, self.select_by, self.temperature)

    def settings(self):
        """The LLM settings, or None for a dry run."""
        if self.dry_run:
            return None
        return self.llm_settings(batch=self.batch, poll_s=self.poll,
                                 description_chars=self.description_chars)


@dataclass(frozen=True)
class ScoreParams(EndpointParams):
    """The label scorers and the LLM endpoint that plays the scorer."""

    scorers: tuple[Literal["detection", "fuzzing", "simulation", "intervention"], ...] = (
        "detection", "fuzzing", "simulation", "intervention")
    """Scorer(s) to run: detection, fuzzing and simulation score input, negative and
    prior labels (what activates a neuron; the negative pass's on its most negative
    contexts), intervention scores output labels (what its boost does,
    from the causal battery: circuit-atlas intervene)."""
    passes: tuple[Literal["input", "negative", "prior", "output"], ...] = (
        "input", "negative", "prior", "output")
    """Labels of these passes are scored."""
    labeler: str | None = None
    """Only the labels of this labeler (default: the newest label of each pass)."""
    layers: tuple[int, ...] = ()
    """Only this layer (repeatable; default: every layer)."""
    sim_contexts: int = 5
    """Activating and silent contexts each that the simulation scorer shows (its
    reply has a number per token: the costliest scorer)."""
    logprobs: bool = True
    """Ask for logprobs (expected values, AUC over probabilities); an endpoint that
    refuses them is asked without."""

    def settings(self):
        return self.llm_settings(logprobs=self.logprobs)


@dataclass(frozen=True)
class ServeParams:
    """The embedded OpenAI-compatible server."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port (0: any free one)."""
    max_batch: int = 8
    """Requests decoded together."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model precision; auto: bfloat16 where the device runs it fast, else float32."""
