"""The graph job on the real SmolLM2: lake tables, resume, completeness after storage."""

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from circuit_atlas.cli import cli
from circuit_atlas.compute.attribution import AttributionParams
from circuit_atlas.compute.graphs import graph_job
from circuit_atlas.lake import Lake, logit_layer, prompt_id

PROMPTS = ["The capital of France is", "Insulin is produced by the", "Two plus two equals"]


@pytest.fixture
def lake(tmp_path):
    lake = Lake.init(tmp_path / "lake")
    lake.import_prompts([{"text": t} for t in PROMPTS], "c")
    return lake


def test_job_writes_valid_graphs_and_resumes(lake, smollm2):
    params = AttributionParams(candidates=60)
    first = graph_job(lake, smollm2, "c", params, shard_size=2, limit=2)
    assert (first.computed, first.skipped, first.shards) == (2, 0, 1)
    rest = graph_job(lake, smollm2, "c", params, shard_size=2)
    assert (rest.computed, rest.skipped) == (1, 2)
    assert graph_job(lake, smollm2, "c", params).computed == 0
    assert {s.commit["model_shape"]["n_layers"] for s in lake.shards()} == {30}
    graphs = lake.scan("graphs").collect()
    assert sorted(graphs["prompt_id"]) == sorted(prompt_id(t) for t in PROMPTS)
    nodes, edges = lake.scan("graph_nodes").collect(), lake.scan("graph_edges").collect()
    top = logit_layer(smollm2.adapter.n_layers)
    for g in graphs.iter_rows(named=True):
        n = nodes.filter(pl.col("graph_id") == g["graph_id"])
        e = edges.filter(pl.col("graph_id") == g["graph_id"])
        assert n.filter(pl.col("layer") == top)["neuron"].sort().to_list() == sorted(
            g["target_tokens"])
        assert n.filter(pl.col("layer") == -1).height == g["n_tokens"]
        assert e.height > 0 and e["weight"].is_finite().all()
        keys = set(n.select("layer", "neuron", "position").iter_rows())
        assert set(e.select("src_layer", "src_neuron", "src_pos").iter_rows()) <= keys
        assert set(e.select("tgt_layer", "tgt_neuron", "tgt_pos").iter_rows()) <= keys
    # different parameters are a different graph set
    assert graph_job(lake, smollm2, "c", AttributionParams(candidates=61), limit=1).computed == 1


def assert_stored_graphs_complete(lake, n_layers: int, n_neurons: int, rtol: float) -> None:
    """Every stored neuron node's incoming edges sum to its activation."""
    nodes = lake.scan("graph_nodes").collect()
    incoming = (lake.scan("graph_edges").group_by("graph_id", "tgt_layer", "tgt_neuron", "tgt_pos")
                .agg(pl.col("weight").cast(pl.Float64).sum()).collect())
    neurons = nodes.filter((pl.col("layer") >= 0) & (pl.col("layer") < n_layers)
                           & (pl.col("neuron") >= 0))
    joined = neurons.join(incoming, left_on=["graph_id", "layer", "neuron", "position"],
                          right_on=["graph_id", "tgt_layer", "tgt_neuron", "tgt_pos"])
    assert joined.height == n_neurons
    act, total = joined["activation"].to_numpy(), joined["weight"].to_numpy()
    np.testing.assert_allclose(total, act, rtol=rtol, atol=rtol * np.abs(act).max())


def test_unpruned_graphs_stay_complete_after_storage(lake, smollm2):
    graph_job(lake, smollm2, "c", AttributionParams(candidates=80, prune=False), limit=1)
    assert_stored_graphs_complete(lake, 30, 80, rtol=1e-3)


def test_graphs_command(lake):
    result = CliRunner().invoke(cli, ["graphs", "--corpus", "c", "--lake", lake.url,
                                      "--candidates", "30", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "1 computed" in result.output
    result = CliRunner().invoke(cli, ["graphs", "--corpus", "nope", "--lake", lake.url])
    assert result.exit_code == 1 and "unknown corpus 'nope'" in result.output


def test_export_graph_json(lake, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["graphs", "--corpus", "c", "--lake", lake.url, "--candidates",
                               "40"]).exit_code == 0
    out = tmp_path / "g.json"
    result = runner.invoke(cli, ["export-graph", "--corpus", "c", "--lake", lake.url,
                                 "--text", PROMPTS[0], "-o", str(out)])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(out.read_text())
    assert data["metadata"]["prompt"] == PROMPTS[0]
    assert "".join(data["metadata"]["prompt_tokens"]) == PROMPTS[0]
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert any(n["is_target_logit"] and "Paris" in n["clerp"] for n in logits)
    assert all(n["layer"] == "31" for n in logits)
    emb = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert len(emb) == len(data["metadata"]["prompt_tokens"])
    stored = lake.scan("graph_edges").collect()
    graph_ids = lake.scan("graphs").collect().filter(pl.col("prompt_id") == prompt_id(PROMPTS[0]))
    assert len(data["links"]) == stored.filter(
        pl.col("graph_id") == graph_ids["graph_id"][0]).height
    result = runner.invoke(cli, ["export-graph", "--corpus", "c", "--lake", lake.url,
                                 "--prompt-id", "0123456789abcdef"])
    assert result.exit_code == 1 and "no graph for prompt 0123456789abcdef" in result.output


def test_graph_shards_on_a_dask_cluster(lake, smollm2, client):
    """One task per shard on real worker processes; the graphs equal in-process ones."""
    params = AttributionParams(candidates=40, prune=False)  # pruning could flip at a threshold
    report = graph_job(lake, smollm2, "c", params, shard_size=2, client=client,
                        model_spec="smollm2")
    assert (report.computed, report.shards) == (3, 2)
    assert len(lake.shards()) == 2
    key = ["graph_id", "tgt_layer", "tgt_neuron", "tgt_pos", "src_layer", "src_neuron", "src_pos"]
    on_cluster = lake.scan("graph_edges").collect().sort(key)
    here = Lake.init(lake.path("..") + "/here")
    here.import_prompts([{"text": t} for t in PROMPTS], "c")
    graph_job(here, smollm2, "c", params)
    local = here.scan("graph_edges").collect().sort(key)
    assert (on_cluster.select(key) == local.select(key)).to_numpy().all()
    assert on_cluster.height == local.height
    np.testing.assert_allclose(on_cluster["weight"].to_numpy(), local["weight"].to_numpy(),
                               rtol=1e-4, atol=1e-5)
    assert graph_job(lake, smollm2, "c", params, client=client, model_spec="smollm2"
                      ).computed == 0


def test_cluster_job_client_loads_no_weights(lake, smollm2, client):
    """The client of a Dask job reads only the config: same identity as a loaded model,
    no GPU needed here for a GPU job, and a clear error if no worker has a GPU."""
    from circuit_atlas import CircuitAtlasError
    from circuit_atlas.compute.graphs import run_params
    from circuit_atlas.compute.models import model_ref

    params = AttributionParams(candidates=30)
    ref = model_ref("smollm2")
    assert (ref.name, ref.revision) == (smollm2.name, smollm2.revision)
    assert run_params(ref, params, 256) == run_params(smollm2, params, 256)
    report = graph_job(lake, ref, "c", params, shard_size=3, client=client)
    assert report.computed == 3
    assert graph_job(lake, smollm2, "c", params).computed == 0  # same identity
    gpu = model_ref("smollm2", device="cuda", dtype="bfloat16")
    assert gpu.dtype_name == "bfloat16"
    with pytest.raises(CircuitAtlasError, match="no Dask worker declares a GPU"):
        graph_job(lake, gpu, "c", params, client=client)
    with pytest.raises(CircuitAtlasError, match="unknown model"):
        model_ref("no-such-org/no-such-model")


def test_a_retried_shard_task_commits_nothing_twice(lake, smollm2):
    """Dask reruns a task whose worker died after its commit: the rerun adds nothing."""
    from circuit_atlas.compute.graphs import shard_task
    from circuit_atlas.compute.workers import _WORKER_MODELS

    _WORKER_MODELS[("smollm2", "cpu", "float32")] = smollm2
    params = AttributionParams(candidates=30)
    group = lake.scan("prompts").select("prompt_id", "text").sort("prompt_id").collect().rows()
    args = (lake, "smollm2", "cpu", "float32", "c", group[:2], params, 256, 256)
    assert shard_task(*args) == 2 and len(lake.shards()) == 1
    assert shard_task(*args) == 2 and len(lake.shards()) == 1


@pytest.mark.parametrize("family", ["qwen2", "olmo2"])
def test_a_model_folder_of_another_family(lake, smollm2, tmp_path, family):
    """A saved Hugging Face folder (Qwen2: attention biases and sliding windows; OLMo-2:
    norms after each sublayer) through the CLI, prompts sharing batches: every stored
    target's incoming edges sum to its activation, constants included."""
    from tests.factories import tiny_llama

    folder = tmp_path / family
    tiny_llama(seed=4, family=family, vocab=len(smollm2.tokenizer)).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    result = CliRunner().invoke(cli, [
        "graphs", "--corpus", "c", "--lake", lake.url, "--model", str(folder),
        "--dtype", "float64", "--candidates", "50", "--no-prune", "--prompt-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "3 computed" in result.output
    graphs = lake.scan("graphs").collect()
    constants = lake.scan("graph_nodes").filter((pl.col("layer") == -1) & (pl.col("neuron") == -1))
    assert constants.collect().height == (graphs["n_tokens"].sum() if family == "qwen2" else 0)
    assert_stored_graphs_complete(lake, 3, 3 * 50, rtol=1e-4)
