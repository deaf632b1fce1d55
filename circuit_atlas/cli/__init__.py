"""The ``circuit-atlas`` command: one module per stage, each command a few lines over
that stage's ``run_*`` function.

Imports of the stages stay inside the commands so that ``--help`` never loads torch or
Dask. Errors derived from :class:`CircuitAtlasError` print as one line and exit 1.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from circuit_atlas._version import __version__
from circuit_atlas.errors import CircuitAtlasError


class Group(click.Group):
    """Turns our errors into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CircuitAtlasError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="circuit-atlas")
def cli() -> None:
    """Build a circuit atlas of an LLM's MLP neurons.

    Stages: import prompts, compute attribution graphs, reduce them with Dask into
    edge and neuron tables, analyse, cluster, intervene and label. Everything lives in
    one lake of Parquet files (--lake, or the CIRCUIT_ATLAS_LAKE variable).
    """


from circuit_atlas.cli import (  # noqa: E402 - each module adds its commands to cli
    analysis,
    causal,
    clustering,
    compute,
    demo,
    etl,
    labeling,
    lake,
    selfreport,
    use,
)

__all__ = ["analysis", "causal", "cli", "clustering", "compute", "demo", "etl", "labeling", "lake",
           "main", "selfreport", "use"]


def main() -> None:
    cli(prog_name="circuit-atlas")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
