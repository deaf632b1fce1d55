"""One way to get a Dask client for every command: local, an address, or SLURM.

* ``None`` or ``"local"``: a ``LocalCluster`` sized to this machine: one worker
  process per core (``n_workers`` to change), cores and memory split between them;
* ``"slurm"``: a ``dask_jobqueue.SLURMCluster``; its settings come from the
  ``jobqueue.slurm`` section of the Dask config (YAML in ``~/.config/dask`` or
  ``DASK_JOBQUEUE__SLURM__*`` variables), then a named profile (``jobqueue.yaml``
  next to this module ships ``cpu-reduce`` and ``gpu-compute``; add your own under
  ``circuit-atlas.slurm-profiles``), then keyword arguments, exactly as dask-jobqueue
  users expect. Before submitting, the partition, cores and memory are checked
  against ``sinfo``, and a cluster whose workers do not arrive in time is an error
  that shows the jobs' states, not a hang;
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
              "job_extra_directives", "worker_extra_args", "job_script_prologue",
              "local_directory", "log_directory",
              "interface", "scheduler_options", "death_timeout")
WAIT_S = 300.0  # for the first worker of a SLURM cluster


def _load_profiles() -> tuple[str, ...]:
    """Load our Dask config defaults; returns the worker environment variables they set."""
    import dask.config
    import distributed  # noqa: F401  (loads its defaults: ours go over them, not under)
    import yaml

    with open(os.path.join(os.path.dirname(__file__), "jobqueue.yaml")) as f:
        defaults = yaml.safe_load(f)
    key = "distributed.nanny.pre-spawn-environ"
    theirs = dict(dask.config.get(key, default={}) or {})  # Dask's defaults, or the user's
    dask.config.update_defaults(defaults)
    ours = defaults["distributed"]["nanny"]["pre-spawn-environ"]
    # a default of Dask's own (its trim threshold) gives way to ours; a user's setting
    # (their config files or DASK_* variables) stays
    dask_own = {}
    for d in dask.config.defaults:
        dask_own.update(d.get("distributed", {}).get("nanny", {}).get("pre-spawn-environ", {}))
    override = {n: v for n, v in ours.items()
                if n in theirs and n in dask_own and theirs[n] == dask_own[n]}
    if override:
        dask.config.set({f"{key}.{n}": v for n, v in override.items()})
    return tuple(ours)


WORKER_ENVIRON = _load_profiles()


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
                adapt: tuple[int, int] | None = None, wait_s: float = WAIT_S,
                echo: Callable[[str], None] | None = print, **slurm: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for the chosen cluster, closed (with the cluster) on exit.

    ``n_workers``/``memory_limit`` size a local cluster (memory per worker, e.g. "2GB");
    ``jobs`` (or ``adapt`` = (min, max) jobs), ``profile`` and the ``SLURM_KEYS``
    keywords configure SLURM (None: from the config).
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
            if adapt is not None:
                sc.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
            else:
                sc.scale(jobs=jobs or 1)
            with Client(sc) as client:
                _wait_for_workers(client, sc, wait_s)
                what = (f"adaptive {adapt[0]}-{adapt[1]} jobs" if adapt is not None
                        else f"{jobs or 1} job(s)")
                _announce(client, f"SLURM cluster ({what})", echo)
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


def slurm_settings(profile: str | None = None, gpus: int = 0, **overrides: Any
                   ) -> dict[str, Any]:
    """The SLURMCluster keywords: a named profile's settings, then non-None overrides
    (what is in neither comes from dask-jobqueue's own ``jobqueue.slurm`` config).
    ``gpus``: each job asks for that many GPUs (``--gres=gpu:N`` unless a gres/gpus
    directive is already there) and its worker declares the resource ``GPU=N``, which
    the GPU stages' tasks require, so no GPU task lands on a CPU worker."""
    import dask.config

    unknown = set(overrides) - set(SLURM_KEYS)
    if unknown:
        raise CircuitAtlasError(f"unknown SLURM setting(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(SLURM_KEYS)}")
    kwargs: dict[str, Any] = {}
    if profile is not None:
        profiles = dask.config.get("circuit-atlas.slurm-profiles", default={}) or {}
        if profile not in profiles:
            raise CircuitAtlasError(f"unknown SLURM profile {profile!r}; known: "
                                    f"{', '.join(sorted(profiles))} (add your own under "
                                    "circuit-atlas.slurm-profiles in the Dask config)")
        kwargs.update(profiles[profile])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if kwargs.get("cores") and int(kwargs.get("processes") or 1) > int(kwargs["cores"]):
        kwargs["processes"] = int(kwargs["cores"])  # fewer cores than a profile's workers
    if gpus:
        import dask.config

        directives = list(kwargs.get("job_extra_directives") or dask.config.get(
            "jobqueue.slurm.job-extra-directives", default=[]) or [])
        if not any("gres" in d or "gpus" in d for d in directives):
            directives.append(f"--gres=gpu:{gpus}")
        args = list(kwargs.get("worker_extra_args") or dask.config.get(
            "jobqueue.slurm.worker-extra-args", default=[]) or [])
        if "--resources" not in args:
            args += ["--resources", f"GPU={gpus}"]
        kwargs.update(job_extra_directives=directives, worker_extra_args=args)
    return {**kwargs, "job_script_prologue": _with_worker_environ(kwargs)}


def _with_worker_environ(kwargs: dict[str, Any]) -> list[str]:
    """The job script prologue, exporting the worker environment of jobqueue.yaml (a
    SLURM job's nanny reads its own Dask config, not ours); a variable the prologue
    already sets is left to it."""
    import dask.config

    prologue = list(kwargs.get("job_script_prologue") or dask.config.get(
        "jobqueue.slurm.job-script-prologue", default=[]) or [])
    mine = {}
    for name in WORKER_ENVIRON:
        value = dask.config.get(f"distributed.nanny.pre-spawn-environ.{name}", default=None)
        if value is not None and not any(name in line for line in prologue):
            prologue.append(f"export {name}={value}")
            mine[name] = str(value)
    # the job's nanny sets its own pre-spawn environment over what the job exports
    # (MALLOC_TRIM_THRESHOLD_ among it): give it ours in its own config too
    if mine:
        prologue.append(f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{mine!r}"')
    return prologue


def slurm_cluster(profile: str | None = None, check: bool = True, gpus: int = 0,
                  **overrides: Any):
    """A ``SLURMCluster`` from the ``jobqueue.slurm`` config, a profile and overrides,
    checked against the cluster's partitions first (``check``)."""
    from dask_jobqueue import SLURMCluster

    kwargs = slurm_settings(profile, gpus, **overrides)
    if check:
        preflight(kwargs)
    try:
        return SLURMCluster(**kwargs)
    except ValueError as e:  # dask-jobqueue says which setting is missing, and an example
        raise CircuitAtlasError(f"SLURM cluster: {e}") from e


def partitions() -> dict[str, dict[str, Any]] | None:
    """{partition: {"cpus": max CPUs of a node, "memory_mb": max memory, "default": bool}}
    from ``sinfo``, or None where there is no sinfo."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %c %m"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise CircuitAtlasError(f"sinfo failed: {e}; is the SLURM controller up?") from e
    found: dict[str, dict[str, Any]] = {}
    for line in out.split("\n"):
        if not line.strip():
            continue
        name, cpus, mem = line.split()[:3]
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = found.setdefault(name, {"cpus": 0, "memory_mb": 0, "default": default})
        entry["cpus"] = max(entry["cpus"], int(cpus.rstrip("+")))
        entry["memory_mb"] = max(entry["memory_mb"], int(mem.rstrip("+")))
    return found


def preflight(kwargs: dict[str, Any]) -> None:
    """Refuse at once what SLURM would reject, or leave pending forever: an unknown
    partition, more cores or memory per job than any node of the partition has."""
    import dask.config
    from dask.utils import parse_bytes

    known = partitions()
    if not known:
        return
    queue = kwargs.get("queue") or dask.config.get("jobqueue.slurm.queue", default=None)
    if queue is None:
        queue = next((p for p, v in known.items() if v["default"]), None)
    if queue not in known:
        raise CircuitAtlasError(f"SLURM partition {queue!r} does not exist here; partitions: "
                                f"{', '.join(known)} (set --queue/--partition)")
    node = known[queue]
    cores = kwargs.get("cores") or dask.config.get("jobqueue.slurm.cores", default=None)
    if cores and int(cores) > node["cpus"]:
        raise CircuitAtlasError(f"{cores} cores per job, but the nodes of partition {queue!r}"
                                f" have at most {node['cpus']}: the job would pend forever")
    memory = kwargs.get("memory") or dask.config.get("jobqueue.slurm.memory", default=None)
    if memory and parse_bytes(str(memory)) > node["memory_mb"] * 2**20:
        raise CircuitAtlasError(f"{memory} per job, but the nodes of partition {queue!r} have "
                                f"at most {node['memory_mb']} MB")


def _wait_for_workers(client: Any, cluster: Any, wait_s: float) -> None:
    """The first worker, or an error with the jobs' SLURM states (not a silent hang)."""
    import subprocess

    try:
        client.wait_for_workers(1, timeout=wait_s)
    except TimeoutError:
        ids = [j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None)]
        states = ""
        if ids:
            states = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)],
                                    capture_output=True, text=True).stdout.strip()
        raise CircuitAtlasError(
            f"no SLURM worker connected within {wait_s:.0f} s; jobs: "
            f"{states or 'none submitted'} (see the job logs, --log-directory)") from None


def _announce(client: Any, what: str, echo: Callable[[str], None] | None) -> None:
    if echo is not None:
        link = client.dashboard_link or "(no dashboard)"
        echo(f"dask {what}: {len(client.scheduler_info()['workers'])} worker(s), "
             f"dashboard {link}")
