"""Precision by capability: the bf16 probe for real, ``auto`` per stage, and the chosen
dtype recorded where the results are."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from circuit_atlas import CircuitAtlasError
from circuit_atlas.compute import precision
from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.precision import Bf16Probe, auto_dtype, probe_bf16, resolve_dtype
from circuit_atlas.compute.projections import ProjectionParams, Projector
from tests.factories import tiny_llama

PROBE = ("import json; from circuit_atlas.compute.precision import probe_bf16, auto_dtype; "
         "p = probe_bf16('cpu'); print(json.dumps([p.fast, p.slowdown, "
         "auto_dtype('cpu', 'graphs'), auto_dtype('cpu', 'projections')]))")


def test_the_probe_times_both_precisions_and_decides_by_the_timing():
    probe = probe_bf16("cpu")
    assert probe.how == "timed" and probe.float32_s > 0 and probe.bfloat16_s > 0
    assert probe.fast == (probe.bfloat16_s <= probe.float32_s)
    assert probe_bf16("cpu") is probe  # measured once per process
    want = "bfloat16" if probe.fast else "float32"
    assert auto_dtype("cpu", "graphs") == auto_dtype("cpu", "projections") == want
    assert auto_dtype("cpu", "effects") == "float32"  # effects never take bf16


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="oneDNN's ISA cap is an x86 setting")
def test_the_probe_finds_the_slow_path_of_an_avx2_only_cpu():
    """oneDNN capped at AVX2 is what an AVX2-only CPU gives torch: no native bf16 kernel,
    so bf16 products take the scalar path, and auto must pick float32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True)
    fast, slowdown, graphs, projections = json.loads(out.stdout.strip().splitlines()[-1])
    assert not fast and slowdown > precision.SLOW
    assert graphs == projections == "float32"


def slow_probe(device="cpu"):
    return Bf16Probe(device, False, "timed", 0.001, 0.2)


def fast_probe(device="cpu"):
    return Bf16Probe(device, True, "timed", 0.002, 0.001)


def test_auto_is_float32_without_a_fast_path_and_explicit_bf16_warns_once(monkeypatch):
    monkeypatch.setattr(precision, "probe_bf16", slow_probe)
    monkeypatch.setattr(precision, "_warned", set())
    assert resolve_dtype("auto", "cpu", "graphs") == "float32"
    assert resolve_dtype("auto", "cpu", "projections") == "float32"
    said = []
    assert resolve_dtype("bfloat16", "cpu", "graphs", warn=said.append) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", "projections", warn=said.append) == "bfloat16"
    assert len(said) == 1 and "~200x slower than float32" in said[0]
    assert "auto picks float32" in said[0]
    with pytest.raises(CircuitAtlasError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    monkeypatch.setattr(precision, "probe_bf16", fast_probe)
    assert resolve_dtype("auto", "cpu", "graphs") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "effects") == "float32"


@pytest.mark.parametrize("probe", [slow_probe, fast_probe])
def test_projections_record_the_dtype_auto_chose(monkeypatch, probe):
    monkeypatch.setattr(precision, "probe_bf16", probe)
    adapter = adapter_for(tiny_llama(seed=2, vocab=300, neurons=20, n_layers=1,
                                     dtype=torch.float32))
    params = ProjectionParams(k=4).resolved("cpu")
    assert params.dtype == ("bfloat16" if probe().fast else "float32")
    assert Projector(adapter, ProjectionParams(k=4)).low == getattr(torch, params.dtype)


def test_graphs_on_a_cpu_without_fast_bf16_run_and_record_float32(monkeypatch, tmp_path):
    from circuit_atlas.compute.attribution import AttributionParams
    from circuit_atlas.compute.graphs import graph_job
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake import Lake

    monkeypatch.setattr(precision, "probe_bf16", slow_probe)
    model = load_model("smollm2")  # dtype auto
    assert model.dtype_name == "float32"
    lake = Lake.init(tmp_path / "lake")
    lake.import_prompts([{"text": "The capital of France is"}], "c")
    graph_job(lake, model, "c", AttributionParams(candidates=20))
    (shard,) = lake.shards()
    assert shard.commit["params"]["dtype"] == "float32"


def test_effects_refuse_a_half_precision_model():
    from circuit_atlas.compute.effects import write_effects
    from circuit_atlas.compute.models import LoadedModel

    model = tiny_llama(dtype=torch.bfloat16)
    loaded = LoadedModel("tiny", "r", model, None, adapter_for(model))
    with pytest.raises(CircuitAtlasError, match="effects need a float32 or float64 model"):
        write_effects(None, loaded, ["c"])


def test_projections_of_some_neurons_equal_those_rows_of_all():
    adapter = adapter_for(tiny_llama(seed=3, vocab=300, neurons=40, n_layers=2))
    projector = Projector(adapter, ProjectionParams(k=5, dtype="float32"))
    projector.chunk = 7  # several chunks over the subset
    every = pl.DataFrame(projector.layer(1))
    some = np.array([33, 2, 17, 5, 39])
    key = ["neuron", "kind", "sign", "rank"]
    got = pl.DataFrame(projector.layer(1, some)).sort(key)
    want = every.filter(pl.col("neuron").is_in(some.tolist())).sort(key)
    assert got.equals(want, null_equal=True)
    assert got["neuron"].unique().sort().to_list() == sorted(some.tolist())


def test_auto_on_dask_workers_is_decided_on_a_worker(client, monkeypatch):
    from circuit_atlas.compute.workers import worker_dtype

    on_workers = set(client.run(auto_dtype, "cpu", "graphs").values())
    # this process claims the opposite: the job must follow its workers, not its client
    monkeypatch.setattr(precision, "probe_bf16",
                        slow_probe if on_workers == {"bfloat16"} else fast_probe)
    assert worker_dtype(client, "cpu", "auto") in on_workers
    assert auto_dtype("cpu", "graphs") not in on_workers or len(on_workers) > 1
    assert worker_dtype(client, "cpu", "float64") == "float64"
    with pytest.raises(CircuitAtlasError, match="no Dask worker declares a GPU"):
        worker_dtype(client, "cuda", "auto")
