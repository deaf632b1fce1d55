"""The dataset of a self-report experiment: a corpus's texts cut into windows, each
mapped to one neuron's activation at every token, split into train, validation and test
**by document** (``lake.splits.document_split``: a text's windows all land in one split,
so no test text is ever trained on, and the split is the same in every run).

The activations are read where the neuron is computed: the input of its layer's
``down_proj``, during a batched forward of the model's base (windows right-padded; in a
causal model the padding changes nothing before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from circuit_atlas.compute.activations import Window, batches, padded, text_windows
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.neurons import neuron_label, parse_neuron
from circuit_atlas.lake.splits import document_split
from circuit_atlas.selfreport.params import DatasetParams
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake


def one_corpus(corpora, what: str) -> str:
    """The one corpus a self-report step was given, or a refusal saying what it is for."""
    corpora = as_corpora(corpora)
    if len(corpora) != 1:
        raise CircuitAtlasError(f"give the one corpus {what}: --corpus C")
    return corpora[0]


def corpus_windows(tokenizer, texts: list[tuple[str, str]], context: int) -> list[Window]:
    """Consecutive windows of ``context`` tokens of every text (prompt_id, text)."""
    out = []
    for pid, text in texts:
        ids = tokenizer(text).input_ids
        if ids:
            out.extend(text_windows(pid, ids, context, context))
    return out


@torch.no_grad()
def neuron_activations(model, windows: list[Window], layer: int, neuron: int,
                       batch_tokens: int = 4096) -> dict[int, np.ndarray]:
    """{window id: (len,) float32} the neuron's activation at every token of each
    window."""
    a = model.adapter
    if not (0 <= layer < a.n_layers and 0 <= neuron < a.n_neurons):
        raise CircuitAtlasError(f"{neuron_label(layer, neuron)} is not in this model "
                                f"({a.n_layers} layers of {a.n_neurons} neurons)")
    down = [m for name, m in model.model.named_modules() if name.endswith("mlp.down_proj")]
    seen: list[torch.Tensor] = []
    hook = down[layer].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][..., neuron].float().cpu()))
    out: dict[int, np.ndarray] = {}
    try:
        for group in batches(windows, batch_tokens):
            seen.clear()
            model.model.base_model(input_ids=padded(group, a.device), use_cache=False)
            for w, row in zip(group, seen[0], strict=True):
                out[w.window] = row[:len(w.tokens)].numpy().astype(np.float32)
    finally:
        hook.remove()
    return out


def dataset_table(windows: list[Window], acts: dict[int, np.ndarray], layer: int,
                  neuron: int, val: float, test: float) -> pl.DataFrame:
    """One row per window: its split (by document), tokens and activations."""
    frame = pl.DataFrame({
        "layer": pl.Series([layer] * len(windows), dtype=pl.Int16),
        "neuron": pl.Series([neuron] * len(windows), dtype=pl.Int32),
        "window_id": pl.Series([w.window for w in windows], dtype=pl.Int64),
        "prompt_id": [w.doc for w in windows],
        "start": pl.Series([w.start for w in windows], dtype=pl.Int32),
        "token_ids": pl.Series([list(w.tokens) for w in windows], dtype=pl.List(pl.Int32)),
        "activations": pl.Series([acts[w.window].tolist() for w in windows],
                                 dtype=pl.List(pl.Float32)),
    })
    return frame.with_columns(split=document_split(pl.col("prompt_id"), val, test)).select(
        "layer", "neuron", "split", "window_id", "prompt_id", "start", "token_ids",
        "activations")


@dataclass
class DatasetReport(Report):
    corpus: str
    neuron: str
    windows: dict[str, int]
    documents: dict[str, int]
    tokens: int

    def __str__(self) -> str:
        parts = ", ".join(f"{s} {self.windows.get(s, 0):,} windows of "
                          f"{self.documents.get(s, 0):,} texts" for s in ("train", "val", "test"))
        return (f"self-report dataset {self.corpus} {self.neuron}: {parts}; "
                f"{self.tokens:,} tokens")


def run_dataset(lake, *, model, corpora=None, params: DatasetParams | None = None,
                cluster=None, progress: Progress | None = None) -> DatasetReport:
    """Map the windows of a corpus's texts to ``params.neuron``'s activations and write
    the ``selfreport_dataset`` table (train / val / test by document)."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake.schemas import SELFREPORT_DATASET

    lake, params = open_lake(lake), params or DatasetParams()
    if not params.neuron:
        raise CircuitAtlasError("say which neuron to report: --neuron L12/N345")
    layer, neuron = parse_neuron(params.neuron)
    corpus = one_corpus(corpora, "to take texts from")
    texts = (lake.scan("prompts", corpus=corpus).select("prompt_id", "text")
             .sort("prompt_id").collect().rows())
    texts = texts[:params.limit] if params.limit is not None else texts
    if not texts:
        raise CircuitAtlasError(f"corpus {corpus!r} has no texts; run: circuit-atlas prompts "
                                "import FILE --corpus " + corpus)
    loaded = load_model(model, device=params.device, dtype=params.dtype, stage="selfreport")
    windows = corpus_windows(loaded.tokenizer, texts, params.context)
    if progress:
        progress.update("self-report dataset", 0, len(windows))
    acts = neuron_activations(loaded, windows, layer, neuron, params.batch_tokens)
    if progress:
        progress.update("self-report dataset", len(windows), len(windows))
    table = dataset_table(windows, acts, layer, neuron, params.val, params.test)
    version = lake.new_table_version(loaded.name, corpus, "selfreport_dataset")
    name = version.write(f"{neuron_label(layer, neuron).replace('/', '-')}.parquet",
                         table.to_arrow(), SELFREPORT_DATASET)
    counts = table.group_by("split").agg(windows=pl.len(), documents=pl.col(
        "prompt_id").n_unique())
    version.publish([name], {"neuron": neuron_label(layer, neuron), "model": loaded.name,
                             "revision": loaded.revision, "dtype": loaded.dtype_name,
                             "params": {"context": params.context, "val": params.val,
                                        "test": params.test, "limit": params.limit},
                             "windows": dict(counts.select("split", "windows").rows())})
    return DatasetReport(corpus, neuron_label(layer, neuron),
                         dict(counts.select("split", "windows").rows()),
                         dict(counts.select("split", "documents").rows()),
                         int(sum(len(w.tokens) for w in windows)))

