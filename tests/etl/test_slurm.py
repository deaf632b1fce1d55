"""The Dask stages on a real SLURM (the single node scripts/slurm starts): the same
tables as on a LocalCluster, graph jobs on SLURM workers, a cancelled worker job
replaced without losing anything, and clear errors instead of hangs."""

import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

from circuit_atlas import CircuitAtlasError
from circuit_atlas.cli import cli
from circuit_atlas.compute.attribution import AttributionParams
from circuit_atlas.compute.graphs import graph_job
from circuit_atlas.etl.clusters import dask_client
from circuit_atlas.etl.reduce import reduce_lake
from circuit_atlas.lake import Lake, prompt_id
from tests.etl.test_reduce import make_lake, published

pytestmark = pytest.mark.slurm


def slurm_client(tmp_path, jobs=2, adapt=None, memory="3GB"):
    """Workers of one core each, everything on loopback."""
    return dask_client("slurm", jobs=jobs, adapt=adapt, cores=1, processes=1, memory=memory,
                       walltime="00:20:00", interface="lo", death_timeout=60,
                       scheduler_options={"dashboard_address": ":0"},
                       local_directory=str(tmp_path / "dask"),
                       log_directory=str(tmp_path / "logs"), wait_s=120, echo=None)


def our_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-n", "dask-worker"], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


def test_reduce_on_slurm_equals_local(tmp_path, slurm, client):
    on_slurm, local = make_lake(tmp_path / "s", shards=5), make_lake(tmp_path / "l", shards=5)
    with slurm_client(tmp_path) as sc:
        assert len(sc.scheduler_info(n_workers=-1)["workers"]) >= 1
        reduce_lake(on_slurm, "test-org/tiny-llama", ["c"], sc)
    reduce_lake(local, "test-org/tiny-llama", ["c"], client)
    for table in ("edges", "neurons", "neuron_tokens", "neuron_corpora"):
        assert published(on_slurm, table).equals(published(local, table)), table


def test_cancelled_worker_job_is_replaced_and_nothing_is_lost(tmp_path, slurm, client):
    lake, reference = (make_lake(tmp_path / n, shards=14) for n in ("s", "l"))
    cancelled = []
    with slurm_client(tmp_path, jobs=None, adapt=(2, 2)) as sc:
        sc.wait_for_workers(2, timeout=120)
        before = our_jobs()

        def progress(done, total):
            if done == 2 and not cancelled:  # mid-run: kill one worker's job
                victim = sorted(before)[0]
                subprocess.run(["scancel", victim], check=True)
                cancelled.append(victim)

        reduce_lake(lake, "test-org/tiny-llama", ["c"], sc, chunk=2, on_progress=progress)
        deadline = time.time() + 60
        while time.time() < deadline and not (our_jobs() - before):
            time.sleep(1)
        replaced = our_jobs() - before
    assert cancelled and replaced, "adaptive scaling should have submitted a new job"
    reduce_lake(reference, "test-org/tiny-llama", ["c"], client)
    for table in ("edges", "neurons"):
        assert published(lake, table).equals(published(reference, table)), table


def test_graph_job_on_slurm_cpu_workers(tmp_path, slurm, smollm2):
    texts = ["The capital of France is", "Insulin is produced by the", "Two plus two equals"]
    lake = Lake.init(tmp_path / "lake")
    lake.import_prompts([{"text": t} for t in texts], "c")
    params = AttributionParams(candidates=30)
    with slurm_client(tmp_path, memory="4GB") as sc:
        report = graph_job(lake, smollm2, "c", params, client=sc, model_spec="smollm2",
                            shard_size=1)
    assert report.computed == 3
    assert sorted(lake.scan("graphs").collect()["prompt_id"]) == sorted(map(prompt_id, texts))
    # the same graphs as computed in this process
    here = Lake.init(tmp_path / "here")
    here.import_prompts([{"text": t} for t in texts], "c")
    graph_job(here, smollm2, "c", params)
    cols = ["graph_id", "src_layer", "src_neuron", "src_pos", "tgt_layer", "tgt_neuron", "tgt_pos",
            "weight"]
    a = lake.scan("graph_edges").select(cols).sort(cols[:7]).collect()
    b = here.scan("graph_edges").select(cols).sort(cols[:7]).collect()
    assert a.drop("weight").equals(b.drop("weight"))  # the same edges
    # weights to float32 rounding: a one-core worker sums in another order than here
    np.testing.assert_allclose(a["weight"].to_numpy(), b["weight"].to_numpy(), rtol=1e-3,
                               atol=1e-5)


def test_gpu_directives_are_rendered(slurm):
    out = CliRunner().invoke(cli, ["slurm", "script", "--gpus", "1", "--cores", "1",
                                   "--memory", "1GB"])
    assert out.exit_code == 0, out.output
    assert "#SBATCH --gres=gpu:1" in out.output and "--resources GPU=1" in out.output
    out = CliRunner().invoke(cli, ["slurm", "script", "--slurm-profile", "cpu-reduce",
                                   "--cores", "1", "--memory", "1GB", "--queue", "debug"])
    assert out.exit_code == 0 and "--gres" not in out.output and "#SBATCH -p debug" in out.output


@pytest.mark.timeout(90)  # both are refused before anything waits for a worker
def test_wrong_partition_and_impossible_jobs_are_clear_errors(tmp_path, slurm):
    with pytest.raises(CircuitAtlasError, match="partition 'nope' does not exist"), \
            dask_client("slurm", queue="nope", cores=1, memory="1GB", echo=None):
        pass
    with pytest.raises(CircuitAtlasError, match="pend forever"), \
            dask_client("slurm", cores=512, memory="1GB", echo=None):
        pass
    lake = make_lake(tmp_path / "l", shards=1)
    out = CliRunner().invoke(cli, ["reduce", "--lake", lake.url, "--corpus", "c", "--model",
                                   "test-org/tiny-llama", "--cluster", "slurm", "--partition",
                                   "nope"])
    assert out.exit_code == 1 and "partition 'nope'" in out.output


def test_cancelled_graph_job_is_recomputed_and_its_debris_cleaned(tmp_path, slurm, smollm2):
    """A graph job's worker cancelled mid-run: its shard is computed again on the job
    that replaces it, every prompt is committed exactly once, and what the killed
    writer left behind is debris that cleanup removes."""
    from circuit_atlas.lake.cleanup import uncommitted_shards

    texts = [f"Patient {i} was given a dose of" for i in range(8)]
    lake = Lake.init(tmp_path / "lake")
    lake.import_prompts([{"text": t} for t in texts], "c")
    params = AttributionParams(candidates=30)
    cancelled = []
    with slurm_client(tmp_path, jobs=None, adapt=(1, 1), memory="4GB") as sc:
        sc.wait_for_workers(1, timeout=120)
        before = our_jobs()

        def tick(done, total):
            if not cancelled:  # the first shard is committed: cancel the worker's job
                subprocess.run(["scancel", *sorted(before)], check=True)
                cancelled.append(True)

        report = graph_job(lake, smollm2, "c", params, client=sc, model_spec="smollm2",
                            shard_size=2, on_graph=tick)
    assert cancelled and report.computed == len(texts)
    committed = [p for s in lake.shards() for p in s.prompt_ids]
    assert sorted(committed) == sorted(map(prompt_id, texts))  # each exactly once
    assert graph_job(lake, smollm2, "c", params).computed == 0  # nothing left to do
    assert uncommitted_shards(lake), "the cancelled worker was writing a shard"
    lake.cleanup(min_age_s=0)
    assert uncommitted_shards(lake) == []


def test_slurm_workers_start_with_the_worker_environment(tmp_path, slurm):
    """A job's nanny reads its own Dask config, so the job script exports what
    jobqueue.yaml sets for workers, and the workers run with it."""
    import os

    out = CliRunner().invoke(cli, ["slurm", "script", "--cores", "1", "--memory", "1GB"])
    assert "export MALLOC_MMAP_THRESHOLD_=33554432" in out.output, out.output
    with slurm_client(tmp_path, jobs=1) as sc:
        seen = sc.run(lambda: (os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                               os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                               os.environ.get("POLARS_MAX_THREADS")))
    assert set(seen.values()) == {("33554432", "67108864", "1")}
