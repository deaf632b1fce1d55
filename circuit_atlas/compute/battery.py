"""The causal battery stage: units x interventions x prompts, and what they say.

Each unit (a neuron, or a cluster module as a whole) is ablated (for *necessity*:
does the answer change without it?), boosted (for *sufficiency*: does it push the
tokens its output projections predict? and *specificity*: does it move only those?)
and, where a prompt has a counterfactual, patched from it. Every intervention of a
prompt goes through :func:`circuit_atlas.compute.interventions.rerun` in batches.

Tables: ``interventions`` (one row per unit, intervention and prompt),
``neuron_causal`` (per unit) and, with two modules or more, ``circuit_effects``
(ablate one module, measure another's activations).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from circuit_atlas.compute.interventions import (
    Clean,
    Edits,
    clean_pass,
    measures,
    predicted_tokens,
    rerun,
)
from circuit_atlas.compute.params import PERCENTILES, InterventionsParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.causal import BOOSTS, HURT, MOVED_KL, causal_table
from circuit_atlas.lake.units import Unit
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class Intervention:
    """What is done to every neuron of a unit."""

    kind: str  # "zero", "mean", "boost", "set" or "patch"
    factor: float | None = None  # boost: the multiplier
    quantile: int | None = None  # set: the percentile (100: the maximum)
    value: float | None = None  # set: this activation instead of a percentile

    def __str__(self) -> str:
        if self.kind == "boost":
            return f"boost x{self.factor:g}"
        if self.kind == "set":
            if self.value is not None:
                return f"set {self.value:g}"
            return "set max" if self.quantile == 100 else f"set p{self.quantile}"
        return self.kind

    @property
    def needs_stats(self) -> bool:
        return self.kind == "mean" or (self.kind == "set" and self.value is None)

    def edit(self, values: NeuronValues | None, layer: int, neuron: int
             ) -> tuple[float, float]:
        """(mult, add) of ``h' = mult * h + add`` for one neuron (not for patching, whose
        add is the counterfactual's activation at each position)."""
        if self.kind == "boost":
            return float(self.factor), 0.0
        if self.kind == "set" and self.value is not None:
            return 0.0, float(self.value)
        if self.needs_stats:
            return 0.0, values.value(self, layer, neuron)
        return 0.0, 0.0


def battery_plan(params: InterventionsParams) -> list[Intervention]:
    """The interventions ``params`` ask for (patching is added per prompt, where it has a
    counterfactual)."""
    out = [] if params.ablate == "none" else [Intervention(params.ablate)]
    if params.boost_quantile is not None:
        out.append(Intervention("set", quantile=params.boost_quantile))
    elif params.boost:
        out.append(Intervention("boost", factor=float(params.boost)))
    if params.patch:
        out.append(Intervention("patch"))
    if not out:
        raise CircuitAtlasError("nothing to do: --ablate none, --boost 0 and --no-patch")
    return out


@dataclass
class NeuronValues:
    """Per neuron, the values mean ablation and setting to a percentile use."""

    mean: dict[tuple[int, int], float] = field(default_factory=dict)
    quantile: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    maximum: dict[tuple[int, int], float] = field(default_factory=dict)

    def value(self, iv: Intervention, layer: int, neuron: int) -> float:
        key = (int(layer), int(neuron))
        if key not in self.mean:
            raise CircuitAtlasError(f"no activation statistics for L{layer}/N{neuron}")
        if iv.kind == "mean":
            return self.mean[key]
        if iv.quantile == 100:
            return self.maximum[key]
        return self.quantile[key][PERCENTILES.index(iv.quantile)]


def neuron_values(stats: pl.DataFrame) -> NeuronValues:
    """:class:`NeuronValues` from activation_stats rows."""
    out = NeuronValues()
    for r in stats.select("layer", "neuron", "mean", "quantiles", "max").iter_rows():
        key = (int(r[0]), int(r[1]))
        out.mean[key], out.quantile[key], out.maximum[key] = float(r[2]), list(r[3]), float(r[4])
    return out


def unit_edits(unit: Unit, iv: Intervention, row: int, where: torch.Tensor,
               values: NeuronValues | None, counter: Clean | None, dtype) -> list[tuple]:
    """One edit tuple (row, layer, neuron, mult, add (T,), where (T,)) per neuron of
    ``unit`` under ``iv``."""
    T = where.shape[0]
    out = []
    for layer, neuron in zip(unit.layers, unit.neurons, strict=True):
        if iv.kind == "patch":
            mult, add = 0.0, counter.act[layer][:, neuron].to(dtype)
        else:
            mult, value = iv.edit(values, layer, neuron)
            add = torch.full((T,), value, dtype=dtype, device=where.device)
        out.append((row, layer, neuron, mult, add, where))
    return out


def edits_of(rows: list[tuple], n_rows: int, dtype, device) -> Edits:
    return Edits(row=np.array([r[0] for r in rows]), layer=np.array([r[1] for r in rows]),
                 neuron=np.array([r[2] for r in rows]),
                 mult=torch.tensor([r[3] for r in rows], dtype=dtype, device=device),
                 add=torch.stack([r[4] for r in rows]),
                 where=torch.stack([r[5] for r in rows]), rows=n_rows)


def _watch(units: list[Unit]) -> dict[int, np.ndarray]:
    """Every module member's (layer: neurons), to measure one module under another's
    ablation."""
    by_layer: dict[int, set[int]] = {}
    for u in units:
        for layer, neuron in zip(u.layers, u.neurons, strict=True):
            by_layer.setdefault(layer, set()).add(neuron)
    return {j: np.array(sorted(n)) for j, n in by_layer.items()}


def _abs_mean(unit: Unit, acts: dict[int, torch.Tensor], watch: dict[int, np.ndarray]
              ) -> torch.Tensor:
    """(B,) mean |activation| over a module's members and the watched positions."""
    parts = []
    for j in sorted(set(unit.layers)):
        mine = [n for layer, n in zip(unit.layers, unit.neurons, strict=True) if layer == j]
        cols = torch.as_tensor(np.searchsorted(watch[j], mine))
        parts.append(acts[j][:, :, cols].abs().flatten(1))
    return torch.cat(parts, 1).mean(1)


def prompt_battery(adapter, tokens: torch.Tensor, units: list[Unit],
                   interventions: list[Intervention], values: NeuronValues | None = None,
                   target: int | None = None, distractor: int | None = None,
                   counter_tokens: torch.Tensor | None = None, positions: str = "all",
                   batch: int = 64, cache: dict | None = None
                   ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every unit under every intervention on one prompt (``tokens`` (1, T)): measure
    columns (``unit``, ``intervention``: indices into the lists) and, for ablated modules,
    the other modules' activations (rows of the circuit_effects table, per prompt).
    ``cache`` keeps the neurons' predicted tokens from one prompt to the next."""
    clean = clean_pass(adapter, tokens)
    T, dtype, device = clean.length, clean.logits.dtype, clean.logits.device
    counter = None
    if counter_tokens is not None:
        if positions == "all" and counter_tokens.shape[1] != T:
            raise CircuitAtlasError(f"the counterfactual has {counter_tokens.shape[1]} tokens, "
                                    f"the prompt {T}: patching every position needs equal "
                                    "lengths")
        counter = clean_pass(adapter, counter_tokens)
        if positions == "last":  # its last position patches the prompt's last
            counter.act = [a[-1:].expand(T, -1) for a in counter.act]
    where = (torch.ones(T, dtype=torch.bool, device=device) if positions == "all"
             else torch.arange(T, device=device) == T - 1)
    target = int(clean.logits.argmax()) if target is None else int(target)
    plan = [(u, i) for u, unit in enumerate(units) for i, iv in enumerate(interventions)
            if iv.kind != "patch" or counter is not None]
    modules = [u for u, unit in enumerate(units) if unit.kind == "module"]
    watch = _watch([units[u] for u in modules]) if len(modules) > 1 else {}
    cols: dict[str, list] = {"unit": [], "intervention": []}
    circuits = []
    if watch:  # every row reruns the positions from the first edited one on
        p0 = int(torch.nonzero(where)[0])
        clean_acts = {j: clean.act[j][p0:, torch.as_tensor(n)][None] for j, n in watch.items()}
        clean_abs = {b: float(_abs_mean(units[b], clean_acts, watch)[0]) for b in modules}
    for lo in range(0, len(plan), batch):
        chunk = plan[lo:lo + batch]
        rows = [e for r, (u, i) in enumerate(chunk)
                for e in unit_edits(units[u], interventions[i], r, where, values, counter,
                                    dtype)]
        edits = edits_of(rows, len(chunk), dtype, device)
        logits, acts = rerun(adapter, clean, edits, watch)
        m = measures(clean.logits, logits, target, distractor,
                     predicted_tokens(adapter, clean, edits, cache))
        cols["unit"].append(np.array([u for u, _ in chunk]))
        cols["intervention"].append(np.array([i for _, i in chunk]))
        for key, val in m.items():
            cols.setdefault(key, []).append(val)
        if watch:
            for r, (u, i) in enumerate(chunk):
                if units[u].kind != "module" or interventions[i].kind not in ABLATIONS:
                    continue
                for b in modules:
                    if b != u:
                        new = float(_abs_mean(units[b], {j: a[r:r + 1] for j, a in acts.items()},
                                              watch)[0])
                        circuits.append({"unit": u, "other": b, "intervention": i,
                                         "clean": clean_abs[b], "intervened": new})
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["target_token"] = np.full(len(out["unit"]), target)
    return out, circuits


def summarise(rows: pl.DataFrame) -> pl.DataFrame:
    """Per unit, necessity, sufficiency and specificity from interventions rows: necessity
    over every prompt, sufficiency and specificity over the prompts the boost moves."""
    kind = pl.col("intervention")
    abl, pat = kind.is_in(list(ABLATIONS)), kind == "patch"
    boo = kind.is_in(list(BOOSTS)) & (pl.col("kl") > MOVED_KL)

    def mean(expr: pl.Expr, where: pl.Expr) -> pl.Expr:
        return expr.cast(pl.Float64).filter(where).mean()

    ivs = ["intervention", "factor", "quantile"]
    settings = pl.DataFrame(  # each intervention as Intervention itself names it
        [(*iv, str(Intervention(*iv))) for iv in rows.select(ivs).unique().iter_rows()],
        schema={**rows.select(ivs).schema, "setting": pl.String}, orient="row")
    relative = -pl.col("prob_delta") / pl.col("prob_clean").clip(1e-30)
    key = ["unit", "unit_kind", "layer", "neuron", "members"]
    return (rows.join(settings, on=ivs, how="left", nulls_equal=True)
            .group_by(key, maintain_order=True).agg(
        prompts=pl.col("prompt_id").n_unique(),
        ablation=pl.col("setting").filter(abl).first(),
        necessity=mean(relative, abl),
        necessity_rate=mean(pl.col("prob_delta") <= -HURT * pl.col("prob_clean"), abl),
        flip_rate=mean(pl.col("top1_flip"), abl),
        ablation_kl=mean(pl.col("kl"), abl),
        boost=pl.col("setting").filter(kind.is_in(list(BOOSTS))).first(),
        sufficiency=mean(pl.col("predicted_delta") > 0, boo),
        boost_predicted_delta=mean(pl.col("predicted_delta"), boo),
        specificity=mean(pl.col("specificity"), boo),
        boost_kl=mean(pl.col("kl"), boo),
        patch_flip_rate=mean(pl.col("top1_flip"), pat),
        patch_kl=mean(pl.col("kl"), pat)))


def circuit_summary(circuits: pl.DataFrame) -> pl.DataFrame:
    """Per (ablated module, measured module): mean |activation| clean and intervened."""
    return (circuits.group_by("unit", "other", "intervention", maintain_order=True)
            .agg(prompts=pl.len(), clean_abs_mean=pl.col("clean").mean(),
                 intervened_abs_mean=pl.col("intervened").mean())
            .with_columns(relative_change=pl.col("intervened_abs_mean")
                          / pl.col("clean_abs_mean").clip(1e-30) - 1))


@dataclass(frozen=True)
class BatteryPrompt:
    """A prompt of the battery, with what its record gives."""

    prompt_id: str
    text: str
    target: str | None = None
    distractor: str | None = None
    counterfactual: str | None = None


def battery_prompts(lake, corpora: list[str], limit: int | None) -> list[BatteryPrompt]:
    """The prompts of ``corpora`` by id, with the target, distractor and counterfactual
    fields of their records (``meta``), where present."""
    prompts = lake.corpus_prompts(corpora).select("prompt_id", "text", "meta")
    if limit is not None:
        prompts = prompts.head(limit)
    out = []
    for pid, text, meta in prompts.collect().iter_rows():
        extra = json.loads(meta) if meta else {}
        extra = extra if isinstance(extra, dict) else {}
        out.append(BatteryPrompt(pid, text, *(extra.get(k) if isinstance(extra.get(k), str)
                                              else None
                                              for k in ("target", "distractor",
                                                        "counterfactual"))))
    return out


def token_of(tokenizer, text: str, what: str) -> int:
    """The first token of ``text`` (a target or distractor such as " Paris")."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise CircuitAtlasError(f"{what} {text!r} is no token")
    return int(ids[0])


def unit_columns(units: list[Unit]) -> pl.DataFrame:
    return pl.DataFrame({
        "unit": [u.name for u in units], "unit_kind": [u.kind for u in units],
        "layer": [u.single[0] if u.single else None for u in units],
        "neuron": [u.single[1] if u.single else None for u in units],
        "members": [u.size for u in units]},
        schema={"unit": pl.String, "unit_kind": pl.String, "layer": pl.Int16,
                "neuron": pl.Int32, "members": pl.Int32})


def battery_rows(model, prompts: list[BatteryPrompt], units: list[Unit],
                 interventions: list[Intervention], values: NeuronValues | None,
                 positions: str = "all", batch: int = 64,
                 on_prompt: Callable[[int, int], None] | None = None
                 ) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """interventions rows and raw circuit rows over ``prompts``, and how many prompts'
    counterfactuals were skipped (another length)."""
    from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize

    ivs = pl.DataFrame({
        "iv": range(len(interventions)), "intervention": [iv.kind for iv in interventions],
        "factor": [iv.factor for iv in interventions],
        "quantile": [iv.quantile for iv in interventions]},
        schema={"iv": pl.Int64, "intervention": pl.String, "factor": pl.Float64,
                "quantile": pl.Int16})
    frames, circuit_frames, skipped, cache = [], [], 0, {}
    uc = unit_columns(units).with_row_index("u").with_columns(pl.col("u").cast(pl.Int64))
    for done, p in enumerate(prompts, start=1):
        tokens = tokenize(model, p.text, MAX_TOKENS)
        counter = None
        if p.counterfactual and any(iv.kind == "patch" for iv in interventions):
            counter = tokenize(model, p.counterfactual, MAX_TOKENS)
            if positions == "all" and counter.shape[1] != tokens.shape[1]:
                counter, skipped = None, skipped + 1
        target = token_of(model.tokenizer, p.target, "target") if p.target else None
        distractor = (token_of(model.tokenizer, p.distractor, "distractor")
                      if p.distractor else None)
        cols, circuits = prompt_battery(model.adapter, tokens, units, interventions, values,
                                        target, distractor, counter, positions, batch, cache)
        moved_t, moved_d = cols.pop("moved_tokens"), cols.pop("moved_deltas")
        frame = pl.DataFrame({k: v for k, v in cols.items()}).with_columns(
            moved_tokens=pl.Series(moved_t.astype(np.int32).tolist(),
                                   dtype=pl.List(pl.Int32)),
            moved_deltas=pl.Series(moved_d.astype(np.float32).tolist(),
                                   dtype=pl.List(pl.Float32)),
            prompt_id=pl.lit(p.prompt_id), positions=pl.lit(positions),
            distractor_token=pl.lit(distractor, dtype=pl.Int32))
        frames.append(frame.rename({"unit": "u", "intervention": "iv"}))
        if circuits:
            circuit_frames.append(pl.DataFrame(circuits).with_columns(
                prompt_id=pl.lit(p.prompt_id)))
        if on_prompt:
            on_prompt(done, len(prompts))
    rows = (pl.concat(frames).join(uc, on="u").join(ivs, on="iv")
            .with_columns(logit_diff_delta=pl.col("logit_diff_delta").fill_nan(None)))
    circuits = pl.DataFrame()
    if circuit_frames:
        names = {i: u.name for i, u in enumerate(units)}
        circuits = pl.concat(circuit_frames).with_columns(
            unit=pl.col("unit").replace_strict(names, return_dtype=pl.String),
            other=pl.col("other").replace_strict(names, return_dtype=pl.String),
            intervention=pl.col("intervention").replace_strict(
                {i: str(iv) for i, iv in enumerate(interventions)}, return_dtype=pl.String))
    return rows, circuits, skipped


def activation_values(lake, model: str, corpora: list[str], units: list[Unit]
                      ) -> NeuronValues:
    """The activation statistics of the units' neurons, from the first of ``corpora``
    the activations stage has run on."""
    from circuit_atlas.lake.neurons import pack

    for corpus in corpora:
        stats = lake.optional_table("activation_stats", model, corpus)
        if stats is None:
            continue
        keys = pack(np.concatenate([u.layers for u in units]),
                    np.concatenate([u.neurons for u in units]))
        return neuron_values(stats.filter(
            pack(pl.col("layer"), pl.col("neuron")).is_in(keys.tolist())).collect())
    raise CircuitAtlasError(
        f"mean ablation and setting to a percentile read the activation statistics, and "
        f"{', '.join(corpora)} has none: run circuit-atlas activations --corpus "
        f"{corpora[0]}, or use --ablate zero")


def write_battery(lake, model, corpora: list[str], units: list[Unit],
                  params: InterventionsParams,
                  on_prompt: Callable[[int, int], None] | None = None) -> dict:
    """Run the battery and publish its tables under the corpus key of ``corpora``."""
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.lake.schemas import CIRCUIT_EFFECTS, INTERVENTIONS, NEURON_CAUSAL

    if model.adapter.dtype not in (torch.float32, torch.float64):
        raise CircuitAtlasError(
            f"interventions need a float32 or float64 model, got {model.dtype_name}: "
            "they are differences of logits, which half precision rounds away")
    interventions = battery_plan(params)
    values = (activation_values(lake, model.name, corpora, units)
              if any(iv.needs_stats for iv in interventions) else None)
    prompts = battery_prompts(lake, corpora, params.limit)
    if not prompts:
        raise CircuitAtlasError(f"no prompts in {', '.join(corpora)}")
    if not any(p.counterfactual for p in prompts):
        interventions = [iv for iv in interventions if iv.kind != "patch"]
        if not interventions:
            raise CircuitAtlasError("no prompt has a counterfactual to patch from, and "
                                    "nothing else was asked")
    start = time.perf_counter()
    rows, circuits, skipped = battery_rows(model, prompts, units, interventions, values,
                                           params.positions, params.batch, on_prompt)
    seconds = time.perf_counter() - start
    key = corpus_key(corpora)
    inputs = {"corpora": sorted(corpora), "units": [u.name for u in units],
              "interventions": [str(iv) for iv in interventions], "params": {
                  "positions": params.positions, "limit": params.limit},
              "model": model.name, "model_revision": model.revision,
              "model_shape": model.shape, "dtype": model.dtype_name}
    summary = summarise(rows)
    for name, spec, frame in (("interventions", INTERVENTIONS, rows),
                              ("neuron_causal", NEURON_CAUSAL, summary),
                              ("circuit_effects", CIRCUIT_EFFECTS,
                               circuit_summary(circuits) if len(circuits) else None)):
        if frame is None:
            continue
        version = lake.new_table_version(model.name, key, name)
        file = version.write(f"{name}.parquet",
                             frame.select(spec.schema.names).to_arrow(), spec)
        version.publish([file], inputs)
    return {"rows": len(rows), "prompts": len(prompts), "summary": summary,
            "skipped": skipped, "circuits": len(circuits), "seconds": seconds}


@dataclass
class InterventionsReport(Report):
    corpus: str
    units: int
    prompts: int
    interventions: int
    skipped_counterfactuals: int
    seconds: float  # the battery's, model loading left out
    summary: pl.DataFrame

    def __str__(self) -> str:
        lines = [f"interventions {self.corpus}: {self.units:,} units x {self.prompts:,} "
                 f"prompts, {self.interventions:,} interventions in {self.seconds:.1f} s "
                 f"({self.interventions / max(self.seconds, 1e-9):,.0f}/s)"]
        if self.skipped_counterfactuals:
            lines.append(f"  {self.skipped_counterfactuals} counterfactuals of another length "
                         "than their prompt not patched")
        lines += ["  " + line for line in causal_table(self.summary.head(SHOWN))]
        if len(self.summary) > SHOWN:
            lines.append(f"  ... {len(self.summary) - SHOWN} more units in neuron_causal")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "summary"}
        return {**out, "units_summary": self.summary.to_dicts()}


SHOWN = 8  # units a report prints


def run_interventions(lake, *, model, corpora, params: InterventionsParams | None = None,
                      cluster=None, progress: Progress | None = None) -> InterventionsReport:
    """The causal battery on the prompts of ``corpora``: the ``interventions``,
    ``neuron_causal`` and (two modules or more) ``circuit_effects`` tables. Units come
    from ``params`` (neurons, modules, the top of the neurons table, a label search),
    read from the reduced tables of the same corpora. Runs in this process (``cluster``
    unused)."""
    from circuit_atlas.compute.models import loaded
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.lake.units import select_units

    lake, params = open_lake(lake), params or InterventionsParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    model = loaded(model, params.device, params.dtype, "interventions", progress)
    key = corpus_key(corpora)
    reduced = key if lake.table_manifest(model.name, key, "neurons") else None
    units = select_units(lake, model.name, reduced, model.adapter.n_layers,
                         neurons=params.neurons, modules=params.modules,
                         method=params.method, top=params.top, label=params.label)
    out = write_battery(lake, model, corpora, units, params,
                        on_prompt=lambda d, t: progress.update("interventions", d, t))
    return InterventionsReport(key, len(units), out["prompts"], out["rows"], out["skipped"],
                               out["seconds"], out["summary"])
