"""Units of the causal battery: single neurons and whole cluster modules, named once.

A unit is what an intervention acts on as a whole: one neuron (``L12/N345``) or every
member of a cluster module at any level (``infomap:4:2``, its members at any depth),
chosen by id, by a module path, from the top of the neurons table, or by a label search.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake.neurons import neuron_label, parse_neuron


@dataclass(frozen=True)
class Unit:
    """Neurons intervened on together."""

    name: str  # "L12/N345" or "infomap:4:2"
    kind: str  # "neuron" or "module"
    layers: tuple[int, ...]
    neurons: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.neurons)

    @property
    def single(self) -> tuple[int, int] | None:
        """(layer, neuron) of a one-neuron unit, else None."""
        return (self.layers[0], self.neurons[0]) if self.kind == "neuron" else None


def neuron_unit(layer: int, neuron: int) -> Unit:
    return Unit(neuron_label(layer, neuron), "neuron", (int(layer),), (int(neuron),))


def _units_of(pairs: Iterable[tuple[int, int]]) -> list[Unit]:
    return [neuron_unit(layer, neuron) for layer, neuron in pairs]


def module_units(lake, model: str, corpus: str, paths: Iterable[str], method: str
                 ) -> list[Unit]:
    """The modules at ``paths`` ("4", "4:2") of ``method``'s clustering, as units."""
    table = lake.optional_table("cluster_assignments", model, corpus)
    paths = [str(p).strip() for p in paths]
    if not paths:
        return []
    if table is None:
        raise CircuitAtlasError(f"no clustering of {model!r} / {corpus!r} to take modules "
                                "from; run: circuit-atlas cluster")
    rows = table.filter(pl.col("method") == method).select(
        "layer", "neuron", "cluster_path").collect()
    out = []
    for path in paths:
        inside = rows.filter((pl.col("cluster_path") == path)
                             | pl.col("cluster_path").str.starts_with(path + ":"))
        if inside.is_empty():
            raise CircuitAtlasError(f"no module {path!r} in the {method} clustering of "
                                    f"{corpus!r} (paths look like 4 or 4:2)")
        inside = inside.sort("layer", "neuron")
        out.append(Unit(f"{method}:{path}", "module", tuple(inside["layer"].to_list()),
                        tuple(inside["neuron"].to_list())))
    return out


def top_units(lake, model: str, corpus: str, n: int, n_layers: int) -> list[Unit]:
    """The ``n`` MLP neurons in the most graphs (ties by relevance)."""
    if n <= 0:
        return []
    rows = (lake.table("neurons", model, corpus)
            .filter((pl.col("layer") >= 0) & (pl.col("layer") < n_layers))
            .sort(["graph_count", "score_abs_mean", "layer", "neuron"],
                  descending=[True, True, False, False])
            .head(n).select("layer", "neuron").collect())
    return _units_of(rows.iter_rows())


def label_units(lake, model: str, corpus: str, text: str | None) -> list[Unit]:
    """Every neuron whose current label (input or output) contains ``text``."""
    if not text:
        return []
    from circuit_atlas.lake.labels import current_labels

    labels = current_labels(lake, model, corpus)
    if labels is None:
        raise CircuitAtlasError(f"no labels for {model!r} / {corpus!r} to search; run: "
                                "circuit-atlas label")
    hits = (labels.filter(pl.col("label").str.to_lowercase().str.contains(
        text.lower(), literal=True)).select("layer", "neuron").unique()
            .sort("layer", "neuron"))
    if hits.is_empty():
        raise CircuitAtlasError(f"no current label contains {text!r}")
    return _units_of(hits.iter_rows())


def select_units(lake, model: str, corpus: str | None, n_layers: int, *,
                 neurons: Iterable[str] = (), modules: Iterable[str] = (),
                 method: str = "infomap", top: int = 0, label: str | None = None
                 ) -> list[Unit]:
    """The units named by every source, each once, in the order given."""
    units = _units_of(parse_neuron(n) for n in neurons)
    for u in units:
        if not 0 <= u.layers[0] < n_layers:
            raise CircuitAtlasError(f"{u.name}: layer out of range 0..{n_layers - 1}")
    if (modules or top or label) and corpus is None:
        raise CircuitAtlasError("--module, --top and --label read the reduced tables: "
                                "reduce the corpus first (circuit-atlas reduce)")
    if corpus is not None:
        units += module_units(lake, model, corpus, modules, method)
        units += top_units(lake, model, corpus, top, n_layers)
        units += label_units(lake, model, corpus, label)
    seen, out = set(), []
    for u in units:
        if u.name not in seen:
            seen.add(u.name)
            out.append(u)
    if not out:
        raise CircuitAtlasError("no units to intervene on: give --neuron L12/N345, "
                                "--module PATH, --top N or --label TEXT")
    return out
