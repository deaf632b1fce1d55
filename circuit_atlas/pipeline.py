"""Running the stages with progress displays: shared by the CLI and the demo."""

from __future__ import annotations

import time


def cluster_client(cluster: str, workers=None, worker_memory=None, queue=None, account=None,
                   cores=None, memory=None, walltime=None, jobs=None, job_extra_directives=(),
                   echo=print):
    """A Dask client for the cluster options every Dask command shares."""
    from circuit_atlas.etl.clusters import dask_client

    return dask_client(cluster, n_workers=workers, memory_limit=worker_memory, jobs=jobs,
                       queue=queue, account=account, cores=cores, memory=memory,
                       walltime=walltime, echo=echo,
                       job_extra_directives=list(job_extra_directives) or None)


def compute_graphs(lake, model_spec, corpus: str, params, console, device: str = "cpu",
                   dtype: str = "float32", client=None, **kwargs):
    """Run the graph job with a progress bar (graphs/s). ``model_spec`` may be a loaded
    model; with a Dask ``client`` it must be a name, which the workers load."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from circuit_atlas.compute.graphs import run_graphs
    from circuit_atlas.compute.models import load_model

    if isinstance(model_spec, str):
        with console.status(f"loading {model_spec} ..."):
            model = load_model(model_spec, device=device, dtype=dtype)
    else:
        model = model_spec
    columns = (TextColumn("[bold]graphs[/] {task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(corpus, total=None, rate="")
        start = time.perf_counter()

        def tick(n: int, total: int) -> None:
            progress.update(task, total=total, advance=n)
            done = progress.tasks[task].completed
            progress.update(task, rate=f"{done / (time.perf_counter() - start):.2f} graphs/s")

        report = run_graphs(lake, model, corpus, params, on_graph=tick, client=client,
                            model_spec=model_spec if client is not None else None, **kwargs)
    console.print(f"[green]graphs[/] {corpus}: {report.computed} computed, "
                  f"{report.skipped} already committed, {report.shards} shard(s), "
                  f"{report.seconds:.1f} s (model {model.name}, params {report.params_hash})")
    return report


def reduce_tables(lake, model_spec: str, corpora: list[str], console, cluster=None, **kwargs):
    """Run the reduce with a progress bar on the chosen cluster (local by default)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from circuit_atlas.compute.models import ALIASES
    from circuit_atlas.etl.reduce import reduce_lake

    model = ALIASES.get(model_spec, model_spec)
    cluster = cluster or {"cluster": "local"}
    with cluster_client(**cluster, echo=console.print) as client, Progress(
            TextColumn("[bold]reduce[/]"), BarColumn(), MofNCompleteColumn(),
            console=console) as progress:
        task = progress.add_task("reduce", total=None)
        report = reduce_lake(lake, model, corpora, client, on_progress=lambda d, t:
                             progress.update(task, completed=d, total=t), **kwargs)
    what = "from scratch" if report.from_scratch else f"{report.new_shards} new shard(s)"
    tables = ", ".join(f"{t} {n:,} rows" for t, n in report.rows.items()) or "unchanged"
    console.print(f"[green]reduce[/] {report.corpus}: {report.shards} shard(s), {what}; "
                  f"{tables}; {report.seconds:.1f} s")
    return report
