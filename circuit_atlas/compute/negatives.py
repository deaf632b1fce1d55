"""Negatives for label scoring: contexts on which a neuron stays silent, hard ones
(they activate its partners) and random ones.

A label scorer that tells a neuron's activating contexts from random text rewards any
label of the right topic; delphi's users report detection F1 falling ~10% once the
negatives are hard. A hard negative here is a held-out top exemplar of a *partner* (a
neuron of the same cluster module, else one that fires in the same graphs, else
another neuron of the same layer when the lake has neither table) on which this
neuron stays below ``NOT_ACTIVE`` of its largest activation at every counted token
(for a label of its negative side: above ``NOT_ACTIVE`` of its most negative one).
Random negatives are held-out windows drawn per neuron (the quantile samples hold
too few near-zero contexts once the held-out split has taken its fifth). Finding out
whether a window is a negative takes one replay of it (``compute.activations.replay``),
reading only the neurons asked about.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from circuit_atlas.compute.activations import Window, replay
from circuit_atlas.compute.models import LoadedModel
from circuit_atlas.compute.params import NegativesParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.schemas import NEGATIVES
from circuit_atlas.lake.splits import NOT_ACTIVE, held_out
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

SOURCES = ("cluster", "cooccurrence", "layer", "random")


def partners(lake: Lake, model: str, atlas: str, targets: pl.DataFrame, n: int,
             candidates: pl.DataFrame) -> pl.DataFrame:
    """Up to ``n`` partners per target neuron (``targets``: layer, neuron), among the
    neurons that have held-out exemplars (``candidates``): the members of its deepest
    cluster module by flow, then its co-occurring neurons by NPMI, then (only for a
    target with neither) other neurons of its layer, chosen by a hash so every target
    gets different ones. Columns: layer, neuron, partner_layer, partner_neuron, source."""
    keys = ["layer", "neuron"]
    have = candidates.select(partner_layer="layer", partner_neuron="neuron").unique()
    found = []
    assigned = lake.optional_table("cluster_assignments", model, atlas)
    if assigned is not None:
        a = assigned.filter(pl.col("method") == "infomap").select(
            "layer", "neuron", "cluster_path", "flow").collect()
        found.append(targets.join(a.select(*keys, "cluster_path"), on=keys).join(
            a.rename({"layer": "partner_layer", "neuron": "partner_neuron"}),
            on="cluster_path").filter(
            (pl.col("partner_layer") != pl.col("layer"))
            | (pl.col("partner_neuron") != pl.col("neuron")))
            .sort("flow", descending=True).select(
            *keys, "partner_layer", "partner_neuron", source=pl.lit("cluster")))
    co = lake.optional_table("cooccurrence", model, atlas)
    if co is not None:
        found.append(targets.join(co.collect(), on=keys).sort("npmi", descending=True).select(
            *keys, partner_layer="other_layer", partner_neuron="other_neuron",
            source=pl.lit("cooccurrence")))
    schema = {"layer": pl.Int16, "neuron": pl.Int32, "partner_layer": pl.Int16,
              "partner_neuron": pl.Int32, "source": pl.String}
    known = pl.concat([f.cast(schema) for f in found]) if found else pl.DataFrame(
        schema=schema)
    known = known.join(have, on=["partner_layer", "partner_neuron"]).unique(
        [*keys, "partner_layer", "partner_neuron"], keep="first", maintain_order=True)
    alone = targets.join(known.select(keys).unique(), on=keys, how="anti")
    if not alone.is_empty():
        same = alone.join(have.rename({"partner_layer": "layer"}), on="layer").filter(
            pl.col("partner_neuron") != pl.col("neuron")).with_columns(
            partner_layer=pl.col("layer"), source=pl.lit("layer"),
            _order=pl.struct("neuron", "partner_neuron").hash(seed=7)).sort("_order").drop(
            "_order")
        known = pl.concat([known, same.select(known.columns).cast(schema)])
    return known.group_by(keys, maintain_order=True).head(n)


def candidate_entries(partnered: pl.DataFrame, exemplars: pl.DataFrame, per_partner: int,
                      own: pl.DataFrame) -> pl.DataFrame:
    """The windows to try for each target: its partners' ``per_partner`` strongest
    held-out top exemplars (``exemplars``: layer, neuron, rank, window_id), leaving out
    windows among the target's own exemplars (``own``)."""
    tops = exemplars.filter(pl.col("rank") < per_partner).select(
        partner_layer="layer", partner_neuron="neuron", window_id="window_id", rank="rank")
    return (partnered.join(tops, on=["partner_layer", "partner_neuron"])
            .join(own, on=["layer", "neuron", "window_id"], how="anti")
            .unique(["layer", "neuron", "window_id"], keep="first", maintain_order=True)
            .select("layer", "neuron", "partner_layer", "partner_neuron", "source",
                    "window_id", "rank"))


def random_entries(targets: pl.DataFrame, pool: np.ndarray, own: pl.DataFrame, n: int
                   ) -> pl.DataFrame:
    """``n`` windows of ``pool`` (held-out window ids) per target, drawn by a seed from
    the neuron, leaving out windows among its own exemplars (``own``)."""
    from circuit_atlas.lake.ids import params_hash

    rows = []
    for layer, neuron in targets.iter_rows():
        rng = np.random.default_rng(int(params_hash({"negatives": [layer, neuron]}), 16))
        pick = pool[rng.permutation(len(pool))[:n]] if len(pool) else pool
        rows.append(pl.DataFrame({"window_id": pick, "rank": np.arange(len(pick))},
                                 schema={"window_id": pl.Int64, "rank": pl.UInt32}
                                 ).with_columns(layer=pl.lit(layer, pl.Int16),
                                                neuron=pl.lit(neuron, pl.Int32)))
    out = pl.concat(rows) if rows else pl.DataFrame(
        schema={"window_id": pl.Int64, "rank": pl.UInt32, "layer": pl.Int16,
                "neuron": pl.Int32})
    return out.join(own, on=["layer", "neuron", "window_id"], how="anti").select(
        "layer", "neuron", partner_layer=pl.lit(-1, pl.Int16),
        partner_neuron=pl.lit(-1, pl.Int32), source=pl.lit("random"), window_id="window_id",
        rank="rank")


def negative_rows(model: LoadedModel, windows: dict[int, Window], entries: pl.DataFrame,
                  maxima: pl.DataFrame, keep: int, batch_tokens: int = 4096,
                  on_tokens=None) -> pa.Table:
    """Replay the entries' windows, reading each entry's neuron at every token, and keep
    up to ``keep`` per neuron and side, hard and random each: where ``up``, windows on
    which it stays below ``NOT_ACTIVE`` of its largest activation at every counted token,
    where ``down``, above ``NOT_ACTIVE`` of its most negative one (``maxima``: layer,
    neuron, max, min, up, down)."""
    if entries.is_empty():
        return NEGATIVES.schema.empty_table()
    wid = entries["window_id"].to_numpy()
    got = replay(model, [windows[w] for w in np.unique(wid).tolist()], wid,
                 entries["layer"].to_numpy(), entries["neuron"].to_numpy(), batch_tokens,
                 on_tokens)
    peak, trough, position = [], [], []
    for e, w in enumerate(wid.tolist()):
        acts = got.values[got.offsets[e]:got.offsets[e + 1]]
        skip = windows[w].skip
        counted = acts[skip:] if len(acts) > skip else acts
        p = int(np.argmax(counted)) + (skip if len(acts) > skip else 0)
        peak.append(float(acts[p]))
        trough.append(float(counted.min(initial=0.0)))
        position.append(p)
    rows = entries.with_columns(
        activation=pl.Series(peak, dtype=pl.Float32), position=pl.Series(position,
                                                                         dtype=pl.Int32),
        _trough=pl.Series(trough, dtype=pl.Float32),
        _entry=pl.int_range(pl.len())).join(maxima, on=["layer", "neuron"])
    # silent on each side its labels speak of; a side the neuron never reaches (max 0:
    # never above zero) is silent everywhere
    up = pl.col("up") & ((pl.col("max") <= 0)
                         | (pl.col("activation") < NOT_ACTIVE * pl.col("max")))
    down = pl.col("down") & ((pl.col("min") >= 0)
                             | (pl.col("_trough") > NOT_ACTIVE * pl.col("min")))
    group = ["layer", "neuron", "hard"]
    kept = rows.with_columns(_up=up, _down=down, hard=pl.col("source") != "random").sort(
        "layer", "neuron", "hard", "rank", "partner_layer", "partner_neuron").with_columns(
        _up_rank=pl.col("_up").cum_sum().over(group),
        _down_rank=pl.col("_down").cum_sum().over(group)).filter(
        (pl.col("_up") & (pl.col("_up_rank") <= keep))
        | (pl.col("_down") & (pl.col("_down_rank") <= keep)))
    index = kept["_entry"].to_numpy()
    acts = [got.values[got.offsets[e]:got.offsets[e + 1]].tolist() for e in index]
    return pa.table({
        "layer": kept["layer"].to_arrow(), "neuron": kept["neuron"].to_arrow(),
        "source": kept["source"].to_arrow(),
        "partner_layer": kept["partner_layer"].to_arrow(),
        "partner_neuron": kept["partner_neuron"].to_arrow(),
        "activation": kept["activation"].to_arrow(), "window_id": kept["window_id"].to_arrow(),
        "prompt_id": pa.array([windows[w].doc for w in kept["window_id"].to_list()]),
        "start": pa.array([windows[w].start for w in kept["window_id"].to_list()], pa.int32()),
        "position": kept["position"].to_arrow(),
        "acts": pa.array(acts, pa.list_(pa.float32())),
    }, schema=NEGATIVES.schema)


def scored_targets(lake: Lake, model: str, atlas: str, every_neuron: bool,
                   exemplars: pl.DataFrame) -> pl.DataFrame:
    """The neurons to find negatives for: those with an input, negative or prior label
    (the labels a scorer reads contexts for), or with ``every_neuron`` all that have
    exemplars. Columns: layer, neuron, up (whether it has a label of what drives it up:
    its negatives must stay low), down (a label of what drives it most negative: they
    must stay above its negative side); both with ``every_neuron``."""
    from circuit_atlas.lake.labels import ACTIVATION_PASSES, known_labels, latest_ok

    if every_neuron:
        return exemplars.select("layer", "neuron").unique().sort("layer", "neuron").with_columns(
            up=pl.lit(True), down=pl.lit(True))
    labels = latest_ok(known_labels(lake, model, atlas))
    mine = None if labels is None else labels.filter(pl.col("pass").is_in(ACTIVATION_PASSES))
    if mine is None or mine.is_empty():
        raise CircuitAtlasError(
            f"no input, negative or prior labels in {atlas!r} to find negatives for: label "
            "first (circuit-atlas label --pass input) or pass --every-neuron")
    return mine.group_by(pl.col("layer").cast(pl.Int16), pl.col("neuron").cast(pl.Int32)).agg(
        up=(pl.col("pass") != "negative").any(), down=(pl.col("pass") == "negative").any()
    ).sort("layer", "neuron")


@dataclass
class NegativesReport(Report):
    model: str
    corpus: str
    neurons: int
    tried: int
    kept: int
    sources: dict[str, int]
    seconds: float

    def __str__(self) -> str:
        by = ", ".join(f"{n:,} via {s}" for s, n in self.sources.items() if n)
        return (f"negatives {self.corpus}: {self.kept:,} kept of {self.tried:,} windows "
                f"tried for {self.neurons:,} neuron(s) ({by or 'none'}); {self.seconds:.1f} s")


def run_negatives(lake: Lake | str, *, model: str | LoadedModel,
                  corpora: str | list[str] | None = None,
                  params: NegativesParams | None = None, cluster=None,
                  progress: Progress | None = None) -> NegativesReport:
    """Find negatives (hard and random) for the labelled neurons of an atlas
    (``corpora``: its corpora, default the only reduced set) and write the ``negatives``
    table of each corpus; a rerun replaces it."""
    from circuit_atlas.analysis.exemplars import corpora_of
    from circuit_atlas.compute.workers import compute_session
    from circuit_atlas.lake.derived import TableVersion
    from circuit_atlas.names import model_name

    t0 = time.perf_counter()
    lake, params = open_lake(lake), params or NegativesParams()
    progress = progress or Progress()
    name = model.name if isinstance(model, LoadedModel) else model_name(model)
    atlas = lake.reduced_corpus(name, as_corpora(corpora))
    sources = dict.fromkeys(SOURCES, 0)
    neurons = tried = kept = 0
    with compute_session(model, params.device, params.dtype, "activations", None,
                         progress) as (_, ready):
        for corpus in corpora_of(atlas):
            ex = lake.optional_table("exemplars", name, corpus)
            win = lake.optional_table("exemplar_windows", name, corpus)
            stats = lake.optional_table("activation_stats", name, corpus)
            if ex is None or win is None or stats is None:
                raise CircuitAtlasError(f"no exemplars of {corpus!r} yet: run circuit-atlas "
                                        f"activations --corpus {corpus}")
            mine = (pl.col("sign") == 1) & held_out(pl.col("prompt_id"))
            if params.layers:
                mine &= pl.col("layer").is_in(list(params.layers))
            exemplars = ex.filter(mine).select(
                "layer", "neuron", "window_id", "rank").collect().with_columns(
                rank=pl.col("rank").rank("ordinal").over("layer", "neuron") - 1)
            signed = scored_targets(lake, name, atlas, params.every_neuron, exemplars)
            if params.layers:
                signed = signed.filter(pl.col("layer").is_in(list(params.layers)))
            targets = signed.select("layer", "neuron")
            pool = win.filter(held_out(pl.col("prompt_id"))).select("window_id").collect()[
                "window_id"].to_numpy()
            own = ex.filter(pl.col("layer").is_in(targets["layer"].unique().implode())).select(
                "layer", "neuron", "window_id").unique().collect()
            entries = pl.concat([
                candidate_entries(partners(lake, name, atlas, targets, params.partners,
                                           exemplars), exemplars, params.per_partner, own),
                random_entries(targets, pool, own, 2 * params.keep)])
            wanted = entries["window_id"].unique()
            windows = {w: Window(w, p, s, tuple(t), k) for w, p, s, k, t in win.filter(
                pl.col("window_id").is_in(wanted.implode())).select(
                "window_id", "prompt_id", "start", "skip", "token_ids").collect().iter_rows()}
            total = sum(len(windows[w].tokens) for w in entries["window_id"].to_list()
                        if w in windows)
            done = 0

            def tick(n: int, corpus=corpus, total=total) -> None:
                nonlocal done
                done += n
                progress.update(f"negatives {corpus}", done, total)

            maxima = stats.select("layer", "neuron", "max", "min").collect().join(
                signed, on=["layer", "neuron"])
            rows = negative_rows(ready, windows, entries, maxima, params.keep,
                                 params.batch_tokens, tick)
            version = TableVersion(lake, name, corpus, "negatives")
            part = version.write("negatives.parquet", rows, NEGATIVES)
            version.publish([part], {"atlas": atlas, "params": {
                "partners": params.partners, "per_partner": params.per_partner,
                "keep": params.keep, "not_active": NOT_ACTIVE}})
            neurons = max(neurons, len(targets))
            tried += len(entries)
            kept += rows.num_rows
            for s, n in pl.from_arrow(rows.select(["source"]))["source"].value_counts(
                    ).iter_rows():
                sources[s] += n
    return NegativesReport(name, atlas, neurons, tried, kept, sources,
                           time.perf_counter() - t0)
