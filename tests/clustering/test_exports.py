"""Using an atlas: SQL over the lake, the DuckDB atlas file answering the seeds' queries,
Gephi exports, and the HTML view driven in a real headless Chromium."""

import json
import os

import duckdb
import networkx as nx
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.clustering.methods import method_params
from circuit_atlas.clustering.network import network_params
from circuit_atlas.clustering.run import cluster_lake
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import Lake
from tests.browser import ARTIFACTS, chrome
from tests.factories import MODEL, prompts_of, write_shard


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, client):
    """A reduced, clustered (both methods) and partly labelled lake, and its DuckDB file."""
    tmp = tmp_path_factory.mktemp("atlas")
    lake = Lake.init(tmp / "lake")
    for s in range(3):
        write_shard(lake, "c", prompts_of(10, f"s{s}"), seed=s, neurons=40)
    reduce_lake(lake, MODEL, ["c"], client)
    for method in ("infomap", "leiden"):
        cluster_lake(lake, MODEL, "c", method, network_params(min_count=1),
                     method_params(method))
    # (the factory's random edges may name nodes a graph does not list: label neurons the
    # neurons table has)
    known = lake.table("neurons").select("layer", "neuron")
    neurons = lake.table("cluster_assignments").filter(pl.col("method") == "infomap").join(
        known, on=["layer", "neuron"]).sort("flow", descending=True).head(12).collect()
    labels = tmp / "labels.csv"
    names = ["aspirin and salicylates", "insulin secretion", "capital cities"]
    rows = ["id,label,description"] + [
        f"L{r['layer']}/N{r['neuron']},{names[i % 3]} {i},made up for the test"
        for i, r in enumerate(neurons.iter_rows(named=True))]
    labels.write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    out = runner.invoke(cli, ["labels", "import", str(labels), "--lake", lake.url,
                              "--model", MODEL, "--corpus", "c"])
    assert out.exit_code == 0, out.output
    db = tmp / "atlas.duckdb"
    out = runner.invoke(cli, ["export", "duckdb", str(db), "--lake", lake.url, "--model", MODEL,
                              "--method", "leiden"])
    assert out.exit_code == 0, out.output
    return lake, db


def seeds_queries(db):
    """The seeds' four queries; the cluster numbers are ones this atlas has. The third
    aggregates with list(...)[1:3]: DuckDB does not parse the seeds' LIMIT inside list()."""
    con = duckdb.connect(str(db), read_only=True)
    ((top, sub),) = con.execute(
        "SELECT top_cluster, sub_module FROM neurons WHERE sub_module IS NOT NULL "
        "GROUP BY ALL ORDER BY count(*) DESC, top_cluster, sub_module LIMIT 1").fetchall()
    con.close()
    return [
        f"SELECT layer, neuron, label FROM neurons WHERE top_cluster = {top} "
        f"AND sub_module = {sub}",
        "SELECT layer, neuron, label, top_cluster FROM neurons WHERE label ILIKE '%aspirin%'",
        """SELECT top_cluster, count(*) as n,
                  list(label ORDER BY max_activation DESC NULLS LAST)[1:3] AS labels
           FROM neurons WHERE top_cluster IS NOT NULL
           GROUP BY top_cluster ORDER BY n DESC, top_cluster LIMIT 20""",
        f"""SELECT e.src_layer, e.src_neuron, e.tgt_layer, e.tgt_neuron, e.mean_weight,
                   n1.label as src_label, n2.label as tgt_label
            FROM edges e
            JOIN neurons n1 ON e.src_layer = n1.layer AND e.src_neuron = n1.neuron
            JOIN neurons n2 ON e.tgt_layer = n2.layer AND e.tgt_neuron = n2.neuron
            WHERE n1.top_cluster = {top} AND n1.sub_module = {sub}
              AND n2.top_cluster = {top} AND n2.sub_module = {sub}
            ORDER BY e.mean_abs_weight DESC, e.src_layer, e.src_neuron, e.tgt_layer,
                     e.tgt_neuron"""]


def rows_of(df: pl.DataFrame, ordered: bool):
    rows = [tuple(json.dumps(v, sort_keys=True) for v in r) for r in df.iter_rows()]
    return rows if ordered else sorted(rows)


def test_seeds_queries_same_rows_from_cli_and_duckdb_file(atlas):
    lake, db = atlas
    runner = CliRunner()
    con = duckdb.connect(str(db), read_only=True)
    for n, query in enumerate(seeds_queries(db)):
        want = pl.from_arrow(con.sql(query).arrow())
        assert len(want) > 0, query
        ordered = "ORDER BY" in query.split("FROM")[-1]
        engines = ["duckdb", "polars"] if "list(" not in query else ["duckdb"]
        for engine in engines:
            out = runner.invoke(cli, ["sql", query, "--atlas", "--lake", lake.url, "--model",
                                      MODEL, "--method", "leiden", "--engine", engine,
                                      "--format", "json"])
            assert out.exit_code == 0, out.output
            got = pl.read_json(out.output.encode()) if out.output.strip() != "[]" else None
            assert got is not None and rows_of(got, ordered) == rows_of(want, ordered), (
                n, engine)
    labels = pl.from_arrow(con.sql("SELECT label FROM neurons WHERE label IS NOT NULL").arrow())
    assert len(labels) == 12
    meta = dict(con.execute("SELECT key, value FROM metadata").fetchall())
    assert meta["clustering_method"] == "leiden" and json.loads(meta["model_shape"])
    con.close()


def test_sql_over_the_lake_and_tables(atlas):
    lake, _ = atlas
    runner = CliRunner()
    query = "SELECT method, count(*) AS n FROM cluster_assignments GROUP BY method ORDER BY method"
    polars_out = lake.sql(query)
    duck_out = pl.from_arrow(lake.duckdb().sql(query).arrow())
    assert polars_out.equals(duck_out.cast(polars_out.schema))
    raw = lake.sql("SELECT count(*) AS n FROM graph_edges")["n"][0]
    assert raw == lake.scan("graph_edges").select(pl.len()).collect().item()
    out = runner.invoke(cli, ["sql", "SELECT layer, count(*) AS n FROM neurons GROUP BY layer",
                              "--lake", lake.url, "--format", "csv"])
    assert out.exit_code == 0 and out.output.startswith("layer,n")
    out = runner.invoke(cli, ["tables", "--lake", lake.url, "--json"])
    listed = {t["table"]: t["rows"] for t in json.loads(out.output)}
    assert listed["clusters"] == lake.table("clusters").select(pl.len()).collect().item()
    assert {"prompts", "graph_edges", "labels", "edges"} <= set(listed)
    for engine in ("polars", "duckdb"):
        out = runner.invoke(cli, ["sql", "SELECT nope FROM neurons", "--lake", lake.url,
                                  "--engine", engine])
        assert out.exit_code == 1 and "SQL:" in out.output and "Traceback" not in out.output


def test_network_exports(atlas, tmp_path):
    lake, _ = atlas
    for fmt in ("gexf", "graphml"):
        path = tmp_path / f"atlas.{fmt}"
        out = CliRunner().invoke(cli, ["export", "network", str(path), "--lake", lake.url,
                                       "--model", MODEL, "--min-count", "2"])
        assert out.exit_code == 0, out.output
        graph = (nx.read_gexf if fmt == "gexf" else nx.read_graphml)(path)
        edges = lake.table("edges").filter(
            (pl.col("count") >= 2) & pl.col("src_layer").is_between(0, 3)
            & pl.col("tgt_layer").is_between(0, 3)).collect()
        assert graph.number_of_edges() == len(edges)
        labelled = [n for n, d in graph.nodes(data=True) if d.get("labelled")]
        assert len(labelled) == 12


def test_html_view_in_headless_chromium(atlas, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lake, _ = atlas
    page = tmp_path / "clusters.html"
    out = CliRunner().invoke(cli, ["export", "html", str(page), "--lake", lake.url,
                                   "--model", MODEL, "--method", "leiden"])
    assert out.exit_code == 0, out.output
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched at view time
    top = lake.table("clusters").filter((pl.col("method") == "leiden")
                                        & (pl.col("level") == 1)).collect()
    browser = chrome()
    try:
        browser.get(page.as_uri())
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.atlas && window.atlas.ready"))
        drawn = browser.execute_script("""
            const c = document.getElementById('view'), g = c.getContext('2d');
            const d = g.getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4)
              if (Math.abs(d[i] - 247) + Math.abs(d[i+1] - 247) + Math.abs(d[i+2] - 244) > 60) n++;
            return n;""")
        assert drawn > 500  # the constellation is drawn, not a blank canvas
        modules = browser.find_elements(By.CSS_SELECTOR, "#modules li")
        assert len(modules) == len(top)
        # search by label finds the labelled neuron
        labelled = lake.table("labels").collect().filter(
            pl.col("label").str.starts_with("aspirin")).sort("label").row(0, named=True)
        box = browser.find_element(By.ID, "search")
        box.send_keys("aspirin")
        found = [li.get_attribute("data-id") for li in
                 browser.find_elements(By.CSS_SELECTOR, "#results li")]
        assert f"L{labelled['layer']}/N{labelled['neuron']}" in found
        # drilling into the largest module down to its members shows exactly them
        biggest = top.sort("size", descending=True).row(0, named=True)
        browser.find_element(By.CSS_SELECTOR,
                             f"#modules li[data-path='{biggest['cluster_path']}']").click()
        assert browser.execute_script("return window.atlas.view") == biggest["cluster_path"]
        while not browser.find_elements(By.CSS_SELECTOR, "#members li"):
            browser.find_elements(By.CSS_SELECTOR, "#modules li")[0].click()
        path = browser.execute_script("return window.atlas.view")
        members = {li.get_attribute("data-id") for li in
                   browser.find_elements(By.CSS_SELECTOR, "#members li")}
        want = lake.table("cluster_assignments").filter(
            (pl.col("method") == "leiden") & (pl.col("cluster_path") == path)).join(
            lake.table("neurons").select("layer", "neuron"), on=["layer", "neuron"]
        ).collect()
        assert members == {f"L{a}/N{b}" for a, b in zip(want["layer"], want["neuron"],
                                                         strict=True)}
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "clusters.png"))
        assert os.path.getsize(ARTIFACTS / "clusters.png") > 1000
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()
