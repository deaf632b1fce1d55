"""The dataset of a self-report experiment: a corpus's texts cut into windows, each
mapped to one neuron's (or several neurons') activation at every token, split into
train, validation and test **by document** (``lake.splits.document_split``: a text's
windows all land in one split, so no test text is ever trained on, and the split is the
same in every run).

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


def read_dataset(lake, model, corpora, example: str) -> tuple[str, pl.DataFrame,
                                                              list[tuple[int, int]]]:
    """(corpus, the collected selfreport_dataset, its neurons sorted) of the one corpus
    given; a refusal naming the dataset command (with ``example`` neurons) without one."""
    from circuit_atlas.names import model_name

    name, corpus = model_name(model), one_corpus(corpora, "of the dataset")
    table = lake.optional_table("selfreport_dataset", name, corpus)
    if table is None:
        raise CircuitAtlasError(f"no self-report dataset for {name!r} / {corpus!r}; run: "
                                f"circuit-atlas self-report dataset --neuron {example}")
    table = table.collect()
    return corpus, table, sorted(set(table.select("layer", "neuron").iter_rows()))


def corpus_windows(tokenizer, texts: list[tuple[str, str]], context: int) -> list[Window]:
    """Consecutive windows of ``context`` tokens of every text (prompt_id, text)."""
    out = []
    for pid, text in texts:
        ids = tokenizer(text).input_ids
        if ids:
            out.extend(text_windows(pid, ids, context, context))
    return out


@torch.no_grad()
def neuron_activations(model, windows: list[Window], neurons: list[tuple[int, int]],
                       batch_tokens: int = 4096) -> dict[tuple[int, int], dict[int, np.ndarray]]:
    """{(layer, neuron): {window id: (len,) float32}} each neuron's activation at every
    token of each window, all neurons read in the same forward passes."""
    a = model.adapter
    for layer, neuron in neurons:
        if not (0 <= layer < a.n_layers and 0 <= neuron < a.n_neurons):
            raise CircuitAtlasError(f"{neuron_label(layer, neuron)} is not in this model "
                                    f"({a.n_layers} layers of {a.n_neurons} neurons)")
    down = [m for name, m in model.model.named_modules() if name.endswith("mlp.down_proj")]
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)
    seen: dict[int, torch.Tensor] = {}

    def reader(layer: int, index: torch.Tensor):
        def hook(_m, args):
            seen[layer] = args[0][..., index].float().cpu()
        return hook

    hooks = [down[layer].register_forward_pre_hook(reader(layer, torch.as_tensor(idx)))
             for layer, idx in by_layer.items()]
    out: dict[tuple[int, int], dict[int, np.ndarray]] = {n: {} for n in neurons}
    try:
        for group in batches(windows, batch_tokens):
            model.model.base_model(input_ids=padded(group, a.device), use_cache=False)
            for layer, idx in by_layer.items():
                for i, w in enumerate(group):
                    row = seen[layer][i, :len(w.tokens)].numpy().astype(np.float32)
                    for j, neuron in enumerate(idx):
                        out[layer, neuron][w.window] = np.ascontiguousarray(row[:, j])
    finally:
        for hook in hooks:
            hook.remove()
    return out


def dataset_table(windows: list[Window], acts: dict[tuple[int, int], dict[int, np.ndarray]],
                  neurons: list[tuple[int, int]], val: float, test: float) -> pl.DataFrame:
    """One row per neuron and window: its split (by document), tokens and the neuron's
    activations (the windows' columns built once, whatever the number of neurons)."""
    import pyarrow as pa

    base = pl.DataFrame({
        "window_id": pl.Series([w.window for w in windows], dtype=pl.Int64),
        "prompt_id": [w.doc for w in windows],
        "start": pl.Series([w.start for w in windows], dtype=pl.Int32),
        "token_ids": pl.Series([list(w.tokens) for w in windows], dtype=pl.List(pl.Int32)),
    }).with_columns(split=document_split(pl.col("prompt_id"), val, test))
    lengths = np.array([len(w.tokens) for w in windows], np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.tile(lengths, len(neurons)))])
    flat = np.concatenate([acts[n][w.window] for n in neurons for w in windows]
                          ) if windows else np.zeros(0, np.float32)
    values = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                      pa.array(flat.astype(np.float32)))
    frame = base[np.tile(np.arange(len(windows)), len(neurons))].with_columns(
        layer=pl.Series(np.repeat([n[0] for n in neurons], len(windows)), dtype=pl.Int16),
        neuron=pl.Series(np.repeat([n[1] for n in neurons], len(windows)), dtype=pl.Int32),
        activations=pl.Series(values).cast(pl.List(pl.Float32)))
    return frame.select("layer", "neuron", "split", "window_id", "prompt_id", "start",
                        "token_ids", "activations")


def chosen_neurons(lake, model: str, corpus: str, spec: str, n_neurons: int,
                   n_layers: int) -> list[tuple[int, int]]:
    """The neurons ``--neuron`` names: one (L12/N345), several (L12/N345,L3/N7), every
    neuron of a layer (L12/*) or the scan's best N (top:N, from selfreport_candidates)."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("top:") and part[4:].isdigit() and int(part[4:]) > 0:
            table = lake.optional_table("selfreport_candidates", model, corpus)
            if table is None:
                raise CircuitAtlasError(f"--neuron {part} takes the best of the scan: run "
                                        "circuit-atlas self-report scan first")
            out += table.sort("rank").head(int(part[4:])).select(
                "layer", "neuron").collect().rows()
        elif part.endswith("/*"):
            layer = parse_neuron(part[:-2] + "/N0")[0]
            if not 0 <= layer < n_layers:
                raise CircuitAtlasError(f"--neuron {part}: the model has {n_layers} layers")
            out += [(layer, n) for n in range(n_neurons)]
        else:
            out.append(parse_neuron(part))
    return sorted(set(out))


@dataclass
class DatasetReport(Report):
    corpus: str
    neurons: list[str]
    windows: dict[str, int]
    documents: dict[str, int]
    tokens: int

    def __str__(self) -> str:
        parts = ", ".join(f"{s} {self.windows.get(s, 0):,} windows of "
                          f"{self.documents.get(s, 0):,} texts" for s in ("train", "val", "test"))
        shown = (", ".join(self.neurons) if len(self.neurons) <= 4 else
                 f"{len(self.neurons):,} neurons ({self.neurons[0]} .. {self.neurons[-1]})")
        return (f"self-report dataset {self.corpus} {shown}: {parts}; "
                f"{self.tokens:,} tokens")


def run_dataset(lake, *, model, corpora=None, params: DatasetParams | None = None,
                cluster=None, progress: Progress | None = None) -> DatasetReport:
    """Map the windows of a corpus's texts to the activations of ``params.neuron`` (one
    neuron or several) and write the ``selfreport_dataset`` table (train / val / test by
    document), replacing the corpus's earlier dataset."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake.schemas import SELFREPORT_DATASET
    from circuit_atlas.names import model_name

    lake, params = open_lake(lake), params or DatasetParams()
    if not params.neuron:
        raise CircuitAtlasError("say which neuron to report: --neuron L12/N345 (or several: "
                                "L12/N345,L3/N7, L12/*, top:8)")
    corpus = one_corpus(corpora, "to take texts from")
    texts = (lake.scan("prompts", corpus=corpus).select("prompt_id", "text")
             .sort("prompt_id").collect().rows())
    texts = texts[:params.limit] if params.limit is not None else texts
    if not texts:
        raise CircuitAtlasError(f"corpus {corpus!r} has no texts; run: circuit-atlas prompts "
                                "import FILE --corpus " + corpus)
    loaded = load_model(model, device=params.device, dtype=params.dtype, stage="selfreport")
    a = loaded.adapter
    neurons = chosen_neurons(lake, model_name(model), corpus, params.neuron, a.n_neurons,
                             a.n_layers)
    windows = corpus_windows(loaded.tokenizer, texts, params.context)
    if progress:
        progress.update("self-report dataset", 0, len(windows))
    acts = neuron_activations(loaded, windows, neurons, params.batch_tokens)
    if progress:
        progress.update("self-report dataset", len(windows), len(windows))
    version = lake.new_table_version(loaded.name, corpus, "selfreport_dataset")
    names, table = [], None
    for layer in sorted({n[0] for n in neurons}):  # one file per layer
        table = dataset_table(windows, acts, [n for n in neurons if n[0] == layer],
                              params.val, params.test)
        names.append(version.write(f"L{layer}.parquet", table.to_arrow(), SELFREPORT_DATASET))
    one = table.filter(pl.col("neuron") == table["neuron"][0])  # every neuron's windows
    counts = one.group_by("split").agg(windows=pl.len(), documents=pl.col(
        "prompt_id").n_unique())
    labels = [neuron_label(*n) for n in neurons]
    version.publish(names, {"neurons": labels, "model": loaded.name,
                            "revision": loaded.revision, "dtype": loaded.dtype_name,
                            "params": {"context": params.context, "val": params.val,
                                       "test": params.test, "limit": params.limit},
                            "windows": dict(counts.select("split", "windows").rows())})
    return DatasetReport(corpus, labels, dict(counts.select("split", "windows").rows()),
                         dict(counts.select("split", "documents").rows()),
                         int(sum(len(w.tokens) for w in windows)))
