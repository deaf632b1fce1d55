"""The options every command shares, and options generated from a stage's parameter
dataclass (its field docstrings are the help text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from circuit_atlas.names import DEFAULT_MODEL
from circuit_atlas.params import Param, params
from circuit_atlas.stage import ClusterSpec

LAKE_ENV = "CIRCUIT_ATLAS_LAKE"

lake_option = click.option(
    "--lake", "lake_path", envvar=LAKE_ENV, default="lake", show_default=True,
    show_envvar=True, help="Lake root: a local folder or an fsspec URL.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
model_option = click.option(
    "--model", "model", default=DEFAULT_MODEL, show_default=True,
    help="Hub id (from the local cache), local folder, GGUF file, 'smollm2' for the "
         "embedded default, or 'gemma3-270m' (after bash scripts/setup --model gemma3).")


def corpora_option(required: bool = False, help: str | None = None):
    """The one ``--corpus`` option: repeatable, a list of corpus names."""
    return click.option(
        "--corpus", "corpora", multiple=True, required=required,
        help=help or ("Corpus; repeat for a joint reduce of several (default: the only "
                      "reduced set, when the lake holds one)."))


def _option(p: Param, names: tuple[str, ...], default: Any) -> Callable:
    flags = [f"--{n.replace('_', '-')}" for n in names]
    kwargs: dict[str, Any] = {"help": p.doc, "show_default": default not in (None, ())}
    if p.kind is bool and not p.many:
        if default:
            return click.option(f"{flags[0]}/--no-{flags[0][2:]}", p.name, default=True,
                                **kwargs)
        return click.option(*flags, p.name, is_flag=True, help=p.doc)
    kwargs["type"] = click.Choice(p.choices) if p.choices else p.kind
    kwargs["default"] = default
    if p.many:
        kwargs["multiple"] = True
    return click.option(*flags, p.name, **kwargs)


def params_options(cls: type, names: dict[str, str | tuple[str, ...]] | None = None,
                   defaults: dict[str, Any] | None = None) -> Callable:
    """A decorator adding one option per field of ``cls``: ``--field-name`` (``names``:
    other flags), the field's default (``defaults``: others), its docstring as help."""
    names, defaults = names or {}, defaults or {}

    def decorate(f: Callable) -> Callable:
        for p in reversed(params(cls)):
            flags = names.get(p.name, p.name)
            flags = (flags,) if isinstance(flags, str) else flags
            f = _option(p, flags, defaults.get(p.name, p.default))(f)
        return f
    return decorate


def take_params(cls: type, kwargs: dict[str, Any]) -> Any:
    """An instance of ``cls`` from (and removed from) a command's keyword arguments."""
    values = {}
    for p in params(cls):
        if p.name in kwargs:
            value = kwargs.pop(p.name)
            values[p.name] = tuple(value) if p.many else value
    return cls(**values)


def cluster_options(default: str = "local") -> Callable:
    """The cluster choice every Dask command shares (the fields of ClusterSpec); the
    SLURM flags override the jobqueue.slurm section of the Dask config."""
    return params_options(ClusterSpec, names={"queue": ("partition", "queue"),
                                              "job_extra_directives": "job_extra_directive",
                                              "worker_extra_args": "worker_extra_arg"},
                          defaults={"cluster": default})


def take_cluster(kwargs: dict[str, Any]) -> ClusterSpec:
    return take_params(ClusterSpec, kwargs)
