"""trace: a new prompt's graph grouped into supernodes by the atlas's clusters. The
grouping and its scores against hand counts; on a copy of the demo lake, the written
graph JSON keeps circuit-tracer's fields, every supernode holds exactly the graph's
neurons of one module (by SQL over cluster_assignments), its scores equal a recount
from the file, and a second trace of the prompt reads the stored graph."""

import json
import shutil

import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.use.supernodes import (
    group,
    neuron_of,
    supernode_graph,
    view_groups,
    with_supernodes,
)

GRAPH_FIELDS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"}


def circuit_tracer_model():
    """circuit-tracer's published graph format (circuit_tracer/frontend/graph_models.py:
    the pydantic models its local server writes and its viewer reads), field by field."""
    from pydantic import BaseModel

    class Metadata(BaseModel):
        slug: str
        scan: str
        transcoder_list: list[str]
        prompt_tokens: list[str]
        prompt: str
        node_threshold: float | None = None
        schema_version: int | None = 1

    class QParams(BaseModel):
        pinnedIds: list[str]  # noqa: N815 (their names)
        supernodes: list[list[str]]
        linkType: str  # noqa: N815
        clickedId: str  # noqa: N815
        sg_pos: str

    class Node(BaseModel):
        node_id: str
        feature: int
        layer: str
        ctx_idx: int
        feature_type: str
        token_prob: float = 0.0
        is_target_logit: bool = False
        run_idx: int = 0
        reverse_ctx_idx: int = 0
        jsNodeId: str  # noqa: N815
        clerp: str = ""
        influence: float | None = None
        activation: float | None = None

    class Link(BaseModel):
        source: str
        target: str
        weight: float

    class Graph(BaseModel):
        metadata: Metadata
        qParams: QParams  # noqa: N815
        nodes: list[Node]
        links: list[Link]

    return Graph


def tiny_graph():
    def neuron(layer, index, pos, influence):
        return {"node_id": f"{layer}_{index}_{pos}", "feature_type": "cross layer transcoder",
                "influence": influence, "layer": str(layer), "ctx_idx": pos,
                "clerp": f"L{layer}/N{index}"}

    nodes = [neuron(1, 1, 0, 0.5), neuron(2, 3, 1, -0.3), neuron(3, 4, 1, 0.2),
             {"node_id": "E_7_0", "feature_type": "embedding", "layer": "E", "ctx_idx": 0,
              "clerp": "token 'a'"},
             {"node_id": "5_9_1", "feature_type": "logit", "layer": "5", "ctx_idx": 1,
              "clerp": 'Output "b"'}]
    links = [{"source": "1_1_0", "target": "2_3_1", "weight": 2.0},
             {"source": "1_1_0", "target": "3_4_1", "weight": -1.0},
             {"source": "E_7_0", "target": "1_1_0", "weight": 1.0}]
    return {"metadata": {"slug": "t"}, "qParams": {"pinnedIds": ["5_9_1"]}, "nodes": nodes,
            "links": links}


def test_grouping_and_its_scores_by_hand():
    graph = tiny_graph()
    paths = {(1, 1): "1:2", (2, 3): "1:5", (3, 4): "2"}
    g = group(graph, paths, 1, {"1": "drug names"})
    # module 1 holds two of the graph's neurons; module 2 one, so it is no supernode
    assert g.supernodes == [["infomap 1: drug names", "1_1_0", "2_3_1"]]
    assert g.coverage == pytest.approx(0.8 / 1.0) and (g.grouped, g.neurons) == (2, 3)
    # 2.0 runs inside the supernode; 1.0 and 1.0 run between groups
    assert g.links_kept == pytest.approx(2.0 / 4.0)
    finer = group(graph, paths, 2)
    assert finer.supernodes == [] and finer.coverage == 0.0 and finer.links_kept == 1.0
    out = with_supernodes(graph, g)
    assert out["qParams"]["pinnedIds"] == ["5_9_1", "1_1_0", "2_3_1"]
    assert out["metadata"]["supernode_grouping"]["coverage"] == pytest.approx(0.8)
    assert graph["qParams"]["pinnedIds"] == ["5_9_1"]  # the input is left as it was
    with pytest.raises(ValueError, match="level"):
        group(graph, paths, 0)


def test_the_supernode_graph_by_hand():
    graph = tiny_graph()
    g = group(graph, {(1, 1): "1:2", (2, 3): "1:5", (3, 4): "2"}, 1, {"1": "drug names"})
    where = view_groups(graph, g, shown_neurons=0)
    assert where == {"1_1_0": "infomap 1: drug names", "2_3_1": "infomap 1: drug names",
                     "3_4_1": "L3 other neurons", "E_7_0": "token 0", "5_9_1": 'Output "b"'}
    assert view_groups(graph, g, shown_neurons=1)["3_4_1"] == "L3/N4 @1"
    view = supernode_graph(graph, g, shown_neurons=0)
    groups = {x["name"]: x for x in view["groups"]}
    sup = groups["infomap 1: drug names"]
    assert sup["kind"] == "supernode" and sup["module"] == "1"
    assert sup["influence"] == pytest.approx(0.8) and sup["layer"] == 1.5
    assert sup["position"] == 0.5 and groups["token 0"]["layer"] == 0
    # the link inside the supernode is folded away; the others are summed per pair
    assert sorted((x["source"], x["target"], x["weight"]) for x in view["links"]) == [
        ("infomap 1: drug names", "L3 other neurons", -1.0),
        ("token 0", "infomap 1: drug names", 1.0)]
    assert supernode_graph(graph, g, shown_links=1)["links_between_groups"] == 2


@pytest.fixture(scope="module")
def traced(demo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    shutil.copytree(demo_run[0], root / "lake")
    out = root / "t.json"
    args = ["trace", "Insulin is produced by the", "--lake", str(root / "lake"),
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return Lake(root / "lake"), out, args, result.output


def test_the_traced_graph_is_grouped_by_the_atlas_clusters(traced):
    lake, out, _, printed = traced
    data = json.loads(out.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    # it parses as circuit-tracer's format and comes back the same in every field it has
    parsed = circuit_tracer_model().model_validate(data).model_dump()
    assert parsed["qParams"] == data["qParams"] and parsed["links"] == data["links"]
    for ours, theirs in zip(data["nodes"], parsed["nodes"], strict=True):
        assert {k: v for k, v in theirs.items() if k in ours} == ours
    assert {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"} <= set(data["qParams"])
    assert all(set(n) >= GRAPH_FIELDS for n in data["nodes"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    supernodes = data["qParams"]["supernodes"]
    assert supernodes, printed
    assigned = lake.table("cluster_assignments").filter(pl.col("method") == "infomap").select(
        "layer", "neuron", top=pl.col("cluster_path").str.split(":").list.first()).collect()
    top = {(a, b): t for a, b, t in assigned.iter_rows()}
    by_node = {n["node_id"]: n for n in data["nodes"]}
    grouped = set()
    for name, *members in supernodes:
        module = name.split(" ", 1)[1].split(":", 1)[0]
        keys = [neuron_of(by_node[m]) for m in members]
        assert len(members) >= 2 and all(top[k] == module for k in keys)
        # every neuron node of the graph in that module is in it
        assert set(members) == {i for i, n in by_node.items()
                                if neuron_of(n) is not None and top.get(neuron_of(n)) == module}
        grouped |= set(members)
    assert set(data["qParams"]["pinnedIds"]) >= grouped
    weights = {i: abs(n["influence"]) for i, n in by_node.items() if neuron_of(n)}
    meta = data["metadata"]["supernode_grouping"]
    assert meta["coverage"] == pytest.approx(sum(weights[i] for i in grouped)
                                             / sum(weights.values()))
    home = {m: s[0] for s in supernodes for m in s[1:]}
    between = sum(abs(x["weight"]) for x in data["links"]
                  if home.get(x["source"]) is None or home.get(x["source"]) != home.get(
                      x["target"]))
    assert meta["links_kept"] == pytest.approx(between / sum(abs(x["weight"])
                                                             for x in data["links"]))
    assert "supernode(s)" in printed and str(out) in printed


def test_the_html_view_in_headless_chromium(traced):
    """The supernode graph drawn: one node per group, a clicked supernode lists its
    members, the links drawn are the strongest sums between groups; nothing fetched."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import ARTIFACTS, chrome

    _, out, _, printed = traced
    html = out.with_suffix(".html")
    assert str(html) in printed
    text = html.read_text()
    assert not re.search(r"https?://", text.replace("http://www.w3.org/2000/svg", ""))
    data = json.loads(out.read_text())
    supernodes = {s[0]: s[1:] for s in data["qParams"]["supernodes"]}
    browser = chrome()
    try:
        browser.get(html.as_uri())
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.trace && window.trace.ready"))
        drawn = browser.find_elements(By.CSS_SELECTOR, "#nodes .group[data-kind=supernode]")
        assert {d.get_attribute("data-name") for d in drawn} == set(supernodes)
        biggest = max(supernodes, key=lambda k: len(supernodes[k]))
        browser.find_element(By.CSS_SELECTOR, f'.group[data-name="{biggest}"] circle').click()
        rows = browser.find_elements(By.CSS_SELECTOR, "#members tr")
        assert len(rows) == 1 + len(supernodes[biggest])
        lines = browser.find_elements(By.CSS_SELECTOR, "#links line")
        assert 0 < len(lines) <= 80
        scores = browser.find_element(By.ID, "scores").text
        cov = data["metadata"]["supernode_grouping"]["coverage"]
        assert f"{100 * cov:.1f}%" in scores
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "trace-view.png"))
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()


def test_a_second_trace_reads_the_stored_graph_and_bad_input_is_refused(traced, tmp_path):
    lake, out, args, _ = traced
    graphs = lake.scan("graphs", corpus="traces").select(pl.len()).collect().item()
    again = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output
    assert lake.scan("graphs", corpus="traces").select(pl.len()).collect().item() == graphs
    assert json.loads((tmp_path / "again.json").read_text())["nodes"] == json.loads(
        out.read_text())["nodes"]
    from circuit_atlas.use.params import TraceParams
    from circuit_atlas.use.supernodes import run_trace

    empty = Lake.init(tmp_path / "empty")
    with pytest.raises(CircuitAtlasError, match="reduce"):  # no atlas to group by
        run_trace(empty, model="smollm2", prompt="x", params=TraceParams())
