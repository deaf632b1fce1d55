"""One way to get a Dask client for every command: local, an address, or SLURM.

* ``None`` or ``"local"``: a ``LocalCluster`` sized to this machine: one worker
  process per core (``n_workers`` to change), cores and memory split between them;
* ``"slurm"``: a ``dask_jobqueue.SLURMCluster``; its settings come from the
  ``jobqueue.slurm`` section of the Dask config (YAML in ``~/.config/dask`` or
  ``DASK_JOBQUEUE__SLURM__*`` variables), and keyword arguments override them,
  exactly as dask-jobqueue users expect;
* anything else: the address of a running scheduler (``tcp://host:8786``).

The dashboard link is printed as soon as the cluster is up.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from circuit_atlas.errors import CircuitAtlasError

SLURM_KEYS = ("queue", "account", "cores", "processes", "memory", "walltime",
              "job_extra_directives", "worker_extra_args", "local_directory", "log_directory",
              "interface", "scheduler_options", "death_timeout")


def local_cluster_kwargs(n_workers: int | None = None, memory_limit: str | None = None
                         ) -> dict[str, Any]:
    import psutil

    cores = os.cpu_count() or 1
    n = n_workers or cores
    memory = memory_limit or f"{int(psutil.virtual_memory().total * 0.8 / n / 2**20)}MiB"
    return {"n_workers": n, "threads_per_worker": max(1, cores // n), "memory_limit": memory,
            "processes": True, "dashboard_address": ":0"}


@contextlib.contextmanager
def dask_client(cluster: str | None = None, *, n_workers: int | None = None,
                memory_limit: str | None = None, jobs: int | None = None,
                echo: Callable[[str], None] | None = print, **slurm: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for the chosen cluster, closed (with the cluster) on exit.

    ``n_workers``/``memory_limit`` size a local cluster (memory per worker, e.g. "2GB");
    ``jobs`` and the ``SLURM_KEYS`` keywords configure SLURM (None: from the config).
    """
    from distributed import Client, LocalCluster

    if cluster in (None, "local"):
        with LocalCluster(**local_cluster_kwargs(n_workers, memory_limit)) as lc, \
                Client(lc) as client:
            _announce(client, "local cluster", echo)
            yield client
        return
    if cluster == "slurm":
        with slurm_cluster(**slurm) as sc:
            sc.scale(jobs=jobs or 1)
            with Client(sc) as client:
                _announce(client, f"SLURM cluster ({jobs or 1} job(s))", echo)
                yield client
        return
    if "://" not in cluster and ":" not in cluster:
        raise CircuitAtlasError(
            f"unknown cluster {cluster!r}: use 'local', 'slurm' or a scheduler address "
            "such as tcp://host:8786")
    try:
        client = Client(cluster, timeout="20s")
    except OSError as e:
        raise CircuitAtlasError(f"cannot reach the Dask scheduler at {cluster}: {e}") from e
    with client:
        _announce(client, f"scheduler {cluster}", echo)
        yield client


def slurm_cluster(**overrides: Any):
    """A ``SLURMCluster`` from the ``jobqueue.slurm`` config, with non-None overrides."""
    from dask_jobqueue import SLURMCluster

    unknown = set(overrides) - set(SLURM_KEYS)
    if unknown:
        raise CircuitAtlasError(f"unknown SLURM setting(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(SLURM_KEYS)}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SLURMCluster(**kwargs)
    except ValueError as e:  # dask-jobqueue says which setting is missing, and an example
        raise CircuitAtlasError(f"SLURM cluster: {e}") from e


def _announce(client: Any, what: str, echo: Callable[[str], None] | None) -> None:
    if echo is not None:
        link = client.dashboard_link or "(no dashboard)"
        echo(f"dask {what}: {len(client.scheduler_info()['workers'])} worker(s), "
             f"dashboard {link}")
