"""investigate: an agent loop over a real OpenAI client against a scripted
tool-calling server, on a tiny model with a planted neuron (L1/N7 fires at the token
"w5" and is exactly 0 everywhere else)."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.investigations import latest_record
from circuit_atlas.use.investigate import run_investigate
from circuit_atlas.use.params import InvestigateParams
from tests.labeling.test_scoring import planted_lake
from tests.llm_server import LLMServer


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_lake(tmp_path_factory.mktemp("investigate"))


@pytest.fixture
def lake(planted, tmp_path):
    shutil.copytree(planted[1].root, tmp_path / "lake")
    return Lake(tmp_path / "lake")


@pytest.fixture
def server():
    with LLMServer() as s:
        yield s


def params(server, **kw) -> InvestigateParams:
    return InvestigateParams(base_url=server.url, llm="scripted", timeout=10, max_retries=0,
                             **kw)


def hooked(model_dir: str, text: str, layer: int, neuron: int) -> list[float]:
    """The neuron's activation at each token by a hook on the Hugging Face MLP's
    down projection (its input is act_fn(gate) * up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = []
    hook = hf.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda _m, inp, _out: seen.append(inp[0][0, :, neuron]))
    with torch.no_grad():
        hf(tok(text, return_tensors="pt").input_ids)
    hook.remove()
    return seen[0].tolist()


def test_the_agent_finds_and_verifies_the_planted_trigger(planted, lake, server):
    model_dir = planted[0]
    report = run_investigate(lake, model=model_dir, neuron="L1/N7", corpora="c",
                             params=params(server))
    assert report.status == "done" and report.error is None, report
    assert report.verdict == 'fires on the token "w5"' and report.confidence == 0.9
    assert report.hypotheses == 1 and report.model_calls == 1
    assert "verdict (confidence 0.90)" in str(report)
    record = latest_record(lake, "tiny", "c", 1, 7)
    assert record["status"] == "done" and record["hypotheses"] == ['fires on the token "w5"']
    tools = [e["tool"] for e in record["experiments"]]
    assert tools == ["exemplars", "activations", "cluster", "exemplars", "activations"]
    # the malformed call and the two failing tools were answered with their errors
    cut, missing, failing = record["experiments"][1:4]
    assert cut["error"].startswith("malformed arguments") and cut["result"] is None
    assert "no clusters table" in missing["error"]  # the atlas has no clustering
    assert failing["error"].startswith("exemplars failed: ValueError")
    # the activations the agent read equal a hooked Hugging Face forward
    ran = json.loads(record["experiments"][-1]["result"])["results"]
    for r in ran:
        want = hooked(model_dir, r["prompt"], 1, 7)
        assert [a for _, a in r["tokens"]] == pytest.approx(want, abs=1e-4)
    assert ran[0]["max_token"] == "w5" and ran[0]["max"] > 1
    assert ran[1]["max"] == pytest.approx(0.0, abs=1e-6)
    # the agent was offered the model's tools, and asked each step once
    steps = [r["agent"] for r in server.requests]
    assert steps == list(range(len(steps))) and "activations" in server.requests[0]["tools"]
    assert report.tool_calls == 7 and report.prompt_tokens > 0


def test_a_failed_run_resumes_from_its_journal_and_asks_nothing_twice(planted, lake, server):
    server.faults["agent:6"] = ["500"]  # the endpoint fails before the experiment
    first = run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                            params=params(server))
    assert first.status == "failed" and "500" in first.error
    assert latest_record(lake, "tiny", "c", 1, 7)["status"] == "failed"
    # a step cut by a kill mid-write is a step that did not happen
    journal = next(__import__("pathlib").Path(lake.root).rglob(f"{first.investigation}.jsonl"))
    with open(journal, "a", encoding="utf-8") as f:
        f.write('{"kind": "assistant", "message": {"role": "assist')
    second = run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                             params=params(server))
    assert second.investigation == first.investigation and second.resumed > 0
    assert second.status == "done" and second.verdict == 'fires on the token "w5"'
    asked = [r["agent"] for r in server.requests]
    assert asked == [0, 1, 2, 3, 4, 5, 6, 6, 7]  # only the failed step was asked again
    rows = lake.table("investigations").collect()
    assert rows.height == 1 and rows["status"].item() == "done"  # the record replaced


def test_budgets_stop_it_and_a_finished_neuron_is_not_redone(planted, lake, server):
    out = run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                          params=params(server, max_tool_calls=3, price_in=2.0,
                                        price_out=8.0))
    assert out.status == "budget" and "3 tool calls" in out.error and out.verdict is None
    assert out.cost == pytest.approx((out.prompt_tokens * 2 + out.completion_tokens * 8)
                                     / 1e6) and f"${out.cost:.4f}" in str(out)
    with pytest.raises(CircuitAtlasError, match="--again"):
        run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                        params=params(server))
    # without runs of the model the agent is not offered them; its call is refused
    again = run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                            params=params(server, again=True, model_calls=0))
    assert again.investigation != out.investigation and again.model_calls == 0
    assert "activations" not in server.requests[-1]["tools"]
    record = latest_record(lake, "tiny", "c", 1, 7)
    assert record["status"] == "done" and record["verdict"] == "no clear trigger"
    refused = [e for e in record["experiments"] if e["tool"] == "activations"]
    assert refused and all(e["error"].startswith(("no tool", "malformed")) for e in refused)
    assert lake.table("investigations").select(pl.len()).collect().item() == 2
    with pytest.raises(CircuitAtlasError, match="budgets"):
        InvestigateParams(max_tool_calls=0)


def test_the_cli_on_the_demo_lake_and_the_record_on_the_report_page(demo_run, tmp_path,
                                                                     server):
    """`circuit-atlas investigate` on the demo atlas with the embedded SmolLM2; `profile`
    tells the record and the neuron's report page shows it (headless Chromium)."""
    from click.testing import CliRunner
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from circuit_atlas.cli import cli
    from circuit_atlas.names import DEFAULT_MODEL
    from tests.browser import ARTIFACTS, chrome

    shutil.copytree(demo_run[0], tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    first = lake.table("labels").filter(pl.col("status") == "ok").collect().row(0, named=True)
    nid = f"L{first['layer']}/N{first['neuron']}"
    runner = CliRunner()
    out = runner.invoke(cli, ["investigate", nid, "--lake", str(tmp_path / "lake"),
                              "--base-url", server.url, "--llm", "scripted",
                              "--max-retries", "0", "--model-calls", "3"])
    assert out.exit_code == 0, out.output
    assert f"investigate {nid}" in out.output and "done" in out.output
    record = latest_record(lake, DEFAULT_MODEL, "general+medical", first["layer"],
                           first["neuron"])
    trigger = record["hypotheses"][0].split('"')[1]
    ran = json.loads(record["experiments"][-1]["result"])["results"]
    assert trigger in ran[0]["prompt"] and record["model_calls"] == 1
    shown = runner.invoke(cli, ["profile", nid, "--lake", str(tmp_path / "lake")])
    assert shown.exit_code == 0 and f"investigation {record['investigation']}" in shown.output
    again = runner.invoke(cli, ["investigate", nid, "--lake", str(tmp_path / "lake"),
                                "--base-url", server.url, "--llm", "scripted"])
    assert again.exit_code == 1 and "--again" in again.output
    pages = tmp_path / "reports"
    made = runner.invoke(cli, ["export", "reports", "--lake", str(tmp_path / "lake"),
                               "--neuron", nid, "--top", "3", "--no-labelled",
                               "--out", str(pages)])
    assert made.exit_code == 0, made.output
    browser = chrome()
    try:
        browser.get((pages / f"L{first['layer']}-N{first['neuron']}.html").as_uri())
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.report && window.report.ready"))
        section = browser.find_element(By.ID, "investigation")
        assert f"Verdict: {record['verdict']}" in section.text
        assert record["hypotheses"][0] in section.text
        rows = section.find_elements(By.CSS_SELECTOR, "table:last-of-type tr")
        assert len(rows) == 1 + len(record["experiments"])
        assert "malformed arguments" in section.text
        browser.execute_script("arguments[0].scrollIntoView()", section)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "report-investigation.png"))
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # the index shows the verdict, and "investigated" keeps only such neurons
        browser.get((pages / "index.html").as_uri())
        WebDriverWait(browser, 20).until(lambda b: b.execute_script(
            "return window.reports && window.reports.ready"))
        assert record["verdict"] in browser.find_element(By.ID, "neurons").text
        browser.find_element(By.ID, "investigated").click()
        shown = [r.get_attribute("data-id") for r in
                 browser.find_elements(By.CSS_SELECTOR, "#neurons tr")]
        assert shown == [nid]
    finally:
        browser.quit()


def test_a_killed_investigation_resumes_where_it_stopped(planted, lake, server):
    """SIGKILL of `circuit-atlas investigate` mid-run (after a few journaled steps):
    the rerun resumes the same investigation and asks the agent only the steps the
    journal does not hold (at most the one in flight again)."""
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    server.delay_s = 0.4  # each reply takes a while: room to kill between steps
    args = [sys.executable, "-m", "circuit_atlas.cli", "investigate", "L1/N7", "--lake",
            lake.root, "--model", planted[0], "--corpus", "c", "--base-url", server.url,
            "--llm", "scripted", "--max-retries", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120

    def steps() -> int:
        found = list(pathlib.Path(lake.root).rglob("L1-N7-*.jsonl"))
        return len(found[0].read_text().splitlines()) if found else 0

    while steps() < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert steps() >= 5 and lake.optional_table("investigations", "tiny", "c") is None
    before = [r["agent"] for r in server.requests]
    server.delay_s = 0.0
    report = run_investigate(lake, model=planted[0], neuron="L1/N7", corpora="c",
                             params=params(server))
    assert report.status == "done" and report.resumed >= 5
    assert report.verdict == 'fires on the token "w5"'
    after = [r["agent"] for r in server.requests][len(before):]
    assert after and after[0] >= max(before)  # nothing journaled was asked again
    assert sorted(set(before) | set(after)) == list(range(8))
