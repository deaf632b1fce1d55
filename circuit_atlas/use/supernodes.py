"""``trace``: the attribution graph of a new prompt, its neurons grouped into
supernodes by the atlas's clusters.

circuit-tracer leaves grouping a graph's features into supernodes to the person
reading it ("no methods to do automated supernode grouping"); the atlas has a
clustering of every neuron, so a new prompt's graph can arrive grouped. A neuron node
joins the supernode of its cluster module at ``level`` (the first ``level`` parts of
its path; a shallower one keeps its own), named by the module's label where
``label`` has named it; a module with one node in the graph is no supernode.

How much a grouping keeps, scored two ways:

* ``coverage``: the share of the graph's neuron influence (|influence| summed) that
  sits in supernodes;
* ``links_kept``: the share of the graph's |link weight| between different groups
  (a node outside every supernode is a group of its own): what the supernode graph
  still draws; the rest runs inside a supernode and is folded away.

The graph goes out as circuit-tracer / Neuronpedia graph JSON
(``compute.export.graph_json``) with the supernodes in ``qParams.supernodes`` (each a
list: its name, then its node ids) and their members pinned, so it opens grouped in
their viewers; and as our own self-contained HTML view of the supernode graph
(``trace_view.html`` beside this module): each supernode one node, the other nodes
grouped by kind (a token's embedding, a logit, the strongest ungrouped neurons one by
one, the rest as "other neurons" and "errors" of their layer), the strongest links
between groups summed, with the members of a clicked group listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from circuit_atlas.stage import Report

NEURON_TYPE = "cross layer transcoder"  # how graph_json marks an MLP neuron node


def neuron_of(node: dict[str, Any]) -> tuple[int, int] | None:
    """(layer, neuron) of a graph JSON node that is an MLP neuron, else None."""
    if node.get("feature_type") != NEURON_TYPE:
        return None
    layer, index, _ = node["node_id"].split("_")
    return int(layer), int(index)


@dataclass
class Grouping:
    supernodes: list[list[str]]  # [name, node id, node id, ...]
    coverage: float | None
    links_kept: float | None
    grouped: int  # neuron nodes in supernodes
    neurons: int  # neuron nodes in the graph
    modules: dict[str, str] = field(default_factory=dict)  # supernode name -> module path


def group(graph: dict[str, Any], paths: dict[tuple[int, int], str], level: int,
          names: dict[str, str] | None = None, method: str = "infomap") -> Grouping:
    """Group the neuron nodes of ``graph`` (graph JSON) by their module at ``level``
    (``paths``: (layer, neuron) -> cluster path), ``names``: module path -> label."""
    if level < 1:
        raise ValueError(f"level must be at least 1, got {level}")
    names = names or {}
    members: dict[str, list[str]] = {}
    influence: dict[str, float] = {}
    total = 0.0
    neurons = 0
    for node in graph["nodes"]:
        key = neuron_of(node)
        if key is None:
            continue
        neurons += 1
        weight = abs(node.get("influence") or 0.0)
        total += weight
        path = paths.get(key)
        if path is None:
            continue
        module = ":".join(path.split(":")[:level])
        members.setdefault(module, []).append(node["node_id"])
        influence[module] = influence.get(module, 0.0) + weight
    kept = {m: ids for m, ids in members.items() if len(ids) >= 2}
    order = sorted(kept, key=lambda m: (-influence[m], m))
    supernodes, modules, home = [], {}, {}
    for m in order:
        label = names.get(m)
        name = f"{method} {m}" + (f": {label}" if label else "")
        supernodes.append([name, *kept[m]])
        modules[name] = m
        home.update(dict.fromkeys(kept[m], m))
    grouped = sum(len(ids) for ids in kept.values())
    coverage = sum(influence[m] for m in kept) / total if total > 0 else None
    weight_all = weight_between = 0.0
    for link in graph["links"]:
        w = abs(link["weight"])
        weight_all += w
        a, b = home.get(link["source"]), home.get(link["target"])
        if a is None or a != b:
            weight_between += w
    links_kept = weight_between / weight_all if weight_all > 0 else None
    return Grouping(supernodes, coverage, links_kept, grouped, neurons, modules)


def with_supernodes(graph: dict[str, Any], grouping: Grouping) -> dict[str, Any]:
    """``graph`` with the grouping in ``qParams`` (supernodes; their members pinned)
    and its scores in ``metadata``."""
    q = dict(graph.get("qParams") or {})
    q["supernodes"] = grouping.supernodes
    pinned = list(q.get("pinnedIds") or [])
    q["pinnedIds"] = pinned + [n for s in grouping.supernodes for n in s[1:] if n not in pinned]
    meta = dict(graph["metadata"])
    meta["supernode_grouping"] = {"coverage": grouping.coverage,
                                  "links_kept": grouping.links_kept,
                                  "grouped_neurons": grouping.grouped,
                                  "neurons": grouping.neurons}
    return {**graph, "metadata": meta, "qParams": q}


SHOWN_NEURONS = 12  # ungrouped neurons drawn one by one, by |influence|
SHOWN_LINKS = 80  # links between groups drawn, by |summed weight|


def ungrouped_neurons(graph: dict[str, Any], grouping: Grouping) -> list[dict[str, Any]]:
    """The graph's neuron nodes in no supernode, strongest |influence| first."""
    grouped = {n for s in grouping.supernodes for n in s[1:]}
    return sorted((n for n in graph["nodes"] if n["node_id"] not in grouped
                   and neuron_of(n) is not None),
                  key=lambda n: (-abs(n.get("influence") or 0.0), n["node_id"]))


def view_groups(graph: dict[str, Any], grouping: Grouping,
                shown_neurons: int = SHOWN_NEURONS) -> dict[str, str]:
    """node id -> the group it is drawn in: its supernode; an embedding, logit or one
    of the ``shown_neurons`` strongest ungrouped neurons alone; the other ungrouped
    neurons and the error nodes together per layer."""
    home = {n: s[0] for s in grouping.supernodes for n in s[1:]}
    alone = {n["node_id"] for n in ungrouped_neurons(graph, grouping)[:shown_neurons]}
    out = {}
    for n in graph["nodes"]:
        nid, kind = n["node_id"], n["feature_type"]
        if nid in home:
            out[nid] = home[nid]
        elif kind == "embedding":
            out[nid] = f"token {n['ctx_idx']}"
        elif kind == "logit":
            out[nid] = n["clerp"]
        elif nid in alone:
            out[nid] = n["clerp"] + f" @{n['ctx_idx']}"
        elif kind == NEURON_TYPE:
            out[nid] = f"L{n['layer']} other neurons"
        else:
            out[nid] = f"L{n['layer']} errors"
    return out


def supernode_graph(graph: dict[str, Any], grouping: Grouping,
                    shown_neurons: int = SHOWN_NEURONS, shown_links: int = SHOWN_LINKS
                    ) -> dict[str, Any]:
    """What the HTML view draws: the groups (name, kind, members, mean layer and
    position, summed |influence|) and the ``shown_links`` strongest links between
    groups (weights summed over their members' links), with the prompt's tokens and
    the grouping's scores."""
    where = view_groups(graph, grouping, shown_neurons)
    supers = {s[0]: grouping.modules[s[0]] for s in grouping.supernodes}
    groups: dict[str, dict[str, Any]] = {}
    for n in graph["nodes"]:
        name = where[n["node_id"]]
        g = groups.setdefault(name, {
            "name": name, "module": supers.get(name), "members": [], "influence": 0.0,
            "kind": "supernode" if name in supers else n["feature_type"]})
        g["members"].append({"id": n["node_id"], "name": n["clerp"], "position": n["ctx_idx"],
                             "influence": n.get("influence")})
        g["influence"] += abs(n.get("influence") or 0.0)
    layers = {n["node_id"]: int(n["layer"]) if n["feature_type"] != "embedding" else 0
              for n in graph["nodes"]}
    for g in groups.values():
        ids = [m["id"] for m in g["members"]]
        g["layer"] = sum(layers[i] for i in ids) / len(ids)
        g["position"] = sum(m["position"] for m in g["members"]) / len(ids)
    summed: dict[tuple[str, str], float] = {}
    for link in graph["links"]:
        a, b = where[link["source"]], where[link["target"]]
        if a != b:
            summed[(a, b)] = summed.get((a, b), 0.0) + link["weight"]
    strongest = sorted(summed.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:shown_links]
    return {"prompt": graph["metadata"].get("prompt", ""),
            "tokens": graph["metadata"].get("prompt_tokens", []),
            "scores": {"coverage": grouping.coverage, "links_kept": grouping.links_kept,
                       "grouped_neurons": grouping.grouped, "neurons": grouping.neurons},
            "groups": sorted(groups.values(), key=lambda g: (-g["influence"], g["name"])),
            "links": [{"source": a, "target": b, "weight": w} for (a, b), w in strongest],
            "links_between_groups": len(summed)}


def write_view(view: dict[str, Any], path: str, title: str) -> None:
    """The supernode graph as one self-contained HTML file (no network at view time)."""
    from circuit_atlas.views import write_html

    write_html("circuit_atlas.use", "trace_view.html", {**view, "title": title}, path)


@dataclass
class TraceReport(Report):
    prompt_id: str
    out: str
    nodes: int
    links: int
    grouping: Grouping
    html: str | None = None

    def __str__(self) -> str:
        g = self.grouping
        cov = "-" if g.coverage is None else f"{g.coverage:.1%}"
        kept = "-" if g.links_kept is None else f"{g.links_kept:.1%}"
        return (f"trace {self.prompt_id}: {self.nodes:,} nodes, {self.links:,} links; "
                f"{len(g.supernodes):,} supernode(s) hold {g.grouped:,} of {g.neurons:,} "
                f"neurons and {cov} of their influence; the supernode graph keeps {kept} "
                f"of the link weight; {self.out} (circuit-tracer / Neuronpedia graph JSON)"
                + (f", {self.html} (the supernode graph)" if self.html else ""))


def atlas_modules(lake: Any, model: str, corpus: str, method: str
                  ) -> tuple[dict[tuple[int, int], str], dict[str, str]]:
    """Every clustered neuron's module path, and each named module's newest ok label."""
    import polars as pl

    from circuit_atlas.errors import CircuitAtlasError

    assigned = lake.optional_table("cluster_assignments", model, corpus)
    if assigned is None:
        raise CircuitAtlasError(f"no clustering of {corpus!r} to group by: run "
                                "circuit-atlas cluster")
    rows = assigned.filter(pl.col("method") == method).select(
        "layer", "neuron", "cluster_path").collect()
    if rows.is_empty():
        raise CircuitAtlasError(f"no {method} clustering of {corpus!r}: run circuit-atlas "
                                f"cluster --method {method}")
    paths = {(a, b): p for a, b, p in rows.iter_rows()}
    from circuit_atlas.lake.labels import cluster_names

    named = cluster_names(lake, model, corpus, method)
    names = {} if named is None else dict(named.select("cluster_path", "label").iter_rows())
    return paths, names


def run_trace(lake, *, model, prompt: str, corpora=None, params=None, cluster=None,
              progress=None) -> TraceReport:
    """The attribution graph of ``prompt`` (imported into ``params.traces`` and computed
    like any graph, so a second trace of it reads the stored one), its neurons grouped
    into supernodes by the atlas's clusters (``corpora``: the atlas, default the only
    reduced set), written as circuit-tracer / Neuronpedia graph JSON."""
    from circuit_atlas.compute.export import graph_json
    from circuit_atlas.compute.graphs import run_graphs
    from circuit_atlas.compute.models import LoadedModel, load_tokenizer
    from circuit_atlas.compute.params import GraphsParams
    from circuit_atlas.lake.ids import prompt_id
    from circuit_atlas.names import model_name
    from circuit_atlas.stage import as_corpora, open_lake
    from circuit_atlas.use.params import TraceParams

    lake, params = open_lake(lake), params or TraceParams()
    name = model.name if isinstance(model, LoadedModel) else model_name(model)
    atlas = lake.reduced_corpus(name, as_corpora(corpora))
    paths, names = atlas_modules(lake, name, atlas, params.method)
    lake.import_prompts([{"text": prompt}], params.traces)
    run_graphs(lake, model=model, corpora=params.traces, cluster=cluster, progress=progress,
               params=GraphsParams(device=params.device, dtype=params.dtype))
    tokenizer = model.tokenizer if isinstance(model, LoadedModel) else load_tokenizer(model)
    pid = prompt_id(prompt)
    graph = graph_json(lake, name, params.traces, pid, lambda t: tokenizer.decode([t]))
    grouping = group(graph, paths, params.level, names, params.method)
    out = params.out or f"trace-{pid}.json"
    with open(out, "w", encoding="utf-8") as f:
        json.dump(with_supernodes(graph, grouping), f, ensure_ascii=False)
    html = None
    if params.html:
        html = out[:-len(".json")] + ".html" if out.endswith(".json") else out + ".html"
        write_view(supernode_graph(graph, grouping), html,
                   f"{name}: {prompt!r}, grouped by {params.method} level {params.level}")
    return TraceReport(pid, out, len(graph["nodes"]), len(graph["links"]), grouping, html)
