"""Static projections: what each neuron writes to the vocabulary, and which tokens,
read straight from the embedding, drive it. Context-free facts from the weights.

For neuron n of layer l, with W_U the unembedding, E the embedding, g the final norm's
weight and w_l the layer's MLP-norm weight:

* output: ``W_U @ (g * W_down[:, n])`` over the vocabulary (with ``norm=False``:
  ``W_U @ W_down[:, n]``, the original atlas's formula). The final RMSNorm divides by a positive
  scalar and multiplies by g, so with g this is the direction of the neuron's logit
  effect; top-k promoted and suppressed tokens, and ``|W_down[:, n]|``. In post-norm
  families (OLMo) the MLP's output norm weight multiplies W_down[:, n] first: it is
  part of what the neuron writes;
* input: ``act(X @ W_gate[n]) * (X @ W_up[n])`` (act: SiLU, or GELU for Gemma) with X
  the embedding rows as the MLP would see them alone in the residual,
  ``rmsnorm(E) * w_l`` (``norm=False``, or a post-norm family whose MLP reads the raw
  residual: X = E, times the embedding scale where the family has one).
  Gate and up are combined, so a token that pushes them in opposite directions
  counts as suppressing.

Per layer and chunk of neurons the vocab x chunk scores are one matrix product in
``dtype`` (``auto``: bfloat16 where the device runs it fast, float32 elsewhere; see
``compute.precision``), of which the top ``k + margin`` tokens per sign are re-scored
exactly in float32 and ranked; no more than a chunk of the vocab x neurons matrix
exists at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from circuit_atlas.compute.adapters import Adapter
from circuit_atlas.compute.params import ProjectionParams, ProjectionsParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

CHUNK_BYTES = 256 * 2**20  # one vocab x chunk score matrix


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Candidate token ids (C, 2n): the n largest then the n smallest of each row."""
    n = min(n, scores.shape[1])
    return torch.cat([scores.topk(n, dim=1).indices,
                      scores.topk(n, dim=1, largest=False).indices], 1)


def _ranked(values: torch.Tensor, ids: torch.Tensor, k: int):
    """From exact candidate values, the top k of each sign: (values, ids), (C, 2k)."""
    k = min(k, values.shape[1] // 2)
    hi = values.topk(k, dim=1)
    lo = values.topk(k, dim=1, largest=False)
    return (torch.cat([hi.values, lo.values], 1),
            torch.cat([ids.gather(1, hi.indices), ids.gather(1, lo.indices)], 1))


class Projector:
    """The per-layer projections of one model, chunked by neurons."""

    def __init__(self, adapter: Adapter, params: ProjectionParams) -> None:
        params = params.resolved(str(adapter.device))
        self.a, self.p = adapter, params
        self.low = getattr(torch, params.dtype)
        exact = torch.float64 if adapter.dtype == torch.float64 else torch.float32
        self.exact = exact
        self.unembed = adapter.unembed.to(exact)
        self.embed = adapter.embed.to(exact)
        if adapter.embed_scale != 1.0:  # what a token puts on the residual (Gemma)
            self.embed = self.embed * adapter.embed_scale
        self.unembed_low = self.unembed.to(self.low)
        self.embed_rms = _rms(self.embed, adapter.eps) if params.norm else self.embed
        vocab = self.unembed.shape[0]
        self.chunk = max(1, min(adapter.n_neurons,
                                CHUNK_BYTES // (vocab * torch.finfo(self.low).bits // 8)))

    def layer(self, layer: int, neurons: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Columns for ``layer`` (all its neurons, or the ids ``neurons``): neuron,
        kind (0 output, 1 input), sign, rank, token_id, value, write_norm; rows grouped
        by neuron, kind, sign, rank."""
        a, p, blk = self.a, self.p, self.a.blocks[layer]
        which = np.arange(a.n_neurons) if neurons is None else np.unique(neurons)
        pick = torch.as_tensor(which, device=blk.down.device)
        down = blk.down[:, pick].to(self.exact).T  # (n, d)
        if blk.mlp_post_norm is not None:
            down = down * blk.mlp_post_norm.to(self.exact)
        write = down * a.final_norm.to(self.exact) if p.norm else down
        pre = p.norm and blk.mlp_norm is not None
        x = self.embed_rms * blk.mlp_norm.to(self.exact) if pre else self.embed
        x_low = x.to(self.low)
        gate, up = blk.gate[pick].to(self.exact), blk.up[pick].to(self.exact)
        parts = []
        for lo in range(0, len(which), self.chunk):
            sl = slice(lo, min(lo + self.chunk, len(which)))
            # output: scores (C, V), candidates re-scored exactly
            ids = _top(write[sl].to(self.low) @ self.unembed_low.T, p.k + p.margin)
            exact = torch.einsum("ckd,cd->ck", self.unembed[ids], write[sl])
            out = _ranked(exact, ids, p.k)
            g_low = gate[sl].to(self.low) @ x_low.T
            u_low = up[sl].to(self.low) @ x_low.T
            ids = _top(a.activation(g_low) * u_low, p.k + p.margin)
            del g_low, u_low
            rows = x[ids]  # (C, 2n, d)
            exact = (a.activation(torch.einsum("ckd,cd->ck", rows, gate[sl]))
                     * torch.einsum("ckd,cd->ck", rows, up[sl]))
            inp = _ranked(exact, ids, p.k)
            parts.append((which[sl], out, inp, down[sl].norm(dim=1)))
        return _columns(parts)

    def input_scores(self, layer: int, token_ids: np.ndarray) -> np.ndarray:
        """(tokens, n) exact input projections of every neuron of ``layer`` for the
        tokens ``token_ids``: what each token alone in the residual would make it."""
        blk = self.a.blocks[layer]
        ids = torch.as_tensor(token_ids, device=blk.down.device)
        pre = self.p.norm and blk.mlp_norm is not None
        x = self.embed_rms[ids] * blk.mlp_norm.to(self.exact) if pre else self.embed[ids]
        gate, up = blk.gate.to(self.exact), blk.up.to(self.exact)
        return (self.a.activation(x @ gate.T) * (x @ up.T)).cpu().numpy()


def _columns(parts) -> dict[str, np.ndarray]:
    cols: dict[str, list[np.ndarray]] = {c: [] for c in (
        "neuron", "kind", "sign", "rank", "token_id", "value", "write_norm")}
    for neurons, out, inp, norm in parts:
        n = len(neurons)
        for kind, (values, ids) in enumerate((out, inp)):
            kk = values.shape[1] // 2
            cols["neuron"].append(np.repeat(neurons, 2 * kk))
            cols["kind"].append(np.full(n * 2 * kk, kind))
            cols["sign"].append(np.tile(np.repeat([1, -1], kk), n))
            cols["rank"].append(np.tile(np.arange(kk), 2 * n))
            cols["token_id"].append(ids.cpu().numpy().ravel())
            cols["value"].append(values.float().cpu().numpy().ravel())
            w = norm.float().cpu().numpy() if kind == 0 else np.full(n, np.nan)
            cols["write_norm"].append(np.repeat(w, 2 * kk))
    return {c: np.concatenate(v) for c, v in cols.items()}


def vocabulary(tokenizer, size: int) -> pa.Array:
    """Each token id decoded to text (ids past the tokenizer's vocabulary: empty)."""
    n = min(size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return pa.array(texts + [""] * (size - n), pa.string())


def projection_table(cols: dict[str, np.ndarray], layer: int, vocab: pa.Array) -> pa.Table:
    from circuit_atlas.lake.schemas import PROJECTIONS

    kinds = np.array(["output", "input"])
    norm = cols["write_norm"]
    return pa.table({
        "layer": pa.array(np.full(len(cols["neuron"]), layer), pa.int16()),
        "neuron": pa.array(cols["neuron"], pa.int32()),
        "kind": pa.array(kinds[cols["kind"]], pa.string()),
        "sign": pa.array(cols["sign"], pa.int8()),
        "rank": pa.array(cols["rank"], pa.int16()),
        "token_id": pa.array(cols["token_id"], pa.int32()),
        "token": vocab.take(pa.array(cols["token_id"])),
        "value": pa.array(cols["value"], pa.float32()),
        "write_norm": pa.array(norm, pa.float32(), mask=np.isnan(norm)),
    }, schema=PROJECTIONS.schema)


@torch.no_grad()
def project(adapter: Adapter, params: ProjectionParams, layers: list[int] | None = None,
            on_layer: Callable[[int, dict[str, np.ndarray]], None] | None = None,
            neurons: dict[int, np.ndarray] | None = None) -> None:
    """Compute the projections of ``layers`` (default all; with ``neurons``, only its
    layers and, in each, its neuron ids), handing each layer's columns to
    ``on_layer`` as soon as it is done."""
    projector = Projector(adapter, params)
    if layers is None:
        layers = sorted(neurons) if neurons is not None else range(adapter.n_layers)
    for layer in layers:
        if not 0 <= layer < adapter.n_layers:
            raise CircuitAtlasError(f"layer {layer} out of range 0..{adapter.n_layers - 1}")
        wanted = None if neurons is None else neurons.get(layer)
        if neurons is not None and (wanted is None or not len(wanted)):
            continue
        cols = projector.layer(layer, wanted)
        if on_layer:
            on_layer(layer, cols)


def reduced_neurons(lake, model: str, corpora: list[str], n_layers: int
                    ) -> dict[int, np.ndarray]:
    """The MLP neurons of the reduced ``neurons`` table of ``corpora``, by layer: the
    neurons an atlas of those corpora describes."""
    import polars as pl

    from circuit_atlas.lake.layout import corpus_key

    df = (lake.table("neurons", model, corpus_key(corpora))
          .filter(pl.col("layer").is_between(0, n_layers - 1) & (pl.col("neuron") >= 0))
          .select("layer", "neuron").collect())
    return {int(layer): np.sort(g["neuron"].to_numpy())
            for (layer,), g in df.partition_by("layer", as_dict=True).items()}


def write_projections(lake, model, params: ProjectionParams, layers: list[int] | None = None,
                      on_layer: Callable[[int, int], None] | None = None, warn=None,
                      neurons: dict[int, np.ndarray] | None = None,
                      neurons_from: str | None = None) -> tuple[int, ProjectionParams]:
    """Compute and publish the ``projections`` table of a loaded model (one file per
    layer, written as each finishes); returns the rows written and the parameters as
    run (``auto`` resolved; they are what the manifest records). ``neurons``
    ({layer: ids}) restricts it to those neurons; ``neurons_from`` says in the
    manifest where they came from."""
    from circuit_atlas.lake.schemas import PROJECTIONS, STATIC_CORPUS

    params = params.resolved(model.device, warn)
    version = lake.new_table_version(model.name, STATIC_CORPUS, "projections")
    vocab = vocabulary(model.tokenizer, int(model.adapter.unembed.shape[0]))
    files, rows = [], 0
    if layers is None:
        layers = (sorted(k for k, v in neurons.items() if len(v)) if neurons is not None
                  else range(model.adapter.n_layers))
    todo = list(layers)

    def write(layer: int, cols: dict[str, np.ndarray]) -> None:
        nonlocal rows
        table = projection_table(cols, layer, vocab)
        files.append(version.write(f"layer-{layer:03d}.parquet", table, PROJECTIONS))
        rows += table.num_rows
        if on_layer:
            on_layer(len(files), len(todo))

    project(model.adapter, params, todo, write, neurons)
    counted = None if neurons is None else int(sum(len(v) for v in neurons.values()))
    version.publish(files, {"params": params.to_dict(), "layers": todo, "model": model.name,
                            "model_revision": model.revision, "model_shape": model.shape,
                            "neurons": counted, "neurons_from": neurons_from})
    return rows, params


@dataclass
class ProjectionsReport(Report):
    model: str
    rows: int
    neurons: int | None  # None: every neuron
    source: str | None
    params: ProjectionParams
    seconds: float

    def __str__(self) -> str:
        which = ("every neuron" if self.neurons is None
                 else f"{self.neurons:,} {self.source}")
        p = self.params
        return (f"projections {self.model}: {self.rows:,} rows for {which} (top {p.k} per "
                f"sign, norm {'on' if p.norm else 'off'}, search in {p.dtype}), "
                f"{self.seconds:.1f} s")


def run_projections(lake, *, model, corpora=None, params: ProjectionsParams | None = None,
                    cluster=None, progress: Progress | None = None) -> ProjectionsReport:
    """The static output and input projections of a model's neurons onto the
    vocabulary: the ``projections`` table (corpus ``static``). With ``corpora``, of
    the neurons their reduced ``neurons`` table holds only (the neurons an atlas of
    them describes); else of every neuron. Runs in this process (``cluster`` unused:
    it is one pass over the weights)."""
    from circuit_atlas.compute.models import loaded
    from circuit_atlas.lake.layout import corpus_key

    lake, params = open_lake(lake), params or ProjectionsParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    start = time.perf_counter()
    model = loaded(model, params.device, "float32", "projections", progress)
    neurons = source = None
    if corpora:
        neurons = reduced_neurons(lake, model.name, corpora, model.adapter.n_layers)
        source = f"neurons of {corpus_key(corpora)}"
    rows, ran = write_projections(
        lake, model, params.projection(), list(params.layers) or None,
        on_layer=lambda d, t: progress.update("projections", d, t), warn=progress.message,
        neurons=neurons, neurons_from=source)
    counted = None if neurons is None else int(sum(len(v) for v in neurons.values()))
    return ProjectionsReport(model.name, rows, counted, source, ran,
                             time.perf_counter() - start)
