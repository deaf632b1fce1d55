"""Model names the lake knows, importable without torch (the CLI and the Dask stages
resolve aliases without loading a model)."""

from __future__ import annotations

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES = {"smollm2": DEFAULT_MODEL, "default": DEFAULT_MODEL}


def model_name(spec: str) -> str:
    """The lake's name of a model given by alias or name (a path stays itself)."""
    return ALIASES.get(spec, spec)
