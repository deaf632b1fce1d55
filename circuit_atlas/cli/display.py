"""What the terminal shows: the console, progress bars for the stages, tables."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import click

from circuit_atlas.stage import Progress


def console(quiet: bool = False):
    from rich.console import Console

    return Console(quiet=quiet)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


class BarProgress(Progress):
    """One bar for a stage: its description is the task at hand, with a rate and the
    time left; messages print above it. The bar goes when the stage ends (the report
    line that follows says what was done)."""

    def __init__(self, bar: Any, out: Any) -> None:
        self._bar, self._out, self._task = bar, out, None
        self._start, self._name = time.perf_counter(), None

    def update(self, task: str, done: int, total: int | None = None) -> None:
        if self._task is None:
            self._task = self._bar.add_task(task, total=total, rate="")
        if task != self._name:
            self._name, self._start = task, time.perf_counter()
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(self._task, description=task, completed=done, total=total,
                         rate=f"{rate:,.2f}/s" if done else "")

    def message(self, text: str) -> None:
        self._out.print(text)


@contextlib.contextmanager
def stage_progress(out: Any) -> Iterator[BarProgress]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bars

    with Bars(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
              console=out, transient=True) as bars:
        yield BarProgress(bars, out)


def run_stage(run: Any, out: Any, *args: Any, **kwargs: Any) -> Any:
    """``run(*args, progress=bars, **kwargs)`` with a bar, then its report's line."""
    with stage_progress(out) as bars:
        report = run(*args, progress=bars, **kwargs)
    print_report(report, out)
    return report


def print_report(report: Any, out: Any) -> None:
    """A report's lines, the stage's name (their first word) in green."""
    from rich.markup import escape

    for line in str(report).splitlines():
        head, _, rest = line.partition(" ")
        out.print(f"[green]{escape(head)}[/] {escape(rest)}")


def write_frame(df, fmt: str, output: str | None, limit: int) -> None:
    import polars as pl

    if fmt == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs --output FILE")
        df.write_parquet(output)
    elif fmt in ("csv", "json"):
        text = df.write_csv() if fmt == "csv" else df.write_json()
        if output:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            click.echo(text, nl=False)
    else:
        with pl.Config(tbl_rows=limit if limit > 0 else -1, tbl_cols=-1, fmt_str_lengths=60,
                       tbl_width_chars=200):
            click.echo(df if not output else "")
        if output:
            df.write_csv(output)


def print_comparison(report: dict, out: Any) -> None:
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
    out.print(table)
    for pair in report["nmi"]:
        out.print(f"NMI {pair['a']} vs {pair['b']} over {pair['nodes']:,} nodes: "
                  f"top modules {pair['nmi_top']:.3f}, full paths {pair['nmi_path']:.3f}")


def print_profile(profile: dict, out: Any) -> None:
    """A neuron profile (see analysis.profile) in the terminal."""
    from rich.table import Table

    a = profile["appearances"]
    out.rule(f"[bold]{profile['id']}[/] - {profile['model']} / {profile['corpus']}")
    by = ", ".join(f"{c} {n}" for c, n in a.get("by_corpus", {}).items())
    out.print(f"in {a['graph_count']:,} graphs ({by}), {a['position_count']:,} positions; "
              f"activation mean {a['activation_mean']:.3g} max {a['activation_max']:.3g};"
              f" relevance mean {a['score_mean']:.3g}")
    for key, title in (("role", "role"), ("effects", "direct effect ratio"),
                       ("specificity", "specificity"), ("clusters", "clusters"),
                       ("labels", "labels")):
        for row in profile.get(key, []):
            out.print(f"[bold]{title}[/]: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for r in profile.get("causal", []):
        from circuit_atlas.lake.causal import causal_text

        out.print(f"[bold]causal[/] over {r['prompts']} prompts: " + causal_text(r))
    inv = profile.get("investigation")
    if inv is not None:
        said = (f"{inv['verdict']!r} (confidence {inv['confidence']:.2f})" if inv["verdict"]
                else f"no verdict ({inv['error'] or inv['status']})")
        from rich.markup import escape

        out.print(f"[bold]investigation[/] {inv['investigation']} by {inv['investigator']}: "
                  f"{escape(said)}; {len(inv['hypotheses'])} hypotheses, "
                  f"{len(inv['experiments'])} experiments")
    for key in ("upstream", "downstream", "cooccurring"):
        rows = profile.get(key)
        if not rows:
            continue
        table = Table(title=key, title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "node" else "right")
        for r in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
        out.print(table)
    for kind, rows in profile.get("tokens", {}).items():
        if rows:
            out.print(f"[bold]{kind} tokens[/]: " + ", ".join(
                f"{r['token']} ({r['count']})" for r in rows))
    for key, rows in profile.get("projections", {}).items():
        out.print(f"[bold]projection {key}[/]: " + ", ".join(
            f"{t!r} {v:.3g}" for t, v in rows))
    wiring = profile.get("wiring")
    if wiring:
        out.print(f"[bold]weight-based wiring[/] (operating point {wiring['operating_point']};"
                  " strength, c_gate / c_up):")
        for key, rows in wiring.items():
            if isinstance(rows, list) and rows:
                out.print(f"  {key}: " + ", ".join(
                    f"{r['node']} {r['strength']:+.3g} ({r['c_gate']:+.2g} / {r['c_up']:+.2g})"
                    for r in rows), highlight=False)
        agree = wiring.get("agreement")
        if agree:
            among = "is" if agree["hit"] else "is not"
            out.print(f"  its strongest weight-based upstream {agree['strongest_upstream']} "
                      f"{among} among its {len(agree['relp_upstream'])} most frequent RelP "
                      f"upstream ({', '.join(agree['relp_upstream'])})", highlight=False)
    for s in profile.get("activation", []):
        q = s["quantiles"]
        corr = s.get("static_rank_corr")
        out.print(f"[bold]activation[/] over {s['count']:,} tokens of {s['corpus']}: mean "
                  f"{s['mean']:.3g}, std {s['std']:.3g}, {s['frac_positive']:.0%} positive, "
                  f"min {s['min']:.3g}, median {q[4]:.3g}, 99th percentile {q[8]:.3g}, "
                  f"max {s['max']:.3g}" + ("" if corr is None else
                                           f"; rank correlation of its mean per token with "
                                           f"the static input projection {corr:+.2f} "
                                           f"({s['corr_tokens']} tokens)"))
    if profile.get("token_means"):
        out.print("[bold]highest mean in context[/]: " + ", ".join(
            f"{r['token']!r} {r['mean']:.3g} ({r['count']}x; static {r['static']:.3g})"
            for r in profile["token_means"]), markup=True, highlight=False)
    for key, title in (("top", "top exemplars"), ("bottom", "bottom exemplars")):
        rows = profile.get("exemplars", {}).get(key)
        if not rows:
            continue
        out.print(f"[bold]{title}[/] (<<marked>>: at least half the peak; then the "
                  "model's next tokens there):")
        for r in rows:
            out.print(f"  {r['activation']:+.3g}  {r['text']!r}  -> "
                      + ", ".join(repr(t) for t in r["next_tokens"][:3]),
                      soft_wrap=True, markup=False, highlight=False)
