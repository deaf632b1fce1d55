"""The parameters of the compute stages, importable without torch (the CLI builds
its options from them at ``--help`` time).

:class:`AttributionParams` and :class:`ProjectionParams` decide what a graph or a
projection is (they are hashed or recorded with it); :class:`GraphsParams`,
:class:`ProjectionsParams` and :class:`EffectsParams` add how a run goes (device,
batching, limits), which does not change the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from circuit_atlas.errors import CircuitAtlasError

AUTO = "auto"
MAX_TOKENS = 256
PROMPT_BATCH = 8


@dataclass(frozen=True)
class AttributionParams:
    """How graphs are computed; saved with every shard (they decide graph identity)."""

    max_logits: int = 10
    """At most this many logit targets."""
    logit_prob: float = 0.95
    """Add logit targets until their probabilities sum to this."""
    candidates: int = 500
    """Neurons kept as graph nodes: the top ones by |relevance|."""
    last_positions: int | None = None
    """Only take candidates from the last K positions (default: all positions)."""
    prune: bool = True
    """Prune by influence (--no-prune keeps the complete graph)."""
    node_threshold: float = 0.8
    """Keep the nodes that carry this share of the influence on the logits."""
    edge_threshold: float = 0.98
    """Keep the edges that carry this share of the influence."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(AttributionParams)}

    def attribution(self) -> AttributionParams:
        """Only the fields that decide a graph (a GraphsParams has more)."""
        return AttributionParams(**self.to_dict())


@dataclass(frozen=True)
class GraphsParams(AttributionParams):
    """The graph stage: the attribution parameters and how the run goes."""

    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = AUTO
    """Model and attribution precision; auto: bfloat16 where the device runs it fast
    (measured once per process), else float32."""
    max_tokens: int = MAX_TOKENS
    """Truncate prompts to this many tokens."""
    shard_size: int = 32
    """Graphs per committed shard."""
    batch_rows: int = 256
    """Targets replayed together in one batch (memory vs. speed)."""
    prompt_batch: int = PROMPT_BATCH
    """Prompts sharing one forward and relevance backward (memory vs. speed)."""
    limit: int | None = None
    """Only the first N prompts of each corpus (by id)."""


@dataclass(frozen=True)
class ProjectionParams:
    """What a projections table is; recorded in its manifest."""

    k: int = 20
    """Tokens per neuron, kind and sign."""
    norm: bool = True
    """Include the final and MLP norm weights (--no-norm: the raw W_U @ W_down
    product of the original atlas scripts)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32", "float64"] = AUTO
    """Precision of the candidate search (candidates are re-scored in float32); auto:
    bfloat16 where the device runs it fast, else float32."""
    margin: int = 12
    """Extra candidates per sign re-scored exactly."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.margin < 0:
            raise CircuitAtlasError(f"k must be >= 1 and margin >= 0, got {self.k}, {self.margin}")
        if self.dtype not in (AUTO, "bfloat16", "float16", "float32", "float64"):
            raise CircuitAtlasError(f"unknown projection dtype {self.dtype!r}")

    def projection(self) -> ProjectionParams:
        return ProjectionParams(**{f.name: getattr(self, f.name)
                                   for f in fields(ProjectionParams)})

    def resolved(self, device: str, warn=None) -> ProjectionParams:
        """These parameters with ``auto`` replaced by the search dtype for ``device``."""
        from circuit_atlas.compute.precision import resolve_dtype

        return replace(self, dtype=resolve_dtype(self.dtype, device, "projections", warn))

    def to_dict(self) -> dict:
        return asdict(self.projection())


@dataclass(frozen=True)
class ProjectionsParams(ProjectionParams):
    """The projections stage: what the table is, and where it runs."""

    device: str = "cpu"
    """torch device, e.g. cuda."""
    layers: tuple[int, ...] = ()
    """Only these layers (repeatable; default: every layer)."""


@dataclass
class EffectsParams:
    """The effects stage."""

    neurons: tuple[str, ...] = ()
    """Evaluate this neuron (L12/N345 or 12:345) on every prompt (repeatable); default:
    each graph's neurons on its own prompt."""
    limit: int | None = None
    """Only the first N prompts (by id)."""
    batch: int = 256
    """Neurons rerun together from the cached residual."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64"] = AUTO
    """Model precision; auto: float32 on every device (effects are differences of
    logits, which bfloat16 rounds away)."""


PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)  # activation_stats.quantiles


@dataclass(frozen=True)
class InterventionsParams:
    """The causal battery: which units, which interventions, on which prompts."""

    neurons: tuple[str, ...] = ()
    """Intervene on this neuron (L12/N345; repeatable)."""
    modules: tuple[str, ...] = ()
    """Intervene on this cluster module as a whole, by path (4, 4:2; repeatable)."""
    method: Literal["infomap", "leiden"] = "infomap"
    """The clustering whose modules --module names."""
    top: int = 0
    """Also the N neurons that appear in the most graphs."""
    label: str | None = None
    """Also every neuron whose current label contains this text (case-insensitive)."""
    ablate: Literal["mean", "zero", "none"] = "mean"
    """Ablation, for necessity: each neuron set to its mean activation over the corpus
    (the activation statistics), or to 0."""
    boost: float = 4.0
    """Boost, for sufficiency and specificity: activations multiplied by this (0: none)."""
    boost_quantile: int | None = None
    """Boost by setting each neuron to this percentile of its activations over the
    corpus instead (1, 5, 10, 25, 50, 75, 90, 95, 99; 100: its maximum)."""
    patch: bool = True
    """Also patch every unit from the prompt's counterfactual, where its prompt record
    has one ("counterfactual" field, the same number of tokens)."""
    positions: Literal["all", "last"] = "all"
    """Intervene at every position of the prompt, or at its last only."""
    limit: int | None = None
    """Only the first N prompts (by id)."""
    batch: int = 64
    """Interventions run together in one pass."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64"] = AUTO
    """Model precision; auto: float32 on every device (differences of logits)."""

    def __post_init__(self) -> None:
        if self.boost < 0 or self.batch < 1:
            raise CircuitAtlasError(f"need boost >= 0 and batch >= 1, got {self.boost}, "
                                    f"{self.batch}")
        if self.boost_quantile is not None and self.boost_quantile not in (*PERCENTILES, 100):
            raise CircuitAtlasError(f"boost_quantile must be one of "
                                    f"{', '.join(map(str, PERCENTILES))} or 100, got "
                                    f"{self.boost_quantile}")


@dataclass(frozen=True)
class SteerParams:
    """Steering: which unit, held how, for how many tokens."""

    neurons: tuple[str, ...] = ()
    """Steer with this neuron (L12/N345; repeat for several together)."""
    modules: tuple[str, ...] = ()
    """Or with this cluster module as a whole, by path (4, 4:2)."""
    method: Literal["infomap", "leiden"] = "infomap"
    """The clustering whose modules --module names."""
    scale: float = 4.0
    """Multiply the activations by this."""
    value: float | None = None
    """Hold them at this activation instead (0: ablate)."""
    quantile: int | None = None
    """Hold each at this percentile of its activations over the corpus instead
    (1, 5, ..., 99; 100: its maximum)."""
    ablate: Literal["none", "mean", "zero"] = "none"
    """Ablate instead: to the mean activation over the corpus, or to 0."""
    max_new_tokens: int = 24
    """Tokens to generate, greedily."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64"] = AUTO
    """Model precision; auto: float32 on every device."""

    def __post_init__(self) -> None:
        chosen = [n for n, v in (("--value", self.value), ("--quantile", self.quantile),
                                 ("--ablate", None if self.ablate == "none" else 1))
                  if v is not None]
        if len(chosen) > 1:
            raise CircuitAtlasError(f"choose one of {', '.join(chosen)}")
        if self.quantile is not None and self.quantile not in (*PERCENTILES, 100):
            raise CircuitAtlasError(f"quantile must be one of "
                                    f"{', '.join(map(str, PERCENTILES))} or 100")
        if self.max_new_tokens < 1:
            raise CircuitAtlasError("max_new_tokens must be >= 1")


@dataclass(frozen=True)
class ActivationsParams:
    """The activations stage: every neuron's exemplars and activation statistics."""

    k: int = 20
    """Top and bottom contexts kept per neuron (each sign)."""
    context: int = 64
    """Window length in tokens: longer texts are cut into windows."""
    stride: int | None = None
    """Tokens between window starts (default: --context, windows do not overlap;
    where they do, each position counts once)."""
    skip_first: int = 1
    """Positions at the start of each text that are not counted: a text's first token
    carries outsized activations in most models (the attention sink), which would
    otherwise top many neurons' exemplars."""
    max_tokens: int | None = None
    """Token budget: texts (by id) until their tokens reach it (default: all)."""
    limit: int | None = None
    """Only the first N texts of each corpus (by id)."""
    sample_tokens: int = 16384
    """Tokens of the random subset of windows that the quantile samples and the
    per-token means are drawn from."""
    shard_tokens: int = 32768
    """Tokens per committed shard (one Dask task each)."""
    batch_tokens: int = 4096
    """Tokens per forward batch (memory vs. speed)."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = AUTO
    """Model precision; auto: bfloat16 where the device runs it fast, else float32."""

    def __post_init__(self) -> None:
        stride = self.context if self.stride is None else self.stride
        if self.k < 1 or self.context < 1 or not 1 <= stride <= self.context:
            raise CircuitAtlasError(
                f"need k >= 1 and 1 <= stride <= context, got k {self.k}, context "
                f"{self.context}, stride {stride}")
        if not 0 <= self.skip_first < self.context:
            raise CircuitAtlasError(f"need 0 <= skip_first < context, got {self.skip_first}")
        if min(self.shard_tokens, self.batch_tokens) < 1:
            raise CircuitAtlasError("--shard-tokens and --batch-tokens must be at least 1")

    @property
    def window_stride(self) -> int:
        return self.context if self.stride is None else self.stride


@dataclass(frozen=True)
class NegativesParams:
    """Negatives for label scoring: held-out contexts on which a neuron stays silent,
    hard (they activate its partners) and random."""

    partners: int = 4
    """Partners per neuron (its cluster, else its co-occurring neurons, else others of
    its layer)."""
    per_partner: int = 3
    """Held-out top contexts tried per partner."""
    keep: int = 5
    """Negatives kept per neuron, hard and random each."""
    every_neuron: bool = False
    """Every neuron with exemplars, not only the labelled ones (a replay of
    partners * per_partner + 2 * keep windows per neuron)."""
    layers: tuple[int, ...] = ()
    """Only this layer (repeatable; default: every layer)."""
    batch_tokens: int = 4096
    """Tokens per forward batch (memory vs. speed)."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = AUTO
    """Model precision; auto: bfloat16 where the device runs it fast, else float32."""

    def __post_init__(self) -> None:
        if min(self.partners, self.per_partner, self.keep, self.batch_tokens) < 1:
            raise CircuitAtlasError("--partners, --per-partner, --keep and --batch-tokens "
                                    "must be at least 1")


@dataclass(frozen=True)
class WiringParams:
    """Weight-based wiring: which connections, searched how, read at which operating
    point."""

    k: int = 10
    """Connections per neuron, direction (upstream, downstream) and polarity."""
    operating_point: Literal["auto", "corpus", "weights"] = AUTO
    """Where each target neuron's linearised read is taken: "corpus": where it fires
    most in the exemplar windows of --corpus (the activations stage's); "weights": from
    the weights only, as if it fired positively at one standard deviation of its gate
    and up pre-activations; auto: corpus when --corpus has exemplar windows, else
    weights."""
    operating_tokens: int = 16384
    """Tokens of exemplar windows run to find the operating points."""
    top_share: float = 0.01
    """Share of those tokens, the largest activations of each neuron, averaged over."""
    dtype: Literal["auto", "bfloat16", "float16", "float32", "float64"] = AUTO
    """Precision of the search (candidates are re-scored in float32); auto: bfloat16
    where the device runs it fast, else float32."""
    margin: int = 6
    """Extra candidates per neuron, direction and polarity re-scored exactly after a
    low-precision search."""
    device: str = "cpu"
    """torch device, e.g. cuda."""
    batch_tokens: int = 4096
    """Tokens per forward batch of the operating-point pass."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.margin < 0 or not 0 < self.top_share <= 1:
            raise CircuitAtlasError(f"need k >= 1, margin >= 0 and 0 < top_share <= 1, got "
                                    f"{self.k}, {self.margin}, {self.top_share}")
        if self.operating_tokens < 1 or self.batch_tokens < 1:
            raise CircuitAtlasError("--operating-tokens and --batch-tokens must be at least 1")

    def resolved(self, device: str, warn=None) -> WiringParams:
        """These parameters with the search dtype resolved for ``device``."""
        from circuit_atlas.compute.precision import resolve_dtype

        return replace(self, dtype=resolve_dtype(self.dtype, device, "wiring", warn))

    def to_dict(self) -> dict:
        return asdict(self)
