"""Per-neuron report pages and their index, on a copy of the demo lake, driven in a real
headless Chromium: the index's search and filters, a link followed to a neuron's page
and on to a neighbour's, a highlighted exemplar rendered; the numbers a page shows equal
the lake's tables."""

import os
import re
import shutil

import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.names import DEFAULT_MODEL
from tests.browser import ARTIFACTS, chrome

CORPUS = "general+medical"


@pytest.fixture(scope="module")
def reports(demo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    shutil.copytree(demo_run[0], root / "lake")
    out = root / "reports"
    result = CliRunner().invoke(cli, ["export", "reports", "--lake", str(root / "lake"),
                                      "--top", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reports:" in result.output
    return Lake(root / "lake"), out


def test_the_pages_hold_what_the_lake_holds(reports):
    lake, out = reports
    labels = lake.table("labels").filter(pl.col("status") == "ok").collect()
    top = lake.table("neurons", DEFAULT_MODEL, CORPUS).sort(
        ["graph_count", "layer", "neuron"], descending=[True, False, False]).head(6).collect()
    want = {(a, b) for a, b in top.select("layer", "neuron").iter_rows()} | {
        (a, b) for a, b in labels.select("layer", "neuron").iter_rows()}
    pages = {f for f in os.listdir(out) if f != "index.html"}
    assert pages == {f"L{a}-N{b}.html" for a, b in want}
    for name in (*pages, "index.html"):
        html = (out / name).read_text()
        # nothing is fetched at view time (the SVG namespace is a name, not a request)
        assert not re.search(r"https?://", html.replace("http://www.w3.org/2000/svg", ""))


def test_index_search_links_and_highlights_in_headless_chromium(reports):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    lake, out = reports
    labelled = lake.table("labels").filter(pl.col("status") == "ok").collect().row(
        0, named=True)
    nid = f"L{labelled['layer']}/N{labelled['neuron']}"
    stats = pl.concat([lake.table("activation_stats", DEFAULT_MODEL, c).filter(
        (pl.col("layer") == labelled["layer"]) & (pl.col("neuron") == labelled["neuron"])
    ).collect() for c in ("general", "medical")])
    browser = chrome()
    try:
        browser.get((out / "index.html").as_uri())
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.reports && window.reports.ready"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#neurons tr")
        assert len(rows) == len(os.listdir(out)) - 1
        # search by the label's text finds the neuron; a layer filter keeps its layer only
        box = browser.find_element(By.ID, "search")
        box.send_keys(labelled["label"][:12])
        found = [r.get_attribute("data-id") for r in
                 browser.find_elements(By.CSS_SELECTOR, "#neurons tr")]
        assert nid in found
        box.clear()
        box.send_keys(" ")
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(labelled["layer"]))
        layers = {r.get_attribute("data-id").split("/")[0] for r in
                  browser.find_elements(By.CSS_SELECTOR, "#neurons tr")}
        assert layers == {f"L{labelled['layer']}"}
        # follow the link to its page
        browser.find_element(By.CSS_SELECTOR, f"#neurons tr[data-id='{nid}'] a").click()
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.report && window.report.ready"))
        assert browser.execute_script("return window.report.id") == nid
        shown = browser.find_element(By.ID, "labels").text
        assert labelled["label"] in shown
        # the activation table shows the statistics' maximum; a marked token is rendered
        page = browser.find_element(By.ID, "page").text
        # formatted as the page formats it: JavaScript's toPrecision rounds a tie such as
        # 37.25 up, Python's format rounds it to even
        peak = browser.execute_script("return arguments[0].toPrecision(3)",
                                      float(stats["max"].max()))
        assert peak in page
        from circuit_atlas.analysis.exemplars import neuron_exemplars
        from circuit_atlas.compute.models import load_tokenizer

        top = neuron_exemplars(lake, DEFAULT_MODEL, CORPUS, labelled["layer"],
                               labelled["neuron"], 5, load_tokenizer(DEFAULT_MODEL))["top"]
        want = re.findall(r"<<(.*?)>>", top[0]["text"], re.S)
        marks = [m.get_attribute("textContent") for m in
                 browser.find_elements(By.CSS_SELECTOR, ".ex mark")]
        assert want and want[0] in marks
        assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "report-page.png"))
        # a neighbour with a page of its own is a link that opens it
        links = browser.find_elements(By.CSS_SELECTOR, "#upstream a, #downstream a, "
                                                       "#members a")
        if links:
            target = links[0].text
            links[0].click()
            WebDriverWait(browser, 20).until(lambda b: b.execute_script(
                "return window.report && window.report.id") == target)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()


def test_an_unknown_neuron_is_a_clear_error(reports):
    from circuit_atlas.use.params import ReportsParams
    from circuit_atlas.use.reports import run_reports

    lake, out = reports
    with pytest.raises(CircuitAtlasError, match="L29/N99999 is in no graph"):
        run_reports(lake, model=DEFAULT_MODEL, params=ReportsParams(
            out=str(out / "x"), neurons=("L29/N99999",)))
