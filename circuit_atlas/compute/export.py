"""One stored graph as circuit-tracer / Neuronpedia graph JSON, to open in their viewers.

Their vocabulary is kept so the viewers render it: MLP neurons take the feature
node type (``cross layer transcoder``), remainder nodes the error node type,
constant nodes (attention biases) sit with the embeddings,
logits sit at layer ``n_layers + 1``. A node's ``clerp`` says what it really is
(``L12/N345``).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import REMAINDER_INDEX, Lake
from circuit_atlas.lake.neurons import neuron_label


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(layer: int, index: int, pos: int, n_layers: int, decode, **extra) -> dict[str, Any]:
    if layer == -1 and index == REMAINDER_INDEX:  # what attention biases add there
        nid, kind, shown, feature = f"E_bias_{pos}", "embedding", "E", pos
        js, clerp = f"E_bias-{pos}", "constant (attention biases)"
    elif layer == -1:
        nid, kind, shown, feature = f"E_{index}_{pos}", "embedding", "E", pos
        js, clerp = f"E_{index}-{pos}", f"token {decode(index)!r}"
    elif layer == n_layers:
        shown = str(n_layers + 1)
        nid, kind, feature = f"{shown}_{index}_{pos}", "logit", index
        js, clerp = f"L_{index}-{pos}", f'Output "{decode(index)}" (p={extra["token_prob"]:.3f})'
    elif index == REMAINDER_INDEX:
        nid, kind, shown, feature = f"{layer}_-1_{pos}", "mlp reconstruction error", str(layer), -1
        js, clerp = f"{layer}_-1-{pos}", f"L{layer} other neurons"
    else:
        nid, kind, shown = f"{layer}_{index}_{pos}", "cross layer transcoder", str(layer)
        feature, js, clerp = _cantor(layer, index), f"{layer}_{index}-0", neuron_label(layer, index)
    return {"node_id": nid, "feature": feature, "layer": shown, "ctx_idx": pos,
            "feature_type": kind, "jsNodeId": js, "clerp": clerp, "run_idx": 0,
            "reverse_ctx_idx": 0, **extra}


def graph_json(lake: Lake, model: str, corpus: str, prompt_id: str, decode) -> dict[str, Any]:
    """The viewer JSON of the stored graph of ``prompt_id`` (``decode``: token id -> text)."""
    graphs = lake.scan("graphs", model=model, corpus=corpus).filter(
        pl.col("prompt_id") == prompt_id).collect()
    if graphs.height == 0:
        raise CircuitAtlasError(
            f"no graph for prompt {prompt_id} of corpus {corpus!r} and model {model!r} "
            f"in {lake.url}")
    g = graphs.row(0, named=True)
    gid = g["graph_id"]
    nodes = lake.scan("graph_nodes", model=model, corpus=corpus).filter(
        pl.col("graph_id") == gid).collect()
    edges = lake.scan("graph_edges", model=model, corpus=corpus).filter(
        pl.col("graph_id") == gid).collect()
    n_layers = int(nodes["layer"].max())  # logits are always kept, at layer n_layers
    text = lake.scan("prompts", corpus=corpus).filter(
        pl.col("prompt_id") == prompt_id).select("text").collect()
    probs = dict(zip(g["target_tokens"], g["target_probs"], strict=True))
    top = g["target_tokens"][0] if g["target_tokens"] else None
    out_nodes, ids = [], {}
    for n in nodes.iter_rows(named=True):
        extra = {"influence": n["influence"], "activation": n["activation"]}
        if n["layer"] == n_layers:
            extra = {"token_prob": probs.get(n["neuron"], 0.0),
                     "is_target_logit": n["neuron"] == top}
        node = _node(n["layer"], n["neuron"], n["position"], n_layers, decode, **extra)
        ids[(n["layer"], n["neuron"], n["position"])] = node["node_id"]
        out_nodes.append(node)
    links = [
        {"source": ids[(e["src_layer"], e["src_neuron"], e["src_pos"])],
         "target": ids[(e["tgt_layer"], e["tgt_neuron"], e["tgt_pos"])],
         "weight": e["weight"]}
        for e in edges.iter_rows(named=True)
    ]
    return {
        "metadata": {
            "slug": f"{corpus}-{prompt_id}", "scan": model, "transcoder_list": [],
            "prompt_tokens": [decode(t) for t in g["input_tokens"]],
            "prompt": text["text"][0] if text.height else "", "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }
