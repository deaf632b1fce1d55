"""The whole pipeline on an fsspec lake: an S3 server (moto) on loopback. (memory://
lakes go through the same fsspec paths; the lake tests use them where a remote
filesystem's behaviour is the point.)

Import, graphs (SmolLM2), reduce, projections, effects, co-occurrence, specificity,
roles, clustering, labels (an OpenAI-compatible server on loopback) and exports run on
it, and every table equals what the same pipeline writes to a local folder.
"""

import uuid

import polars as pl
import pytest

from circuit_atlas.lake import Lake
from tests.llm_server import LLMServer

CORPORA = {"med": ["Insulin is produced by the", "Aspirin irreversibly inhibits the enzyme",
                   "The first-line drug for type 2 diabetes is"],
           "gen": ["The capital of France is", "Water boils at a temperature of",
                   "The opposite of hot is"]}
TABLES = ("edges", "neurons", "neuron_tokens", "neuron_corpora", "projections", "effects",
          "neuron_effects", "cooccurrence", "specificity", "roles", "cluster_assignments",
          "clusters")


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback (moto's server mode) with an empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(
        Bucket="atlas-bucket")
    yield {"endpoint_url": url, "key": "test", "secret": "test"}
    server.stop()


@pytest.fixture(scope="module")
def threads():
    """An in-process Dask cluster (threads): what a notebook user starts."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=":0") as c:
        yield c


def pipeline(lake: Lake, model, client, out_dir) -> dict:
    from circuit_atlas.analysis.cooccurrence import cooccurrence_lake
    from circuit_atlas.analysis.roles import write_roles
    from circuit_atlas.analysis.specificity import write_specificity
    from circuit_atlas.clustering.export import export_duckdb
    from circuit_atlas.clustering.html import export_html
    from circuit_atlas.clustering.methods import method_params
    from circuit_atlas.clustering.network import network_params
    from circuit_atlas.clustering.run import cluster_lake
    from circuit_atlas.compute.attribution import AttributionParams
    from circuit_atlas.compute.effects import write_effects
    from circuit_atlas.compute.graphs import graph_job
    from circuit_atlas.compute.projections import (
        ProjectionParams,
        reduced_neurons,
        write_projections,
    )
    from circuit_atlas.etl.reduce import reduce_lake
    from circuit_atlas.labeling import LLMSettings, label_lake

    corpora = sorted(CORPORA)
    for corpus, texts in CORPORA.items():
        lake.import_prompts([{"text": t} for t in texts], corpus)
        graph_job(lake, model, corpus, AttributionParams(candidates=30))
    reduce_lake(lake, model.name, corpora, client)
    # the projections of two layers' neurons: the same writes and reads, a tenth the time
    neurons = {layer: ids for layer, ids in reduced_neurons(
        lake, model.name, corpora, model.adapter.n_layers).items() if layer in (0, 29)}
    write_projections(lake, model, ProjectionParams(k=3, dtype="float32"), neurons=neurons)
    write_effects(lake, model, corpora, limit=2)  # two prompts: the same writes
    cooccurrence_lake(lake, model.name, corpora, client, min_count=1)
    write_specificity(lake, model.name, corpora, "med", "gen")
    write_roles(lake, model.name, corpora)
    key = "+".join(corpora)
    cluster_lake(lake, model.name, key, "infomap", network_params(min_count=1),
                 method_params("infomap"))
    with LLMServer() as server:
        settings = LLMSettings(model="fake-llm", base_url=server.url, concurrency=2,
                               timeout=5, max_retries=1)
        report = label_lake(lake, model.name, key, "output", settings, layers=[29])
    assert report.failed == 0 and report.ok > 0
    counts = export_duckdb(lake, model.name, key, str(out_dir / "atlas.duckdb"))
    export_html(lake, model.name, key, str(out_dir / "clusters.html"))
    frames = {t: lake.table(t).collect() for t in (*TABLES, "labels")}
    return {"frames": frames, "atlas": counts,
            "sql": lake.sql("SELECT count(*) AS n FROM graph_edges").item(),
            "duckdb": lake.duckdb().sql("SELECT count(*) FROM neurons").fetchall()[0][0]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, smollm2, threads):
    root = tmp_path_factory.mktemp("local")
    return pipeline(Lake.init(root / "lake"), smollm2, threads, root)


def _same(a: pl.DataFrame, b: pl.DataFrame, name: str) -> None:
    drop = [c for c in ("created_at",) if c in a.columns]
    a, b = a.drop(drop), b.drop(drop)
    assert a.columns == b.columns, name
    key = [c for c in a.columns if a.schema[c] != pl.List(pl.String)]
    assert a.sort(key).equals(b.sort(key)), name


def test_the_pipeline_on_an_s3_lake_equals_a_local_one(s3, tmp_path, smollm2, threads,
                                                     local_run):
    lake = Lake.init(f"s3://atlas-bucket/{uuid.uuid4().hex[:8]}",
                     storage_options={"client_kwargs": {"endpoint_url": s3["endpoint_url"]},
                                      "key": s3["key"], "secret": s3["secret"]})
    got = pipeline(lake, smollm2, threads, tmp_path)
    for name, frame in local_run["frames"].items():
        remote = got["frames"][name]
        # derived tables keep their partition columns on every filesystem
        assert remote["model"].unique().to_list() == ["HuggingFaceTB--SmolLM2-135M-Instruct"]
        assert remote.height > 0, name
        if name != "labels":
            _same(remote, frame, name)
    assert got["atlas"] == local_run["atlas"]
    assert got["sql"] == local_run["sql"] and got["duckdb"] == local_run["duckdb"]
    # nothing of the lake was written beside it on the local disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.duckdb", "clusters.html"]
