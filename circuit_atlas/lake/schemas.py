"""The lake's tables, declared once: pyarrow schemas with a version each.

Every writer passes these schemas and every reader checks files against them.
Types are narrow on purpose (int16 layers, int32 neurons and positions, float32
weights): edge tables hold hundreds of millions of rows.

Node identity is ``(layer, neuron)`` everywhere, under those column names (``src_``
and ``tgt_`` prefixed in edge tables):

* MLP neurons: ``layer`` in ``0 .. n_layers-1``, ``neuron`` = neuron number;
* embedding nodes: ``layer = EMBEDDING_LAYER (-1)``, ``neuron`` = token id;
* logit nodes: ``layer = n_layers`` (see :func:`logit_layer`), ``neuron`` = token id;
* the remainder of a layer at a position (all neurons of that layer outside a
  graph's candidate set, summed), and the constant node of attention biases:
  ``neuron = REMAINDER_INDEX (-1)``.

``L12/N345`` is a display format over this identity, never a storage format.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from circuit_atlas.errors import LakeError

EMBEDDING_LAYER = -1
REMAINDER_INDEX = -1

# Keys of the Parquet key-value metadata that tag a file with its table.
META_TABLE = b"circuit_atlas.table"
META_VERSION = b"circuit_atlas.schema_version"


def logit_layer(n_layers: int) -> int:
    """The layer number of logit nodes for a model with ``n_layers`` blocks."""
    return n_layers


def parquet_options(schema: pa.Schema, compression: str = "zstd") -> dict:
    """How the lake writes a table with ``schema`` to Parquet.

    Dictionary encoding only for non-float columns (ids, layers, counts, text repeat;
    float sums and weights almost never do, and trying costs time); floats get
    BYTE_STREAM_SPLIT, which zstd compresses better. On a reduced edge table of 3.3M
    rows (``bench/parquet_options.py``, against pyarrow's defaults with zstd): about
    half the time to write and to read, 11% smaller.
    """
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    return {"compression": compression,
            "use_dictionary": [f.name for f in schema if f.name not in floats],
            "use_byte_stream_split": floats or False}


@dataclass(frozen=True)
class TableSpec:
    """A lake table: its name, the schema of its files, and that schema's version.

    ``partitions`` are the hive partition columns the readers add (they are in the
    path, not in the files).
    """

    name: str
    version: int
    fields: tuple[pa.Field, ...]
    partitions: tuple[str, ...]
    doc: str

    @property
    def schema(self) -> pa.Schema:
        """The schema of the table's files, tagged with name and version."""
        return pa.schema(
            list(self.fields),
            metadata={META_TABLE: self.name.encode(), META_VERSION: str(self.version).encode()},
        )

    @property
    def partitioning_schema(self) -> pa.Schema:
        """Partition columns are dictionary-encoded strings: one value per file, so a
        plain string column would hold a copy in every row (memory; the read time is
        about the same, ``bench/parquet_options.py``)."""
        return pa.schema([(p, pa.dictionary(pa.int32(), pa.string())) for p in self.partitions])

    @property
    def dataset_schema(self) -> pa.Schema:
        """File columns followed by partition columns: what a reader returns."""
        return pa.schema(list(self.fields) + list(self.partitioning_schema))


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


PROMPTS = TableSpec(
    name="prompts",
    version=1,
    fields=(
        _f("prompt_id", pa.string()),
        _f("text", pa.string()),
        _f("domain", pa.string(), nullable=True),
        _f("source", pa.string(), nullable=True),
        _f("meta", pa.string(), nullable=True),
    ),
    partitions=("corpus",),
    doc="""One row per prompt of a corpus.
prompt_id: 16 hex digits of the SHA-256 of the UTF-8 text (stable: re-importing adds nothing).
text: the prompt, byte-identical to what was imported.
domain: optional label of the prompt's domain (e.g. "medical").
source: the file (or "demo") the prompt was imported from.
meta: any further fields of the imported record, as a JSON object.""",
)

GRAPHS = TableSpec(
    name="graphs",
    version=1,
    fields=(
        _f("graph_id", pa.int64()),
        _f("prompt_id", pa.string()),
        _f("n_tokens", pa.int32()),
        _f("input_tokens", pa.list_(pa.int32())),
        _f("target_tokens", pa.list_(pa.int32())),
        _f("target_probs", pa.list_(pa.float32())),
        _f("params_hash", pa.string()),
    ),
    partitions=("model", "corpus", "shard"),
    doc="""One row per attribution graph (one prompt under one model and parameter set).
graph_id: stable 64-bit id of (model, prompt_id, params_hash); graph_nodes and graph_edges
refer to it.
n_tokens: prompt length in tokens; input_tokens: the token ids, position 0 first.
target_tokens / target_probs: the logit targets at the last position and their probabilities.
params_hash: hash of the attribution parameters (the shard's commit record holds the values).""",
)

GRAPH_NODES = TableSpec(
    name="graph_nodes",
    version=2,
    fields=(
        _f("graph_id", pa.int64()),
        _f("layer", pa.int16()),
        _f("neuron", pa.int32()),
        _f("position", pa.int32()),
        _f("activation", pa.float32()),
        _f("score", pa.float32()),
        _f("influence", pa.float32()),
    ),
    partitions=("model", "corpus", "shard"),
    doc="""One row per node of a graph: a neuron (or embedding, logit, remainder) at a position.
(layer, neuron): node identity, see the module docstring; position: token position.
activation: the neuron's activation there (embedding: 1; logit: its probability; remainder: 0).
score: RelP relevance, activation * d(probability-weighted logit reads)/d(activation).
influence: share of the graph's path weight from this node to the logits (used to prune).""",
)

GRAPH_EDGES = TableSpec(
    name="graph_edges",
    version=2,
    fields=(
        _f("graph_id", pa.int64()),
        _f("src_layer", pa.int16()),
        _f("src_neuron", pa.int32()),
        _f("src_pos", pa.int32()),
        _f("tgt_layer", pa.int16()),
        _f("tgt_neuron", pa.int32()),
        _f("tgt_pos", pa.int32()),
        _f("weight", pa.float32()),
    ),
    partitions=("model", "corpus", "shard"),
    doc="""One row per edge of a graph, from a source node to a target node (ids as in
graph_nodes).
weight: the linearised contribution source_activation * d(target)/d(source).""",
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (PROMPTS, GRAPHS, GRAPH_NODES, GRAPH_EDGES)}

# Derived tables, under tables/model=<m>/corpus=<c>/<name>/ (see lake.derived).
_DERIVED = ("model", "corpus")

EDGE_STATS = TableSpec(
    name="edges",
    version=2,
    fields=(
        _f("src_layer", pa.int16()), _f("src_neuron", pa.int32()), _f("tgt_layer", pa.int16()),
        _f("tgt_neuron", pa.int32()), _f("count", pa.int64()), _f("graph_count", pa.int64()),
        _f("weight_sum", pa.float64()), _f("weight_abs_sum", pa.float64()),
        _f("weight_sq_sum", pa.float64()), _f("weight_min", pa.float32()),
        _f("weight_max", pa.float32()), _f("mean_weight", pa.float64()),
        _f("mean_abs_weight", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""One row per (src_layer, src_neuron, tgt_layer, tgt_neuron) over all graphs reduced.
count: edge rows (position-level observations); graph_count: distinct graphs;
weight_sum / weight_abs_sum / weight_sq_sum / weight_min / weight_max over those rows;
mean_weight = weight_sum / count; mean_abs_weight = weight_abs_sum / count.
One file per source layer (src_layer-NNN.parquet), or per range of its source neurons
where one layer is too big for one fold (src_layer-NNN.from-NEURON.parquet), sorted by
the four node-id columns.""",
)

NEURON_STATS = TableSpec(
    name="neurons",
    version=2,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("graph_count", pa.int64()),
        _f("position_count", pa.int64()), _f("activation_mean", pa.float64()),
        _f("activation_max", pa.float32()), _f("activation_sq_sum", pa.float64()),
        _f("score_mean", pa.float64()), _f("score_abs_mean", pa.float64()),
        _f("score_max", pa.float32()), _f("score_sq_sum", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""One row per node identity (layer, neuron) seen in any graph (remainders excluded;
embeddings at layer -1 and logits at layer n_layers included).
graph_count: distinct graphs; position_count: node rows; activation_* and score_*
(relevance): mean over node rows, max, sum of squares; score_abs_mean: mean |score|.""",
)

NEURON_CORPORA = TableSpec(
    name="neuron_corpora",
    version=2,
    fields=(_f("layer", pa.int16()), _f("neuron", pa.int32()), _f("corpus_name", pa.string()),
            _f("graph_count", pa.int64())),
    partitions=_DERIVED,
    doc="""Per (layer, neuron) and reduced corpus: the number of that corpus's graphs it is in.""",
)

NEURON_TOKENS = TableSpec(
    name="neuron_tokens",
    version=2,
    fields=(_f("layer", pa.int16()), _f("neuron", pa.int32()), _f("kind", pa.string()),
            _f("rank", pa.int16()), _f("token_id", pa.int32()), _f("count", pa.int64())),
    partitions=_DERIVED,
    doc="""Token associations, top-k per (layer, neuron, kind), rank 0 first.
kind "input": the prompt token at the neuron's positions (count: node rows);
kind "output": the top predicted token of the graphs it is in (count: graphs).""",
)

CLUSTER_ASSIGNMENTS = TableSpec(
    name="cluster_assignments",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("method", pa.string()),
        _f("cluster_path", pa.string()), _f("top_cluster", pa.int32()),
        _f("sub_module", pa.int32(), nullable=True),
        _f("subsub_module", pa.int32(), nullable=True), _f("depth", pa.int16()),
        _f("flow", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""One row per clustered node and method (the original atlas's columns).
cluster_path: module ids from the top level down, joined by ":" ("4466:2:1"), 1-based
and ranked by flow at every level; top_cluster / sub_module / subsub_module: its first
three ids (null below the node's depth); depth: number of module levels above the node;
flow: Infomap's stationary flow (Leiden: share of link weight). One file per method.""",
)

CLUSTERS = TableSpec(
    name="clusters",
    version=1,
    fields=(
        _f("method", pa.string()), _f("cluster_path", pa.string()), _f("level", pa.int16()),
        _f("top_cluster", pa.int32()), _f("sub_module", pa.int32(), nullable=True),
        _f("subsub_module", pa.int32(), nullable=True), _f("size", pa.int64()),
        _f("layer_min", pa.int16()), _f("layer_max", pa.int16()),
        _f("median_layer", pa.float64()), _f("flow", pa.float64()),
        _f("top_members", pa.list_(pa.string())),
    ),
    partitions=_DERIVED,
    doc="""One row per module at every level of every method's hierarchy.
level: 1 for top modules; size: nodes inside (at any depth); layer_min / layer_max /
median_layer over them; flow: their summed flow; top_members: up to 10 "L12/N345"
ids by decreasing flow. A module's children's sizes add up to its size.""",
)

# Context-free tables of a model (projections) live under this corpus partition.
STATIC_CORPUS = "static"

PROJECTIONS = TableSpec(
    name="projections",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("kind", pa.string()),
        _f("sign", pa.int8()), _f("rank", pa.int16()), _f("token_id", pa.int32()),
        _f("token", pa.string()), _f("value", pa.float32()),
        _f("write_norm", pa.float32(), nullable=True),
    ),
    partitions=_DERIVED,
    doc="""Static projections of every neuron (corpus partition "static"), top-k per sign.
kind "output": the neuron's write vector through the unembedding (sign 1: promoted
tokens, -1: suppressed); kind "input": SiLU(gate) * up of each token's embedding
(sign 1: activating, -1: suppressing). rank 0 is the strongest; value: the score;
write_norm: |W_down[:, neuron]| on output rows (null on input rows). Whether the final
and MLP norms' weights were applied is in the manifest (params.norm).
One file per layer (layer-NNN.parquet).""",
)

EFFECTS = TableSpec(
    name="effects",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("prompt_id", pa.string()),
        _f("target_token", pa.int32()), _f("activation", pa.float32()),
        _f("direct", pa.float32()), _f("indirect", pa.float32()), _f("total", pa.float32()),
        _f("prob_change", pa.float32()), _f("direct_ratio", pa.float32(), nullable=True),
        _f("aligned", pa.bool_()),
    ),
    partitions=_DERIVED,
    doc="""Direct and indirect effect of a neuron on a prompt's target token (see
circuit_atlas.compute.effects), one row per (neuron, prompt).
activation: the neuron's at the last position; direct / indirect / total: logit effects
of adding its write vector there; prob_change: the target's probability change under
the total effect; direct_ratio = |direct| / (|direct| + |indirect|) (null when both
are 0); aligned: direct and indirect have the same sign.""",
)

NEURON_EFFECTS = TableSpec(
    name="neuron_effects",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("prompts", pa.int64()),
        _f("der_mean", pa.float64(), nullable=True), _f("der_std", pa.float64(), nullable=True),
        _f("der_median", pa.float64(), nullable=True),
        _f("der_class", pa.string(), nullable=True),
        _f("consistency", pa.float64(), nullable=True), _f("aligned_fraction", pa.float64()),
        _f("direct_mean", pa.float64()), _f("indirect_mean", pa.float64()),
        _f("total_mean", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""Per neuron across the prompts of the effects table: direct-ratio mean, std and
median; der_class: routing-dominant (mean < 0.3), mixed, logit-dominant (> 0.7);
consistency: share of prompts whose own ratio is in that class; aligned_fraction:
share with direct and indirect of the same sign; mean logit effects.""",
)

COOCCURRENCE = TableSpec(
    name="cooccurrence",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("other_layer", pa.int16()),
        _f("other_neuron", pa.int32()), _f("joint_count", pa.int64()), _f("count", pa.int64()),
        _f("other_count", pa.int64()), _f("jaccard", pa.float64()), _f("npmi", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""Top-k co-occurring neurons of each neuron (both directions), over graphs.
joint_count: graphs holding both; count / other_count: graphs holding each;
jaccard = joint / (count + other_count - joint); npmi: normalised PMI in [-1, 1].
Hub neurons (in more than max_share of the graphs) are left out; see the manifest.""",
)

SPECIFICITY = TableSpec(
    name="specificity",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("domain", pa.string()),
        _f("baseline", pa.string()), _f("domain_count", pa.int64()),
        _f("baseline_count", pa.int64()), _f("domain_graphs", pa.int64()),
        _f("baseline_graphs", pa.int64()), _f("domain_freq", pa.float64()),
        _f("baseline_freq", pa.float64()), _f("specificity", pa.float64()),
        _f("log_odds", pa.float64()), _f("log_odds_low", pa.float64()),
        _f("log_odds_high", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""Domain specificity of each neuron: a domain corpus against a baseline corpus
(see circuit_atlas.analysis.specificity). specificity in [0, 1] (0.5: no preference),
add-one smoothed; log_odds with its 95% interval (low > 0: significant preference).""",
)

SELFREPORT_CANDIDATES = TableSpec(
    name="selfreport_candidates",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("count", pa.int64()),
        _f("std", pa.float64()), _f("selectivity", pa.float64(), nullable=True),
        _f("sparsity", pa.float64(), nullable=True), _f("kurtosis", pa.float64(), nullable=True),
        _f("label_score", pa.float64(), nullable=True), _f("score", pa.float64()),
        _f("rank", pa.int32()),
    ),
    partitions=_DERIVED,
    doc="""Neurons ranked as self-report targets from one corpus's activation statistics
(see circuit_atlas.selfreport.scanner): std; selectivity, the share of tokens whose
|activation| stays below the threshold share of its largest (not ranked on); sparsity,
Hoyer's measure of the |activations| (1: one token, 0: all alike); excess kurtosis (the
three read off the histogram, to within a bin); the mean scored label's score where
there is one; score, the mean percentile rank of std, sparsity, kurtosis and label
score; rank 0 is the best.""",
)

SELFREPORT_DATASET = TableSpec(
    name="selfreport_dataset",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("split", pa.string()),
        _f("window_id", pa.int64()), _f("prompt_id", pa.string()), _f("start", pa.int32()),
        _f("token_ids", pa.list_(pa.int32())), _f("activations", pa.list_(pa.float32())),
    ),
    partitions=_DERIVED,
    doc="""A self-report experiment's data (see circuit_atlas.selfreport.dataset): a
corpus's texts in consecutive windows (start: the first token's position in its text),
each with the neuron's activation at every token; split "train", "val" or "test" by
document (every window of a text in one split). The manifest records the neuron, the
model's revision and dtype, and the parameters.""",
)

SELFREPORT_METRICS = TableSpec(
    name="selfreport_metrics",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("head", pa.string()),
        _f("unfreeze", pa.string()), _f("epoch", pa.int64()), _f("train_loss", pa.float64()),
        _f("val_loss", pa.float64()),
        _f("val_r2", pa.float64(), nullable=True), _f("seconds", pa.float64()),
        _f("windows_per_s", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""One row per epoch of a self-report training run (see
circuit_atlas.selfreport.trainer): the mean training loss and the validation loss (MSE
of the standardised activation), the validation R², the epoch's time and training
windows per second. The manifest holds the run's whole configuration.""",
)

SELFREPORT_RESULTS = TableSpec(
    name="selfreport_results",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("method", pa.string()),
        _f("head", pa.string()), _f("unfreeze", pa.string()), _f("split", pa.string()),
        _f("r2", pa.float64(), nullable=True), _f("pearson", pa.float64(), nullable=True),
        _f("accuracy", pa.float64()), _f("macro_f1", pa.float64(), nullable=True),
        _f("parse_rate", pa.float64(), nullable=True), _f("tokens", pa.int64()),
    ),
    partitions=_DERIVED,
    doc="""A self-report run's evaluation on its validation and test splits (by
document): method "self-report" (the trained model) beside the baselines "linear probe"
(ridge on the same residual of the frozen model), "bag of tokens" (ridge on the current
and preceding tokens, hashed) and "mean" (the training mean); R² and Pearson's r over
every token of the split, and the accuracy and macro-F1 of the predicted activations'
quantile bins (--bins of the training split). head: "regression", "classification" or
"token" (the model answers with a digit after a question: every method is then scored
at the last token of each window, R² and Pearson over the answers that parse as a
digit, parse_rate their share; 1 for the other methods).""",
)

SELFREPORT_TRANSFER = TableSpec(
    name="selfreport_transfer",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("role", pa.string()),
        _f("identity", pa.string()), _f("method", pa.string()), _f("split", pa.string()),
        _f("r2", pa.float64(), nullable=True), _f("pearson", pa.float64(), nullable=True),
        _f("accuracy", pa.float64()), _f("macro_f1", pa.float64(), nullable=True),
        _f("tokens", pa.int64()),
    ),
    partitions=_DERIVED,
    doc="""One self-report head shared by a dataset's neurons and told which one to report
(see circuit_atlas.selfreport.transfer), scored per neuron on its validation and test
documents. role: "trained" (the head trained on this neuron's training windows) or
"held out" (never trained on it); identity: how the head is told the neuron ("weights":
its input weights; "embedding": a vector learned per neuron); method "self-report" (the
shared head), "linear probe" (ridge on the same residual, fit on this neuron's own
training labels), "mean" (its training mean) and, for held-out neurons, "nearest neuron"
(the probe of the trained neuron with the most alike input weights). Scores as in
selfreport_results (bins: 10 quantiles of the neuron's training activations). The
manifest holds each run's configuration, its held-out neurons and its learning curve.""",
)

ROLES = TableSpec(
    name="roles",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("role", pa.string()),
        _f("in_embed", pa.float64()), _f("in_neuron", pa.float64()), _f("sources", pa.int64()),
        _f("out_logit", pa.float64()), _f("out_neuron", pa.float64()),
        _f("targets", pa.int64()), _f("out_negative_share", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""Circuit role of each neuron with edges: output formatter, feature detector,
inhibitor, integrator, relay or other (rules in circuit_atlas.analysis.roles), with the
strengths (summed |weight|) and partner counts the rules read.""",
)

LABELS = TableSpec(
    name="labels",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("pass", pa.string()),
        _f("label", pa.string(), nullable=True), _f("description", pa.string(), nullable=True),
        _f("type", pa.string(), nullable=True),
        _f("interpretability", pa.string(), nullable=True), _f("labeler", pa.string()),
        _f("prompt_hash", pa.string(), nullable=True), _f("status", pa.string()),
        _f("error", pa.string(), nullable=True), _f("created_at", pa.string()),
    ),
    partitions=_DERIVED,
    doc="""Labels of neurons, appended batch by batch (one file per batch).
pass: "output" (what it does), "input" (what drives its activation up), "negative"
(what drives it most negative) or "prior" (imported, e.g. max-activation labels from
elsewhere); labeler: the LLM, or "import:<file>";
prompt_hash: hash of the prompt the label was made from; status "ok", "failed"
(error says why; a failed row has no label) or "candidate" (a best-of-N sample that
was not kept: label --samples).""",
)

LABEL_PROMPTS = TableSpec(
    name="label_prompts",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("pass", pa.string()),
        _f("prompt_hash", pa.string()), _f("system_message", pa.string()),
        _f("user_message", pa.string()),
    ),
    partitions=_DERIVED,
    doc="""The labeling prompts as assembled (circuit-atlas label --dry-run), to run any
LLM on: system_message and user_message of each neuron and pass. One file per pass.""",
)

CLUSTER_LABELS = TableSpec(
    name="cluster_labels",
    version=1,
    fields=(
        _f("method", pa.string()), _f("cluster_path", pa.string()),
        _f("label", pa.string(), nullable=True), _f("coherence", pa.float64(), nullable=True),
        _f("members_labelled", pa.int64()), _f("labeler", pa.string()),
        _f("prompt_hash", pa.string()), _f("status", pa.string()),
        _f("error", pa.string(), nullable=True), _f("created_at", pa.string()),
    ),
    partitions=_DERIVED,
    doc="""A name for each cluster from its members' output labels: label (short name),
coherence in [0, 1] (how much the members share one theme), as the LLM judged it.""",
)

# Activation shards: what one task of the activations stage saw, committed whole.
ACTIVATION_STATE = TableSpec(
    name="activation_state",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()),
        _f("top_value", pa.list_(pa.float32())), _f("top_window", pa.list_(pa.int64())),
        _f("top_pos", pa.list_(pa.int32())),
        _f("bottom_value", pa.list_(pa.float32())), _f("bottom_window", pa.list_(pa.int64())),
        _f("bottom_pos", pa.list_(pa.int32())),
        _f("count", pa.int64()), _f("total", pa.float64()), _f("total_sq", pa.float64()),
        _f("positive", pa.int64()), _f("min", pa.float32()), _f("max", pa.float32()),
        _f("hist", pa.list_(pa.int64())),
    ),
    partitions=("model", "corpus", "shard"),
    doc="""The mergeable exemplar state of every neuron over one activation shard's windows:
top and bottom k (value, window_id, position in the window; window -1 where fewer than
k positions were seen), positions seen, sum, sum of squares, positives, min, max and
the counts over fixed bin edges (below the first edge .. above the last).""",
)

ACTIVATION_WINDOWS = TableSpec(
    name="activation_windows",
    version=1,
    fields=(
        _f("window_id", pa.int64()), _f("prompt_id", pa.string()), _f("start", pa.int32()),
        _f("skip", pa.int32()), _f("token_ids", pa.list_(pa.int32())),
    ),
    partitions=("model", "corpus", "shard"),
    doc="""The windows an activation shard ran (one per short prompt; a document cut every
stride tokens): window_id (stable hash of prompt_id and start), the text's prompt_id,
start (the window's first token in the text), skip (leading positions not counted: an
earlier window of the text counted them, or they open the text, see the manifest's
skip_first) and the window's token ids.""",
)

ACTIVATION_TABLES: tuple[str, ...] = ("activation_state", "activation_windows")

ACTIVATION_STATS = TableSpec(
    name="activation_stats",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("count", pa.int64()),
        _f("mean", pa.float64()), _f("std", pa.float64()),
        _f("frac_positive", pa.float64()), _f("min", pa.float32()), _f("max", pa.float32()),
        _f("quantiles", pa.list_(pa.float32())), _f("hist", pa.list_(pa.int64())),
        _f("static_rank_corr", pa.float64(), nullable=True), _f("corr_tokens", pa.int32()),
    ),
    partitions=_DERIVED,
    doc="""Every neuron's activation h = SiLU(gate) * up over every token the activations
stage saw: count (tokens), mean, std, frac_positive, min, max; quantiles: the 1st, 5th,
10th, 25th, 50th, 75th, 90th, 95th and 99th percentiles read off the histogram
(linear within a bin); hist: counts over the manifest's bin_edges (below the first
edge .. above the last), which merge exactly across shards; static_rank_corr: Spearman's
rho between the neuron's mean activation at each token (in the sample windows, tokens
seen at least 3 times: corr_tokens of them) and its static input projection of that
token (null with fewer than 3).""",
)

EXEMPLARS = TableSpec(
    name="exemplars",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("sign", pa.int8()),
        _f("rank", pa.int16()), _f("activation", pa.float32()), _f("window_id", pa.int64()),
        _f("prompt_id", pa.string()), _f("start", pa.int32()), _f("position", pa.int32()),
        _f("acts", pa.list_(pa.float32())),
    ),
    partitions=_DERIVED,
    doc="""Every neuron's top k contexts (sign 1, highest activation first) and bottom k
(sign -1, most negative first): the window (window_id; its tokens in the
exemplar_windows table), the text (prompt_id) and the window's first token in it
(start), the position in the window where the neuron reached activation, and acts,
the neuron's activation at every token of the window. Ties are broken by
(window_id, position).""",
)

ACTIVATION_SAMPLES = TableSpec(
    name="activation_samples",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("bin", pa.int8()),
        _f("rank", pa.int16()), _f("activation", pa.float32()), _f("window_id", pa.int64()),
        _f("prompt_id", pa.string()), _f("start", pa.int32()), _f("position", pa.int32()),
        _f("acts", pa.list_(pa.float32())),
    ),
    partitions=_DERIVED,
    doc="""Quantile samples of every neuron, from a fixed random subset of the windows (the
manifest's sample_tokens): up to 3 contexts from each decile of its positive
activations (bin 0 the weakest .. 9 the strongest) and from where it is near zero (bin
-1: |activation| at most 1% of its largest), the negatives a label scorer needs. The
other columns as in exemplars; windows in exemplar_windows.""",
)

TOKEN_ACTIVATIONS = TableSpec(
    name="token_activations",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("rank", pa.int16()),
        _f("token_id", pa.int32()), _f("count", pa.int32()), _f("mean", pa.float32()),
        _f("static", pa.float32()),
    ),
    partitions=_DERIVED,
    doc="""Per neuron, the 10 tokens at which its mean activation in context is highest
(over the sample windows, tokens seen at least 3 times; rank 0 the highest): the
token, its count, that mean, and the neuron's static input projection of the token
alone.""",
)

EXEMPLAR_WINDOWS = TableSpec(
    name="exemplar_windows",
    version=1,
    fields=(
        _f("window_id", pa.int64()), _f("prompt_id", pa.string()), _f("start", pa.int32()),
        _f("skip", pa.int32()), _f("token_ids", pa.list_(pa.int32())),
        _f("next_tokens", pa.list_(pa.int32())),
    ),
    partitions=_DERIVED,
    doc="""The windows the exemplars table refers to: their text (prompt_id), first token
in it (start), leading positions not counted (skip: see activation_windows), token ids,
and next_tokens: the model's top 5 next-token predictions at
every position of the window (token ids, position-major: entries 5p .. 5p+4 follow
position p, most likely first).""",
)

NEGATIVES = TableSpec(
    name="negatives",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("source", pa.string()),
        _f("partner_layer", pa.int16()), _f("partner_neuron", pa.int32()),
        _f("activation", pa.float32()), _f("window_id", pa.int64()),
        _f("prompt_id", pa.string()), _f("start", pa.int32()), _f("position", pa.int32()),
        _f("acts", pa.list_(pa.float32())),
    ),
    partitions=_DERIVED,
    doc="""Held-out contexts on which a neuron stays below a tenth of its largest activation
at every counted token (for a negative-pass label: above a tenth of its most negative
one; a window may serve both): the negatives of its label scorers. Hard ones are top
exemplars of a partner (partner_layer, partner_neuron): source "cluster" (the same
module), "cooccurrence" (fires in the same graphs) or "layer" (another neuron of the
layer, when neither table exists); source "random": a held-out window drawn for the
neuron (partner -1). activation and position: the neuron's highest activation in the
window and where; acts: its activation at every token of the window (windows in
exemplar_windows).""",
)

LABEL_SCORES = TableSpec(
    name="label_scores",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("pass", pa.string()),
        _f("polarity", pa.int8()), _f("label", pa.string()), _f("labeler", pa.string()),
        _f("scorer", pa.string()), _f("scorer_model", pa.string()),
        _f("score", pa.float64(), nullable=True), _f("metrics", pa.string(), nullable=True),
        _f("positives", pa.int32()), _f("negatives", pa.int32()),
        _f("hard_negatives", pa.int32()), _f("prompt_hash", pa.string()),
        _f("status", pa.string()), _f("error", pa.string(), nullable=True),
        _f("created_at", pa.string()),
    ),
    partitions=_DERIVED,
    doc="""How far each label holds, by scorer, on held-out contexts the labeler never saw.
scorer "detection": balanced accuracy of telling activating contexts from negatives
(random and hard) given the label; "fuzzing": accuracy of telling correctly marked
activating tokens from shuffled marks; "simulation": Pearson's r, pooled over every
token, between the activations the scorer predicts from the label (0-10) and the
true ones. score: that headline (null where undefined, e.g. a constant simulation);
metrics: every figure as JSON (f1, auc, accuracy, logprobs used, ...); polarity: 1
for what drives the activation up, -1 for a label of the negative pass (what drives it
most negative: scored on its most negative contexts); positives / negatives / hard_negatives: the
contexts used. One row per answer, appended batch by batch (status "failed": error
says why).""",
)

INTERVENTIONS = TableSpec(
    name="interventions",
    version=1,
    fields=(
        _f("unit", pa.string()), _f("unit_kind", pa.string()),
        _f("layer", pa.int16(), nullable=True), _f("neuron", pa.int32(), nullable=True),
        _f("members", pa.int32()), _f("intervention", pa.string()),
        _f("factor", pa.float64(), nullable=True), _f("quantile", pa.int16(), nullable=True),
        _f("positions", pa.string()), _f("prompt_id", pa.string()),
        _f("target_token", pa.int32()), _f("distractor_token", pa.int32(), nullable=True),
        _f("prob_clean", pa.float32()), _f("logit_delta", pa.float32()),
        _f("prob_delta", pa.float32()), _f("logit_diff_delta", pa.float32(), nullable=True),
        _f("top1_flip", pa.bool_()), _f("top1_token", pa.int32()), _f("kl", pa.float32()),
        _f("predicted_delta", pa.float32()), _f("specificity", pa.float32()),
        _f("moved_tokens", pa.list_(pa.int32())), _f("moved_deltas", pa.list_(pa.float32())),
    ),
    partitions=_DERIVED,
    doc="""One row per unit, intervention and prompt of the causal battery (see
circuit_atlas.compute.interventions), on the next-token distribution at the prompt's
last position. unit: "L12/N345" (unit_kind "neuron", with layer and neuron) or a cluster
module "infomap:4:2" (unit_kind "module", members neurons); intervention: "zero" or
"mean" (ablation), "boost" (activations times factor), "set" (to the quantile-th
percentile of each neuron's activations), "patch" (activations from the prompt's
counterfactual); positions: "all" or "last". target_token: the prompt's target (its
record's "target", else the clean top prediction); prob_clean, logit_delta, prob_delta:
the target's; logit_diff_delta: change of logit(target) - logit(distractor) (null
without a distractor); top1_flip / top1_token: whether and to what the top prediction
changed; kl: KL(clean || intervened), nats; predicted_delta: mean change (minus the mean
over the vocabulary) of the 10 tokens the unit's output projections say the
intervention raises; specificity: the share of the moved probability (sum of |dp|) that
moved on those 10; moved_tokens / moved_deltas: the 5 tokens raised most, then the 5
lowered most, with their centred logit changes.""",
)

NEURON_CAUSAL = TableSpec(
    name="neuron_causal",
    version=1,
    fields=(
        _f("unit", pa.string()), _f("unit_kind", pa.string()),
        _f("layer", pa.int16(), nullable=True), _f("neuron", pa.int32(), nullable=True),
        _f("members", pa.int32()), _f("prompts", pa.int64()),
        _f("ablation", pa.string(), nullable=True),
        _f("necessity", pa.float64(), nullable=True),
        _f("necessity_rate", pa.float64(), nullable=True),
        _f("flip_rate", pa.float64(), nullable=True),
        _f("ablation_kl", pa.float64(), nullable=True),
        _f("boost", pa.string(), nullable=True),
        _f("sufficiency", pa.float64(), nullable=True),
        _f("boost_predicted_delta", pa.float64(), nullable=True),
        _f("specificity", pa.float64(), nullable=True),
        _f("boost_kl", pa.float64(), nullable=True),
        _f("patch_flip_rate", pa.float64(), nullable=True),
        _f("patch_kl", pa.float64(), nullable=True),
    ),
    partitions=_DERIVED,
    doc="""Per unit of the causal battery, over its prompts (the interventions table).
necessity: mean relative drop of the target's probability under ablation (1: the
ablation takes all of it; below 0: ablation helps); necessity_rate: share of prompts
where ablation costs the target at least a tenth of its probability; flip_rate: share
where it changes the top prediction; ablation: which ablation ("mean" or "zero");
sufficiency: share of the prompts the boost moves at all (KL above 1e-6 nats: a boost
of a silent neuron moves nothing) where it raises the tokens the unit's output
projections predict (predicted_delta > 0); boost_predicted_delta: their mean centred
logit change; specificity: mean share of the moved probability on those tokens, over
the same prompts;
boost: "boost x4" or "set p99"; *_kl: mean KL(clean || intervened); patch_*: the
same from counterfactual patching (null: not run).""",
)

CIRCUIT_EFFECTS = TableSpec(
    name="circuit_effects",
    version=1,
    fields=(
        _f("unit", pa.string()), _f("other", pa.string()), _f("intervention", pa.string()),
        _f("prompts", pa.int64()), _f("clean_abs_mean", pa.float64()),
        _f("intervened_abs_mean", pa.float64()), _f("relative_change", pa.float64()),
    ),
    partitions=_DERIVED,
    doc="""What ablating one module does to another: for each ablated module (unit) and
each other module of the battery (other), the mean |activation| of other's members
over the intervened positions and prompts, clean and with unit ablated, and
relative_change = intervened / clean - 1 (-1: other falls silent).""",
)

INVESTIGATIONS = TableSpec(
    name="investigations",
    version=1,
    fields=(
        _f("layer", pa.int16()), _f("neuron", pa.int32()), _f("investigation", pa.string()),
        _f("status", pa.string()), _f("verdict", pa.string(), nullable=True),
        _f("confidence", pa.float64(), nullable=True),
        _f("hypotheses", pa.list_(pa.string())), _f("experiments", pa.string()),
        _f("tool_calls", pa.int64()), _f("model_calls", pa.int64()),
        _f("prompt_tokens", pa.int64()), _f("completion_tokens", pa.int64()),
        _f("seconds", pa.float64()), _f("investigator", pa.string()),
        _f("error", pa.string(), nullable=True), _f("created_at", pa.string()),
    ),
    partitions=_DERIVED,
    doc="""One row per investigation of a neuron by an agent (circuit-atlas investigate):
status "done" (it gave a verdict), "budget" (a budget ran out first: error says which)
or "failed" (the LLM endpoint failed; a rerun resumes it); verdict and confidence (0 to
1) as the agent gave them; hypotheses in the order stated; experiments: JSON list of
every tool call (tool, arguments, result or error), in order; tool_calls, model_calls
(runs of the model: activations, intervene, steer), the tokens spent and the seconds;
investigator: the LLM. Every step is journaled as it happens
(_log/journal/investigations), so a killed investigation resumes where it stopped.""",
)

WIRING = TableSpec(
    name="wiring",
    version=1,
    fields=(
        _f("direction", pa.string()), _f("src_layer", pa.int16()), _f("src_neuron", pa.int32()),
        _f("tgt_layer", pa.int16()), _f("tgt_neuron", pa.int32()), _f("polarity", pa.int8()),
        _f("rank", pa.int16()), _f("strength", pa.float32()), _f("c_gate", pa.float32()),
        _f("c_up", pa.float32()),
    ),
    partitions=_DERIVED,
    doc="""Weight-based wiring (circuit-atlas wiring): every neuron's strongest
connections through the residual stream from the weights alone, top k per direction
and polarity. direction "downstream": a row of the source's list (its strongest later
targets), "upstream": of the target's (its strongest earlier sources); polarity 1
excitatory, -1 inhibitory; rank 0 the strongest; c_gate, c_up: the source's write read
by the target's gate and up projections (through the target's MLP norm weight);
strength: alpha * c_gate + beta * c_up, the RelP-linearised change of the target's
activation per unit of the source's at the target's operating point (manifest:
operating_point "corpus" or "weights"). Corpus partition "static" for the weight-only
point, else the corpus key whose exemplar windows gave it. One file per layer: its
neurons' downstream and upstream rows.""",
)

WIRING_AGREEMENT = TableSpec(
    name="wiring_agreement",
    version=1,
    fields=(
        _f("layer", pa.int16(), nullable=True), _f("neurons", pa.int64()),
        _f("hits", pa.int64()), _f("hit_rate", pa.float64(), nullable=True),
        _f("chance_rate", pa.float64(), nullable=True), _f("pairs", pa.int64()),
        _f("spearman", pa.float64(), nullable=True),
        _f("sign_agreement", pa.float64(), nullable=True),
    ),
    partitions=_DERIVED,
    doc="""How the weight-based wiring agrees with a corpus's RelP edges, per target layer
(layer null: all layers, the first row). neurons: targets with weight-based upstream rows
and RelP edges from MLP neurons; hits: of them, those whose strongest weight-based upstream
(largest |strength|) is among their most frequent RelP upstream (top 10 by count);
chance_rate: the mean hit rate of a source drawn at random from the earlier layers;
pairs: (source, target) pairs in both tables; spearman: rank correlation of their
predicted edge (strength times the source's mean activation in the graphs) with their
mean RelP edge weight; sign_agreement: share of them of one sign.""",
)

DERIVED: dict[str, TableSpec] = {
    t.name: t for t in (EDGE_STATS, NEURON_STATS, NEURON_CORPORA, NEURON_TOKENS,
                        CLUSTER_ASSIGNMENTS, CLUSTERS, PROJECTIONS, EFFECTS,
                        NEURON_EFFECTS, COOCCURRENCE, SPECIFICITY, ROLES, LABELS,
                        LABEL_PROMPTS, CLUSTER_LABELS, ACTIVATION_STATS,
                        EXEMPLARS, EXEMPLAR_WINDOWS, ACTIVATION_SAMPLES, TOKEN_ACTIVATIONS,
                        NEGATIVES, LABEL_SCORES, INTERVENTIONS, NEURON_CAUSAL,
                        CIRCUIT_EFFECTS, INVESTIGATIONS, WIRING, WIRING_AGREEMENT,
                        SELFREPORT_CANDIDATES, SELFREPORT_DATASET, SELFREPORT_METRICS,
                        SELFREPORT_RESULTS, SELFREPORT_TRANSFER)}

# The tables a graph shard holds, written together and committed together.
SHARD_TABLES: tuple[str, ...] = ("graphs", "graph_nodes", "graph_edges")


def spec(name: str) -> TableSpec:
    """The spec of a lake table by name, with a clear error for unknown names."""
    try:
        return TABLES[name]
    except KeyError:
        raise LakeError(f"unknown lake table {name!r}; known tables: {', '.join(TABLES)}") from None
