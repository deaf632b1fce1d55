"""lake and prompts: create, inspect, migrate and clean a lake; import prompts."""

from __future__ import annotations

import json

import click

from circuit_atlas.cli import Group, cli, display
from circuit_atlas.cli.options import json_option, lake_option


@cli.group(cls=Group)
def lake() -> None:
    """Create, inspect and clean a lake."""


@lake.command("init")
@lake_option
def lake_init(lake_path: str) -> None:
    """Create a lake (or check that one exists) at --lake."""
    from circuit_atlas.lake import Lake

    opened = Lake.init(lake_path)
    click.echo(f"lake ready at {opened.url}")


@lake.command("info")
@lake_option
@json_option
def lake_info(lake_path: str, as_json: bool) -> None:
    """Corpora, models, shards, graphs, rows and bytes in a lake."""
    from rich.table import Table

    from circuit_atlas.lake import Lake

    info = Lake(lake_path).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console = display.console()
    console.print(f"[bold]lake[/] {info['lake']}  (format {info['format_version']}, "
                  f"{info['created_by']})")
    corpora = Table("corpus", "prompts", "files", "bytes", title="prompt corpora",
                    title_justify="left")
    for name, c in info["corpora"].items():
        corpora.add_row(name, str(c["prompts"]), str(c["files"]), display.human_bytes(c["bytes"]))
    console.print(corpora if info["corpora"] else "no corpora yet: `circuit-atlas prompts import`")
    if info["models"]:
        graphs = Table("model", "corpus", "shards", "graphs", "nodes", "edges", "bytes",
                       title="attribution graphs", title_justify="left")
        for entry in info["models"].values():
            for corpus, c in entry["corpora"].items():
                graphs.add_row(entry["model"], corpus, str(c["shards"]), str(c["graphs"]),
                               str(c["nodes"]), str(c["edges"]), display.human_bytes(c["bytes"]))
        console.print(graphs)
    else:
        console.print("no graphs yet")
    for model, corpora_tables in info["tables"].items():
        for corpus, names in corpora_tables.items():
            console.print(f"tables of {model} / {corpus}: {', '.join(names)}")
    if info["uncommitted_shards"]:
        console.print(f"[yellow]{info['uncommitted_shards']} uncommitted shard(s)[/] "
                      "(in progress, or debris: `circuit-atlas lake cleanup`)")


@lake.command("files")
@lake_option
@click.argument("table")
@click.option("--model", default=None, help="Only this model (hub id or partition key).")
@click.option("--corpus", default=None, help="Only this corpus.")
@click.option("--version", "version", default=None,
              help="A derived table's earlier version: its number (negative counts back) "
                   "or id.")
def lake_files(lake_path: str, table: str, model: str | None, corpus: str | None,
               version: str | None) -> None:
    """The committed files of one snapshot of TABLE, one per line: what a reader
    without circuit-atlas reads (duckdb's read_parquet, spark, pandas)."""
    from circuit_atlas.lake import Lake

    parsed = int(version) if version and version.lstrip("-").isdigit() else version
    for path in Lake(lake_path).files(table, model, corpus, version=parsed):
        click.echo(path)


@lake.command("migrate")
@lake_option
def lake_migrate(lake_path: str) -> None:
    """Rewrite a lake of an older format in place as the current one (resumable)."""
    from circuit_atlas.lake.migrate import migrate

    report = migrate(lake_path)
    click.echo(f"migrated {lake_path}: {report.prompt_parts} prompt part(s), {report.shards} "
               f"shard(s), {len(report.tables)} table(s); removed {len(report.removed)} "
               "uncommitted item(s). The next reduce folds every shard again.")


@lake.command("cleanup")
@lake_option
@click.option("--min-age", type=float, default=3600.0, show_default=True,
              help="Seconds an uncommitted shard must be unchanged before it counts as debris "
                   "(writers on other nodes may still be busy). Shards whose writer on this "
                   "host is dead go regardless. 0 removes all debris.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
def lake_cleanup(lake_path: str, min_age: float, dry_run: bool) -> None:
    """Remove what killed jobs left (uncommitted shards, unpublished versions, scratch,
    temporary files) and the table versions superseded for longer than the lake's
    retention period."""
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    report = opened.cleanup(min_age_s=min_age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in report.removed:
        click.echo(f"{verb} {path}")
    for path in report.expired:
        click.echo(f"{verb} (retention of {opened.retention_s / 86400:g} days over) {path}")
    for path in report.in_progress:
        click.echo(f"kept (writer alive or recent) {path}")
    click.echo(f"{verb} {len(report.removed)} item(s) and {len(report.expired)} expired "
               f"version(s); kept {len(report.in_progress)} in progress")


# prompts ---------------------------------------------------------------------------


@cli.group(cls=Group)
def prompts() -> None:
    """Import and list prompt corpora."""


@prompts.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--corpus", required=True, help="Corpus name, e.g. medical.")
@lake_option
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl", "yaml", "csv", "parquet",
                                                    "txt"]),
              help="File format; by default from the suffix.")
@click.option("--domain", help="Domain for prompts whose record has none.")
@click.option("--text-field", help="Key or column holding the prompt (default: prompt, then text).")
def prompts_import(files: tuple[str, ...], corpus: str, lake_path: str, fmt: str | None,
                   domain: str | None, text_field: str | None) -> None:
    """Import prompt FILES into a corpus (creating the lake if the folder is new).

    Accepts JSON, JSONL, YAML (a list of strings, or of mappings with a `prompt` or
    `text` key and optional `domain` and other fields), CSV, Parquet and plain text
    (one prompt per line). Ids are content hashes: importing twice adds nothing.
    """
    import os

    from circuit_atlas.lake import Lake, read_prompt_file

    # Parse every file before writing anything: a bad file leaves the lake untouched.
    parsed = [(f, read_prompt_file(f, fmt, text_field)) for f in files]
    opened = Lake.init(lake_path)
    for f, records in parsed:
        r = opened.import_prompts(records, corpus, source=os.path.basename(f), domain=domain)
        click.echo(f"{f}: {r.added} new prompt(s) in corpus {corpus!r}, "
                   f"{r.already_present} already there, {r.duplicates_in_input} repeated in file")


@prompts.command("list")
@lake_option
@click.option("--corpus", help="Show the prompts of this corpus (default: list corpora).")
@click.option("--limit", type=int, default=20, show_default=True, help="Prompts to show; 0 = all.")
@json_option
def prompts_list(lake_path: str, corpus: str | None, limit: int, as_json: bool) -> None:
    """List corpora with their sizes, or the prompts of one corpus."""
    from circuit_atlas.lake import Lake

    opened = Lake(lake_path)
    if corpus is None:
        info = opened.info()["corpora"]
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            for name, c in info.items():
                click.echo(f"{name}\t{c['prompts']} prompts")
        return
    frame = opened.scan("prompts", corpus=opened.check_corpus(corpus)).sort("prompt_id")
    if limit:
        frame = frame.head(limit)
    rows = frame.select("prompt_id", "domain", "source", "text").collect().to_dicts()
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table("prompt_id", "domain", "text", title=f"corpus {corpus}", title_justify="left")
    for row in rows:
        table.add_row(row["prompt_id"], row["domain"] or "", row["text"])
    display.console().print(table)
