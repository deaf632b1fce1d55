"""Model names the lake knows, importable without torch (the CLI and the Dask stages
resolve aliases without loading a model)."""

from __future__ import annotations

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the optional second embedded model (bash scripts/setup --model gemma3)
GEMMA3_MODEL = "google/gemma-3-270m"
ALIASES = {"smollm2": DEFAULT_MODEL, "default": DEFAULT_MODEL,
           "gemma3-270m": GEMMA3_MODEL, "gemma3": GEMMA3_MODEL}


def model_name(spec: str) -> str:
    """The lake's name of a model given by alias, hub name, local folder (its name) or
    GGUF file (its stem), as the compute stages name it."""
    from pathlib import Path

    spec = ALIASES.get(spec, spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return spec
