"""Running the stages with progress displays: shared by the CLI and the demo."""

from __future__ import annotations

import time

from circuit_atlas.compute.names import model_name


def cluster_client(cluster: str, workers=None, worker_memory=None, queue=None, account=None,
                   cores=None, memory=None, walltime=None, jobs=None, job_extra_directives=(),
                   adapt_min=None, adapt_max=None, worker_extra_args=(), slurm_profile=None,
                   local_directory=None, log_directory=None, interface=None, echo=print,
                   **extra):
    """A Dask client for the cluster options every Dask command shares."""
    from circuit_atlas.errors import CircuitAtlasError
    from circuit_atlas.etl.clusters import dask_client

    adapt = None
    if adapt_min is not None or adapt_max is not None:
        lo = adapt_min if adapt_min is not None else 0
        hi = adapt_max if adapt_max is not None else max(lo, 1)
        if hi < max(lo, 1):
            raise CircuitAtlasError(f"--adapt-max {hi} is below --adapt-min {lo}")
        adapt = (lo, hi)
    return dask_client(cluster, n_workers=workers, memory_limit=worker_memory, jobs=jobs,
                       adapt=adapt, queue=queue, account=account, cores=cores, memory=memory,
                       walltime=walltime, echo=echo, profile=slurm_profile,
                       job_extra_directives=list(job_extra_directives) or None,
                       worker_extra_args=list(worker_extra_args) or None,
                       local_directory=local_directory, log_directory=log_directory,
                       interface=interface, **extra)


def compute_graphs(lake, model_spec, corpus: str, params, console, device: str = "cpu",
                   dtype: str = "auto", client=None, **kwargs):
    """Run the graph job with a progress bar (graphs/s). ``model_spec`` may be a loaded
    model; with a Dask ``client`` it must be a name, which the workers load (this
    process reads only its config)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from circuit_atlas.compute.graphs import run_graphs, worker_dtype
    from circuit_atlas.compute.models import load_model, model_ref

    if isinstance(model_spec, str) and client is not None:
        model = model_ref(model_spec, device=device,
                          dtype=worker_dtype(client, device, dtype))
    elif isinstance(model_spec, str):
        with console.status(f"loading {model_spec} ..."):
            model = load_model(model_spec, device=device, dtype=dtype, warn=console.print)
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
                  f"{report.seconds:.1f} s (model {model.name}, {model.dtype_name}, "
                  f"params {report.params_hash})")
    return report


def reduce_tables(lake, model_spec: str, corpora: list[str], console, cluster=None, **kwargs):
    """Run the reduce with a progress bar on the chosen cluster (local by default)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from circuit_atlas.etl.reduce import reduce_lake

    model = model_name(model_spec)
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


def cluster_tables(lake, model_spec: str, corpora: list[str], methods: list[str],
                   net_params: dict, method_params: dict, console, cluster=None):
    """Cluster the edges table with each method (phase timings shown), then print the
    comparison report of every method the lake holds for these corpora."""
    import contextlib

    from circuit_atlas.clustering.methods import method_params as checked
    from circuit_atlas.clustering.run import cluster_lake, compare_methods
    from circuit_atlas.lake.layout import corpus_key

    model, corpus = model_name(model_spec), corpus_key(corpora)
    params = {m: checked(m, **method_params) for m in methods}
    cluster = cluster or {"cluster": "none"}
    with contextlib.ExitStack() as stack:
        client = None
        if cluster.get("cluster") != "none":
            client = stack.enter_context(cluster_client(**cluster, echo=console.print))
        for method in methods:
            with console.status(f"{method} ...") as status:
                report = cluster_lake(lake, model, corpus, method, net_params, params[method],
                                      client, on_phase=lambda p: status.update(p))
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items())
            s = report.stats
            console.print(f"[green]cluster[/] {method} on {report.where}: {report.nodes:,} nodes, "
                          f"{report.links:,} links (estimated {report.estimate_bytes / 2**20:,.0f}"
                          f" MiB); {s['top_modules']:,} top modules, {s['levels']} level(s); "
                          f"{phases}")
    report = compare_methods(lake, model, corpus)
    print_comparison(report, console)
    return report


def print_comparison(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title="clusterings", caption=(
        "modules: top-level modules (>=3: of 3 nodes or more); largest: share of nodes in "
        "the largest; Q: directed modularity of the top modules; savings: Infomap's "
        "relative codelength savings"))
    for col in ("method", "nodes", "links", "modules", ">=3", "largest", "levels", "Q",
                "savings"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, s in report["methods"].items():
        savings = s.get("codelength_savings")
        table.add_row(method, f"{s['nodes']:,}", f"{s['links']:,}", f"{s['top_modules']:,}",
                      f"{s['non_trivial_top_modules']:,}", f"{s['largest_share']:.1%}",
                      str(s["levels"]), f"{s['modularity']:.3f}",
                      "-" if savings is None else f"{savings:.3f}")
    console.print(table)
    for pair in report["nmi"]:
        console.print(f"NMI {pair['a']} vs {pair['b']} over {pair['nodes']:,} nodes: "
                      f"top modules {pair['nmi_top']:.3f}, full paths {pair['nmi_path']:.3f}")


def _bar(console, what: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=True)  # the summary line that follows says what was done


def compute_projections(lake, model, params, console, layers=None, corpora=None):
    """The projections of a loaded model with a progress bar (layers); with ``corpora``,
    of the neurons their reduce holds only."""
    from circuit_atlas.compute.projections import reduced_neurons, write_projections
    from circuit_atlas.lake.layout import corpus_key

    start = time.perf_counter()
    neurons = source = None
    if corpora:
        neurons = reduced_neurons(lake, model.name, corpora, model.adapter.n_layers)
        source = f"neurons of {corpus_key(corpora)}"
    with _bar(console, "projections") as progress:
        task = progress.add_task("layers", total=None)
        rows, params = write_projections(lake, model, params, layers, on_layer=lambda d, t:
                                         progress.update(task, completed=d, total=t),
                                         warn=console.print, neurons=neurons,
                                         neurons_from=source)
    which = "every neuron" if neurons is None else (
        f"{sum(len(v) for v in neurons.values()):,} {source}")
    console.print(f"[green]projections[/] {model.name}: {rows:,} rows for {which} (top "
                  f"{params.k} per sign, norm {'on' if params.norm else 'off'}, search in "
                  f"{params.dtype}), {time.perf_counter() - start:.1f} s")


def compute_effects(lake, model, corpora: list[str], console, **kwargs):
    """The effects of a loaded model with a progress bar (prompts)."""
    from circuit_atlas.compute.effects import write_effects

    start = time.perf_counter()
    with _bar(console, "effects") as progress:
        task = progress.add_task("prompts", total=None)
        counts = write_effects(lake, model, corpora, on_prompt=lambda d, t:
                               progress.update(task, completed=d, total=t), **kwargs)
    seconds = time.perf_counter() - start
    console.print(f"[green]effects[/] {'+'.join(sorted(corpora))}: {counts['effects']:,} "
                  f"neuron-prompt pairs over {counts['prompts']:,} prompts, "
                  f"{counts['neuron_effects']:,} neurons summarised, {model.dtype_name}, "
                  f"{seconds:.1f} s "
                  f"({counts['effects'] / seconds:,.0f} pairs/s)")
    return counts


def cooccurrence_table(lake, model_spec: str, corpora: list[str], console, cluster=None,
                       **kwargs):
    """The co-occurrence job with a progress bar on the chosen cluster."""
    from circuit_atlas.analysis.cooccurrence import cooccurrence_lake

    cluster = cluster or {"cluster": "local"}
    with cluster_client(**cluster, echo=console.print) as client, \
            _bar(console, "cooccurrence") as progress:
        task = progress.add_task("tasks", total=None)
        report = cooccurrence_lake(lake, model_name(model_spec), corpora, client,
                                   on_progress=lambda d, t: progress.update(
                                       task, completed=d, total=t), **kwargs)
    console.print(f"[green]cooccurrence[/] {report.corpus}: {report.graphs:,} graphs, "
                  f"{report.hubs:,} hub neuron(s) left out, {report.rows:,} rows, "
                  f"{report.seconds:.1f} s")
    return report


def profile_tokenizer(model_spec: str):
    """The model's tokenizer to decode token nodes, or None (ids are shown then)."""
    from circuit_atlas.errors import CircuitAtlasError

    try:
        from circuit_atlas.compute.models import load_tokenizer

        return load_tokenizer(model_spec)
    except (CircuitAtlasError, OSError, ValueError):
        return None


def print_profile(profile: dict, console) -> None:
    """A neuron profile (see analysis.profile) in the terminal."""
    from rich.table import Table

    a = profile["appearances"]
    console.rule(f"[bold]{profile['id']}[/] - {profile['model']} / {profile['corpus']}")
    by = ", ".join(f"{c} {n}" for c, n in a.get("by_corpus", {}).items())
    console.print(f"in {a['graph_count']:,} graphs ({by}), {a['position_count']:,} positions; "
                  f"activation mean {a['activation_mean']:.3g} max {a['activation_max']:.3g};"
                  f" relevance mean {a['score_mean']:.3g}")
    for key, title in (("role", "role"), ("effects", "direct effect ratio"),
                       ("specificity", "specificity"), ("clusters", "clusters"),
                       ("labels", "labels")):
        for row in profile.get(key, []):
            console.print(f"[bold]{title}[/]: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for key in ("upstream", "downstream", "cooccurring"):
        rows = profile.get(key)
        if not rows:
            continue
        table = Table(title=key, title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "node" else "right")
        for r in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
        console.print(table)
    for kind, rows in profile.get("tokens", {}).items():
        if rows:
            console.print(f"[bold]{kind} tokens[/]: " + ", ".join(
                f"{r['token']} ({r['count']})" for r in rows))
    for key, rows in profile.get("projections", {}).items():
        console.print(f"[bold]projection {key}[/]: " + ", ".join(
            f"{t!r} {v:.3g}" for t, v in rows))


def label_neurons(lake, model_spec: str, model: str, corpus: str, passes: list[str], settings,
                  console, **kwargs):
    """Run the labeling passes with a progress bar; tokens and cost at the end."""
    from circuit_atlas.analysis.labeler import label_lake

    tokenizer = profile_tokenizer(model_spec)
    reports = []
    for pass_ in passes:
        with _bar(console, f"{'prompts' if settings is None else 'label'} {pass_}") as progress:
            task = progress.add_task(pass_, total=None)

            def tick(layer: int, done: int, total: int, task=task, progress=progress,
                     pass_=pass_) -> None:
                progress.update(task, completed=done, total=total,
                                description=f"{pass_} L{layer}")

            report = label_lake(lake, model, corpus, pass_, settings, tokenizer=tokenizer,
                                on_progress=tick, **kwargs)
        reports.append(report)
        if settings is None:
            console.print(f"[green]label prompts[/] {pass_}: layers "
                          f"{report.layers[0]}..{report.layers[-1]} assembled into the "
                          "label_prompts table (dry run, no LLM)")
            continue
        console.print(
            f"[green]labels[/] {pass_}: {report.ok:,} ok, {report.failed:,} failed, "
            f"{report.skipped:,} already labelled; {report.prompt_tokens:,} prompt + "
            f"{report.completion_tokens:,} completion tokens, ${report.cost(settings):.4f}"
            f"{' (batch price)' if settings.batch else ''}; {report.seconds:.1f} s")
    return reports
