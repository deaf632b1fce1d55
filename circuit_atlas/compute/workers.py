"""What a compute stage needs to run on Dask workers: the model loaded once per
worker process, the resources its tasks ask for, the dtype every task of a job runs
in, and the session (cluster and model) a ``run_*`` function opens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from circuit_atlas.compute.models import LoadedModel, ModelRef, load_model
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Progress, as_cluster, connect

_WORKER_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def worker_model(spec: str, device: str, dtype: str) -> LoadedModel:
    """The model a Dask task runs: loaded once per worker process and kept (``dtype``
    already resolved, so that every task of a job runs the same one)."""
    key = (spec, device, dtype)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS[key] = load_model(spec, device=device, dtype=dtype)
    return _WORKER_MODELS[key]


def worker_resources(client, device: str) -> dict[str, int] | None:
    """The Dask resources a task on ``device`` needs: a GPU device asks for a ``GPU``
    worker (refused at once when no worker declares one: the task would wait forever)."""
    if not device.startswith("cuda"):
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(w.get("resources", {}).get("GPU") for w in workers):
        raise CircuitAtlasError(
            f"device {device!r}, but no Dask worker declares a GPU resource, so the "
            "tasks would wait forever: start workers with --resources GPU=1 (with "
            "--cluster slurm and --device cuda this is done for you)")
    return {"GPU": 1}


def worker_dtype(client, device: str, dtype: str, stage: str = "graphs") -> str:
    """``dtype`` for ``stage`` on the workers' ``device``: ``auto`` is resolved on a
    worker (the client may have no GPU, or another CPU), and every shard of the job then
    runs in that one dtype, so that the job's results share one identity."""
    from circuit_atlas.compute.precision import AUTO, auto_dtype

    if dtype != AUTO:
        return dtype
    return client.submit(auto_dtype, device, stage, pure=False,
                         resources=worker_resources(client, device)).result()


@contextmanager
def compute_session(model: str | LoadedModel, device: str, dtype: str, stage: str,
                    cluster, progress: Progress) -> Iterator[tuple[object, LoadedModel | ModelRef]]:
    """(Dask client or None, the model) for a compute stage: with a cluster and a
    model name the workers load it (here only its config is read, and ``auto`` is
    resolved on a worker); otherwise it is loaded here. On SLURM with a CUDA device
    each job asks for a GPU."""
    from circuit_atlas.compute.models import loaded, model_ref

    cluster = as_cluster(cluster, "none")
    on_slurm = getattr(cluster, "cluster", None) == "slurm"
    gpus = 1 if on_slurm and device.startswith("cuda") else 0
    with connect(cluster, default="none", progress=progress, gpus=gpus) as client:
        if isinstance(model, str) and client is not None:
            ready = model_ref(model, device=device,
                              dtype=worker_dtype(client, device, dtype, stage))
        else:
            ready = loaded(model, device, dtype, stage, progress)
        yield client, ready
