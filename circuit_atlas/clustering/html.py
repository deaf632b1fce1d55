"""``export html``: one self-contained HTML file showing the clusters as a constellation.

The viewer (``viewer.html`` next to this module: plain canvas and DOM, no library, no
network at view time) gets the data inlined as JSON: the modules of every level, the
clustered neurons (id, layer, module path, flow, label, the context where it fires
most) and each neuron's strongest outgoing links. It draws one level at a time, never
all neurons at once: the top modules first (x: median layer, size: neurons); a click
opens a module's sub-modules, and a module without sub-modules shows its members (x:
layer), with links above a weight threshold. Search finds neurons by label or id.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from circuit_atlas.clustering.export import atlas_tables
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import neuron_label


def top_exemplars(lake: Lake, model: str, corpus: str, neurons: pl.DataFrame,
                  tokenizer: Any = None) -> list[str | None]:
    """Each neuron's strongest context, activating tokens marked (None without
    exemplars)."""
    from circuit_atlas.analysis.exemplars import exemplar_dicts, read_exemplars

    found: dict[tuple[int, int], str] = {}
    for (layer,), part in neurons.group_by("layer"):
        rows = read_exemplars(lake, model, corpus, layer, part["neuron"].to_list(), 1)
        if rows is None:
            return [None] * len(neurons)
        rows = rows.filter(pl.col("sign") == 1)
        for n, e in zip(rows["neuron"], exemplar_dicts(rows, tokenizer), strict=True):
            found[(layer, n)] = f"{e['activation']:+.3g}: {e['text']}"
    return [found.get(k) for k in zip(neurons["layer"], neurons["neuron"], strict=True)]


def viewer_data(lake: Lake, model: str, corpus: str, method: str = "infomap",
                links_per_neuron: int = 5, min_count: int = 1,
                tokenizer: Any = None) -> dict[str, Any]:
    tables = atlas_tables(lake, model, corpus, method)
    neurons = tables["neurons"].filter(pl.col("cluster_path").is_not_null()).sort(
        "layer", "neuron")
    if neurons.is_empty():
        raise CircuitAtlasError(f"no {method} clustering to show; run: circuit-atlas cluster")
    ids = neurons.with_row_index("i").select("i", "layer", "neuron")
    edges = (tables["edges"].filter(pl.col("count") >= min_count)
             .join(ids.rename({"i": "src", "layer": "src_layer", "neuron": "src_neuron"}),
                   on=["src_layer", "src_neuron"])
             .join(ids.rename({"i": "tgt", "layer": "tgt_layer", "neuron": "tgt_neuron"}),
                   on=["tgt_layer", "tgt_neuron"])
             .sort(["src", "mean_abs_weight"], descending=[False, True])
             .filter(pl.int_range(pl.len()).over("src") < links_per_neuron))
    modules = tables["clusters"].sort("level", "flow", descending=[False, True])
    shape = json.loads(tables["metadata"].filter(pl.col("key") == "model_shape")["value"][0])
    labelled = neurons["label"].is_not_null().sum()
    return {
        "title": f"{model} - {corpus}",
        "subtitle": f"{method}: {len(neurons):,} neurons in {len(modules):,} modules, "
                    f"{labelled:,} labelled",
        "n_layers": shape["n_layers"],
        "modules": [{"path": r["cluster_path"], "level": r["level"], "size": r["size"],
                     "flow": r["flow"], "layer_min": r["layer_min"],
                     "layer_max": r["layer_max"], "median_layer": r["median_layer"],
                     "top": r["top_members"], "label": r.get("label")}
                    for r in modules.iter_rows(named=True)],
        "neurons": {
            "id": [neuron_label(a, b) for a, b in zip(neurons["layer"], neurons["neuron"],
                                                 strict=True)],
            "layer": neurons["layer"].to_list(), "path": neurons["cluster_path"].to_list(),
            "flow": [round(f, 9) for f in neurons["infomap_flow"].to_list()],
            "label": neurons["label"].to_list(),
            "exemplar": top_exemplars(lake, model, corpus, neurons, tokenizer)},
        "edges": {"src": edges["src"].to_list(), "tgt": edges["tgt"].to_list(),
                  "w": [round(w, 5) for w in edges["mean_weight"].to_list()]},
    }


def export_html(lake: Lake, model: str, corpus: str, path: str, method: str = "infomap",
                **kwargs: Any) -> dict[str, int]:
    """Write the viewer with the atlas inlined to ``path``."""
    from circuit_atlas.views import write_html

    data = viewer_data(lake, model, corpus, method, **kwargs)
    write_html("circuit_atlas.clustering", "viewer.html", data, path)
    return {"neurons": len(data["neurons"]["id"]), "modules": len(data["modules"]),
            "links": len(data["edges"]["src"])}
