"""Direct and indirect effects of neurons on a prompt's prediction (direct effect ratio).

For neuron n of layer l on a prompt, with a its activation at the last position in a
clean forward, its write vector is ``V = a * W_down[:, n]`` (in post-norm families,
times the MLP output norm's weight and clean scale), and at the last position:

* direct: ``logits(h_final + V) - logits_clean`` (final norm and unembedding only):
  what V does if every later layer is frozen to its clean output; no forward pass;
* total: V added to the residual after layer l, layers l+1.. rerun for the last
  position only, against the clean keys and values of the earlier positions (causal
  attention: adding V at the last position changes nothing before it). Many neurons
  go through at once along the batch dimension;
* indirect = total - direct (exact as vectors).

Per pair, for the target token (the clean top prediction, or a given one, minus an
optional distractor): direct, indirect and total logit effects, the probability
change under the total effect, ``direct_ratio = |d| / (|d| + |i|)`` and whether d and
i have the same sign. Per neuron across prompts: mean, std and median ratio, a class
(routing-dominant < 0.3 <= mixed <= 0.7 < logit-dominant, on the mean), the share of
prompts whose own ratio falls in that class, and the share with aligned signs.

Cost per pair: ``L - l - 1`` one-position layer passes, against the original atlas's plan of a
whole forward pass over all T positions per neuron (``python bench/effects.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from circuit_atlas.compute.adapters import Adapter
from circuit_atlas.compute.params import EffectsParams
from circuit_atlas.compute.trace import (
    at,
    cached_attention,
    forward,
    mlp,
    neuron_writes,
    normed,
    qkv,
)
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

ROUTING, LOGIT = 0.3, 0.7  # direct-ratio class boundaries


@dataclass
class CleanRun:
    """One prompt's clean forward, as much as the effects need."""

    resid: list[torch.Tensor]  # per layer: (d,) residual after the layer, last position
    act: list[torch.Tensor]  # per layer: (N,) activations at the last position
    mlp_post_scale: list[torch.Tensor | None]  # per layer: post-MLP norm scale, last position
    keys: list[torch.Tensor]  # per layer: (H, T', dh) keys of the earlier positions in view
    values: list[torch.Tensor]
    rotary: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the last position's
    logits: torch.Tensor  # (V,)


@torch.no_grad()
def clean_run(adapter: Adapter, tokens: torch.Tensor) -> CleanRun:
    """The clean forward of ``tokens`` (1, T)."""
    a = adapter
    trace = forward(a, tokens)
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device).unsqueeze(0)
    x0 = a.embed_tokens(tokens)
    rotary = a.rotary(x0, positions)
    resid_full = [trace.resid_mid[i] + trace.mlp_out[i] for i in range(a.n_layers)]
    keys, values = [], []
    group = a.n_heads // a.n_kv_heads
    for i, blk in enumerate(a.blocks):
        # the earlier positions the last one attends to (its sliding window, if any)
        first = 0 if blk.window is None else max(0, T - blk.window)
        x = (x0 if i == 0 else resid_full[i - 1])[:, first:-1]
        cos, sin = rotary[i]
        _, k, v = qkv(a, blk, normed(a, x, blk.attn_norm), cos[:, first:-1],
                      sin[:, first:-1])
        keys.append(k[0].repeat_interleave(group, dim=0))
        values.append(v[0].repeat_interleave(group, dim=0))
    return CleanRun(resid=[r[0, -1] for r in resid_full], act=[h[0, -1] for h in trace.act],
                    mlp_post_scale=[at(s, 0, -1) for s in trace.mlp_post_scale],
                    keys=keys, values=values,
                    rotary=[(cos[:, -1:], sin[:, -1:]) for cos, sin in rotary],
                    logits=trace.logits(a)[0])


def final_logits(adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
    """Final norm and unembedding of residuals (..., d)."""
    return adapter.cap_logits(normed(adapter, x, adapter.final_norm) @ adapter.unembed.T)


@torch.no_grad()
def run_from(adapter: Adapter, run: CleanRun, layers: np.ndarray, x: torch.Tensor
             ) -> torch.Tensor:
    """Logits (B, V) when the last position's residual after layer ``layers[b]`` is
    ``x[b]`` (rows sorted by layer): each later layer runs for that position only, for
    the rows that have entered by then, against the cached earlier positions."""
    a = adapter
    x = x[:, None, :].clone()
    entered = np.searchsorted(layers, np.arange(a.n_layers + 1))  # rows with layer < j
    for j in range(int(layers[0]) + 1, a.n_layers):
        n = int(entered[j])
        blk, xa = a.blocks[j], x[:n]
        q, k, v = qkv(a, blk, normed(a, xa, blk.attn_norm), *run.rotary[j])
        attn = cached_attention(a, blk, q, k, v, run.keys[j], run.values[j])
        xa = xa + normed(a, attn, blk.attn_post_norm)
        x[:n] = xa + normed(a, mlp(a, blk, normed(a, xa, blk.mlp_norm)), blk.mlp_post_norm)
    return final_logits(a, x[:, 0])


@dataclass
class Effects:
    """Effect vectors of neurons (``layer[b]``, ``index[b]``) on one prompt."""

    layer: np.ndarray
    index: np.ndarray
    activation: torch.Tensor  # (B,)
    direct: torch.Tensor  # (B, V)
    total: torch.Tensor  # (B, V)

    @property
    def indirect(self) -> torch.Tensor:
        return self.total - self.direct


@torch.no_grad()
def neuron_effects(adapter: Adapter, run: CleanRun, layer: np.ndarray, index: np.ndarray
                   ) -> Effects:
    """Direct and total effects of neurons (``layer``, ``index``), rows sorted by layer,
    all in one pass through the later layers."""
    layer, index = np.asarray(layer), np.asarray(index)
    if len(layer) and np.any(np.diff(layer) < 0):
        raise ValueError("rows must be sorted by layer")
    dev = run.logits.device
    act = torch.stack([run.act[li][ni] for li, ni in zip(layer, index, strict=True)])
    # what each neuron adds to the residual (a post-MLP norm at its clean scale), one
    # layer's rows at a time: rows are sorted by layer
    bounds = [0, *(np.flatnonzero(np.diff(layer)) + 1), len(layer)]
    write = torch.cat([neuron_writes(adapter.blocks[layer[i]], act[i:j], index[i:j],
                                     run.mlp_post_scale[layer[i]])
                       for i, j in zip(bounds, bounds[1:], strict=False)])  # (B, d)
    start = torch.stack([run.resid[li] for li in layer]).to(dev)
    direct = final_logits(adapter, run.resid[-1] + write) - run.logits
    total = run_from(adapter, run, layer, start + write) - run.logits
    return Effects(layer, index, act, direct, total)


def metrics(effects: Effects, clean_logits: torch.Tensor, target: int,
            distractor: int | None = None) -> dict[str, np.ndarray]:
    """Per-neuron metrics for ``target`` (minus ``distractor``) from effect vectors."""
    def pick(v: torch.Tensor) -> torch.Tensor:
        out = v[:, target]
        return out - v[:, distractor] if distractor is not None else out

    d, t = pick(effects.direct), pick(effects.total)
    i = t - d
    denom = d.abs() + i.abs()
    patched = clean_logits + effects.total
    p_clean = (clean_logits[target] - clean_logits.logsumexp(-1)).exp()
    p_total = (patched[:, target] - patched.logsumexp(-1)).exp()
    ratio = torch.where(denom > 0, d.abs() / denom.clamp_min(1e-30), torch.nan)
    return {"activation": effects.activation, "direct": d, "indirect": i, "total": t,
            "prob_change": p_total - p_clean, "direct_ratio": ratio,
            "aligned": torch.sign(d) == torch.sign(i)}


def prompt_effects(adapter: Adapter, tokens: torch.Tensor, neurons: dict[int, np.ndarray],
                   target: int | None = None, distractor: int | None = None,
                   batch: int = 256) -> dict[str, np.ndarray]:
    """Effect metrics of ``neurons`` ({layer: indices}) on one prompt, as columns, in
    batches of ``batch`` neurons."""
    for layer in neurons:
        if not 0 <= layer < adapter.n_layers:
            raise CircuitAtlasError(f"layer {layer} out of range 0..{adapter.n_layers - 1}")
    run = clean_run(adapter, tokens)
    target = int(run.logits.argmax()) if target is None else target
    layers = np.concatenate([np.full(len(neurons[k]), k) for k in sorted(neurons)] or [[]])
    index = np.concatenate([np.asarray(neurons[k]) for k in sorted(neurons)] or [[]])
    cols: dict[str, list] = {"layer": [], "neuron": []}
    for lo in range(0, len(layers), batch):
        eff = neuron_effects(adapter, run, layers[lo:lo + batch].astype(int),
                             index[lo:lo + batch].astype(int))
        cols["layer"].append(eff.layer)
        cols["neuron"].append(eff.index)
        for key, val in metrics(eff, run.logits, target, distractor).items():
            cols.setdefault(key, []).append(val.cpu().numpy() if key == "aligned"
                                            else val.float().cpu().numpy())
    out = {k: np.concatenate(v) if v else np.array([]) for k, v in cols.items()}
    out["target_token"] = np.full(len(out["layer"]), target)
    return out


def der_class(ratio: pl.Expr) -> pl.Expr:
    return (pl.when(ratio < ROUTING).then(pl.lit("routing-dominant"))
            .when(ratio > LOGIT).then(pl.lit("logit-dominant"))
            .when(ratio.is_not_null()).then(pl.lit("mixed")))


def summarise(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per neuron across prompts: ratio statistics, class, consistency (share of the
    prompts with a defined ratio whose own class is the neuron's), alignment."""
    ratio = pl.col("direct_ratio").cast(pl.Float64).fill_nan(None)
    key = ["layer", "neuron"]
    pairs = pairs.with_columns(own=der_class(ratio))
    stats = (pairs.group_by(key)
             .agg(prompts=pl.len(), der_mean=ratio.mean(), der_std=ratio.std(),
                  der_median=ratio.median(),
                  aligned_fraction=pl.col("aligned").cast(pl.Float64).mean(),
                  direct_mean=pl.col("direct").cast(pl.Float64).mean(),
                  indirect_mean=pl.col("indirect").cast(pl.Float64).mean(),
                  total_mean=pl.col("total").cast(pl.Float64).mean())
             .with_columns(der_class=der_class(pl.col("der_mean"))))
    agree = (pairs.join(stats.select(*key, "der_class"), on=key)
             .group_by(key).agg(consistency=(pl.col("own") == pl.col("der_class"))
                                .cast(pl.Float64).mean()))
    return stats.join(agree, on=key).sort(key)


def effect_rows(adapter: Adapter, prompts: list[tuple[str, torch.Tensor, dict[int, np.ndarray]]],
                batch: int = 256, on_prompt: Callable[[int], None] | None = None
                ) -> pl.DataFrame:
    """Per-pair effect rows for (prompt_id, tokens, {layer: neurons}) triples."""
    frames = []
    for pid, tokens, neurons in prompts:
        cols = prompt_effects(adapter, tokens, neurons, batch=batch)
        if len(cols.get("layer", [])):
            frames.append(pl.DataFrame(cols).with_columns(prompt_id=pl.lit(pid)))
        if on_prompt:
            on_prompt(1)
    return pl.concat(frames) if frames else pl.DataFrame()


def effect_pairs(lake, model: str, corpora: list[str], n_layers: int,
                 neurons: list[tuple[int, int]] | None = None, limit: int | None = None
                 ) -> pl.DataFrame:
    """(prompt_id, text, layer, neuron) to evaluate: each graph's MLP neurons on its own
    prompt, or the given ``neurons`` on every prompt of ``corpora``."""
    prompts = lake.corpus_prompts(corpora).select("prompt_id", "text")
    if neurons is not None:
        wanted = pl.LazyFrame({"layer": [n[0] for n in neurons],
                               "neuron": [n[1] for n in neurons]},
                              schema={"layer": pl.Int16, "neuron": pl.Int32})
        if limit is not None:
            prompts = prompts.head(limit)
        return prompts.join(wanted, how="cross").collect()
    nodes = pl.concat([lake.scan("graph_nodes", model, c) for c in corpora]).filter(
        (pl.col("layer") >= 0) & (pl.col("layer") < n_layers) & (pl.col("neuron") >= 0))
    graphs = pl.concat([lake.scan("graphs", model, c) for c in corpora]).select(
        "graph_id", "prompt_id")
    pairs = (nodes.select("graph_id", "layer", "neuron").join(graphs, on="graph_id")
             .select("prompt_id", "layer", "neuron").unique())
    if limit is not None:
        first = pairs.select("prompt_id").unique().sort("prompt_id").head(limit)
        pairs = pairs.join(first, on="prompt_id")
    return (pairs.join(prompts, on="prompt_id")
            .select("prompt_id", "text", "layer", "neuron")
            .sort("prompt_id", "layer", "neuron").collect())


def write_effects(lake, model, corpora: list[str], neurons: list[tuple[int, int]] | None = None,
                  limit: int | None = None, batch: int = 256, part_prompts: int = 200,
                  on_prompt: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Compute and publish the ``effects`` and ``neuron_effects`` tables of a loaded
    model over the prompts of ``corpora`` (under their reduce's corpus key)."""
    from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.lake.schemas import EFFECTS, NEURON_EFFECTS

    if model.adapter.dtype not in (torch.float32, torch.float64):
        raise CircuitAtlasError(
            f"effects need a float32 or float64 model, got {model.dtype_name}: they are "
            "differences of logits, which half precision rounds away; load it with "
            "dtype='float32' (or dtype='auto', stage='effects')")
    pairs = effect_pairs(lake, model.name, corpora, model.adapter.n_layers, neurons, limit)
    if pairs.is_empty():
        raise CircuitAtlasError(f"nothing to evaluate: no graphs of {model.name!r} for "
                                f"{', '.join(corpora)} (run `circuit-atlas graphs` first) "
                                "and no --neuron given")
    key = corpus_key(corpora)
    version = lake.new_table_version(model.name, key, "effects")
    groups = pairs.partition_by("prompt_id", maintain_order=True)
    files, frames, rows = [], [], 0

    def flush() -> None:
        nonlocal frames, rows
        if frames:
            part = pl.concat(frames).with_columns(pl.col("direct_ratio").fill_nan(None))
            files.append(version.write(f"part-{len(files):05d}.parquet",
                                       part.select(EFFECTS.schema.names).to_arrow(), EFFECTS))
            rows += len(part)
            frames = []

    for done, group in enumerate(groups, start=1):
        pid, text = group["prompt_id"][0], group["text"][0]
        by_layer = {int(layer): g["neuron"].to_numpy()
                    for (layer,), g in group.partition_by("layer", as_dict=True).items()}
        frame = effect_rows(model.adapter, [(pid, tokenize(model, text, MAX_TOKENS), by_layer)],
                            batch)
        if len(frame):
            frames.append(frame)
        if done % part_prompts == 0:
            flush()
        if on_prompt:
            on_prompt(done, len(groups))
    flush()
    inputs = {"corpora": sorted(corpora), "neurons": neurons, "limit": limit,
              "model": model.name, "model_revision": model.revision, "model_shape": model.shape,
              "dtype": model.dtype_name}
    version.publish(files, inputs)
    summary = summarise(lake.table("effects", model.name, key).collect())
    summary_version = lake.new_table_version(model.name, key, "neuron_effects")
    name = summary_version.write("neuron_effects.parquet",
                                 summary.select(NEURON_EFFECTS.schema.names).to_arrow(),
                                 NEURON_EFFECTS)
    summary_version.publish([name], inputs)
    return {"effects": rows, "neuron_effects": len(summary), "prompts": len(groups)}


@dataclass
class EffectsReport(Report):
    corpus: str
    effects: int
    prompts: int
    neurons: int
    dtype: str
    seconds: float

    def __str__(self) -> str:
        return (f"effects {self.corpus}: {self.effects:,} neuron-prompt pairs over "
                f"{self.prompts:,} prompts, {self.neurons:,} neurons summarised, "
                f"{self.dtype}, {self.seconds:.1f} s "
                f"({self.effects / max(self.seconds, 1e-9):,.0f} pairs/s)")


def run_effects(lake, *, model, corpora, params: EffectsParams | None = None, cluster=None,
                progress: Progress | None = None) -> EffectsReport:
    """Direct and indirect effects of neurons on the predictions of the prompts of
    ``corpora``: the ``effects`` and ``neuron_effects`` (direct effect ratio) tables.
    Runs in this process (``cluster`` unused)."""
    from circuit_atlas.compute.models import loaded
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.lake.neurons import parse_neuron

    lake, params = open_lake(lake), params or EffectsParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    wanted = [parse_neuron(n) for n in params.neurons] or None
    start = time.perf_counter()
    model = loaded(model, params.device, params.dtype, "effects", progress)
    counts = write_effects(lake, model, corpora, neurons=wanted, limit=params.limit,
                           batch=params.batch,
                           on_prompt=lambda d, t: progress.update("effects", d, t))
    return EffectsReport(corpus_key(corpora), counts["effects"], counts["prompts"],
                         counts["neuron_effects"], model.dtype_name,
                         time.perf_counter() - start)
