"""The shape every stage's public function shares, and what those functions share.

Each stage exports ``run_<stage>(lake, *, model, corpora, params, cluster=None,
progress=None) -> <Stage>Report``:

* ``lake``: a :class:`~circuit_atlas.lake.Lake` or its path/URL;
* ``model``: a hub id, folder, GGUF file or ``"smollm2"`` (compute stages also take
  a loaded model);
* ``corpora``: one corpus name or several (a joint reduce of several is one table
  set, ``corpus=<a>+<b>``); the atlas stages default to the only reduced set;
* ``params``: the stage's parameter dataclass (its fields are the CLI's options);
* ``cluster``: where Dask work runs: a :class:`ClusterSpec`, ``"local"``,
  ``"slurm"``, a scheduler address, or a ``distributed.Client`` of your own;
* ``progress``: a :class:`Progress` that hears counts and messages (the CLI's draws
  bars; the default says nothing, and sends messages to the ``circuit_atlas``
  logger).

The report is a dataclass of the figures the CLI prints; ``str(report)`` is that line.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

log = logging.getLogger("circuit_atlas")


class Progress:
    """What a stage tells the person waiting. Subclass it to show something; this one
    shows nothing and logs messages."""

    def update(self, task: str, done: int, total: int | None = None) -> None:
        """``done`` of ``total`` (None: unknown yet) units of ``task`` are finished."""

    def message(self, text: str) -> None:
        """A line worth showing: a dashboard link, a warning, a phase that begins."""
        log.info(text)


@dataclass
class ClusterSpec:
    """Where Dask work runs; the SLURM fields override the ``jobqueue.slurm`` section
    of the Dask config, then the named profile."""

    cluster: str = "local"
    """'local' (a LocalCluster sized to this machine), 'slurm' (dask-jobqueue), 'none'
    (in this process, where the stage can), or a scheduler address tcp://host:port."""
    workers: int | None = None
    """Local workers (default: one per core)."""
    worker_memory: str | None = None
    """Memory limit per local worker, e.g. 2GB."""
    queue: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    cores: int | None = None
    """Cores per SLURM job."""
    memory: str | None = None
    """Memory per SLURM job, e.g. 24GB."""
    walltime: str | None = None
    """SLURM walltime, e.g. 01:00:00."""
    jobs: int | None = None
    """SLURM jobs to start (default 1)."""
    adapt_min: int | None = None
    """Adaptive SLURM: at least this many jobs."""
    adapt_max: int | None = None
    """Adaptive SLURM: at most this many jobs."""
    job_extra_directives: tuple[str, ...] = ()
    """Extra #SBATCH line, e.g. --gres=gpu:1 (repeatable)."""
    worker_extra_args: tuple[str, ...] = ()
    """Extra argument of the SLURM worker command (repeatable)."""
    slurm_profile: str | None = None
    """Named SLURM settings: cpu-reduce, gpu-compute, or yours under
    circuit-atlas.slurm-profiles."""
    local_directory: str | None = None
    """Worker scratch directory on the nodes."""
    log_directory: str | None = None
    """Where SLURM job logs go."""
    interface: str | None = None
    """Network interface of scheduler and workers, e.g. ib0."""

    def adapt(self) -> tuple[int, int] | None:
        from circuit_atlas.errors import CircuitAtlasError

        if self.adapt_min is None and self.adapt_max is None:
            return None
        lo = self.adapt_min if self.adapt_min is not None else 0
        hi = self.adapt_max if self.adapt_max is not None else max(lo, 1)
        if hi < max(lo, 1):
            raise CircuitAtlasError(f"--adapt-max {hi} is below --adapt-min {lo}")
        return lo, hi

    def slurm_overrides(self) -> dict[str, Any]:
        """The keywords of ``etl.clusters.slurm_cluster`` these settings give."""
        return {"profile": self.slurm_profile, "queue": self.queue, "account": self.account,
                "cores": self.cores, "memory": self.memory, "walltime": self.walltime,
                "local_directory": self.local_directory,
                "log_directory": self.log_directory, "interface": self.interface,
                "job_extra_directives": list(self.job_extra_directives) or None,
                "worker_extra_args": list(self.worker_extra_args) or None}


def as_cluster(cluster: Any, default: str) -> Any:
    """``cluster`` as a ClusterSpec, or a Client of the caller's, as it came."""
    if cluster is None:
        return ClusterSpec(cluster=default)
    if isinstance(cluster, str):
        return ClusterSpec(cluster=cluster)
    return cluster


@contextlib.contextmanager
def connect(cluster: Any, *, default: str, progress: Progress | None = None, gpus: int = 0
            ) -> Iterator[Any]:
    """A Dask client for ``cluster`` (see :func:`as_cluster`), or None for 'none'. A
    Client passed in is used as it is and left open."""
    spec = as_cluster(cluster, default)
    if not isinstance(spec, ClusterSpec):
        yield spec
        return
    if spec.cluster == "none":
        yield None
        return
    from circuit_atlas.etl.clusters import dask_client

    echo = (progress or Progress()).message
    with dask_client(spec.cluster, n_workers=spec.workers, memory_limit=spec.worker_memory,
                     jobs=spec.jobs, adapt=spec.adapt(), echo=echo, gpus=gpus,
                     **spec.slurm_overrides()) as client:
        yield client


def as_corpora(corpora: str | Sequence[str] | None) -> list[str]:
    """A corpus name or names as a list (empty: the stage's default)."""
    if corpora is None:
        return []
    if isinstance(corpora, str):
        return [corpora]
    return list(corpora)


def atlas_corpora(lake: Any, model: str, corpora: str | Sequence[str] | None) -> list[str]:
    """The corpora of a reduce: ``corpora``, or those of the only table set the lake
    holds for ``model`` (see ``Lake.reduced_corpus``)."""
    return lake.reduced_corpus(model, as_corpora(corpora)).split("+")


def open_lake(lake: Any) -> Any:
    """A Lake from a Lake or a path/URL."""
    from circuit_atlas.lake import Lake

    return lake if isinstance(lake, Lake) else Lake(lake)


@dataclass
class Report:
    """Base of the stages' reports: the figures, as a dict and as the line printed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))


def lazy_exports(package: str, exports: dict[str, str]) -> Any:
    """A module ``__getattr__`` for ``package`` that imports each public name from its
    module (``exports``: name -> module under the package) on first use, so that
    importing a stage package loads none of its heavy dependencies."""

    def getattr_(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr_
