"""Every CUDA path checked and every GPU benchmark measured, in one command.

    python bench/gpu.py --out gpu-run                    # a CUDA machine: under 8 minutes
    .venv/bin/python bench/gpu.py --tiny --out /tmp/gpu  # the same steps on the CPU, small

Part 1, checks, on the device in float64, float32 and bfloat16 (on the CPU, float64 is
the reference: float32 and bfloat16 only). Each is a relative error, the largest
difference over the largest value, against a limit per dtype:

- forward: our written-out forward against the Hugging Face model's logits on the same
  device and dtype, and against the float64 logits on the CPU, for a tiny random model
  of every family (pre- and post-norm, q/k norms, biases, sliding windows);
- graphs: completeness (a target's incoming edges sum to its read value) and every edge
  equal to autograd through the linearised model (tests/oracles.py; float64 and
  float32, since bfloat16 autograd is no oracle), on those tiny models and on a 2-layer
  model at Llama-3.1-8B widths (d 4096, 14,336 neurons, vocab 128,256);
- projections, effects, exemplar statistics, interventions and wiring: the stage's own
  core on the device against the same core in float64 on the CPU (which the test suite
  ties to its oracles), on tiny llama (pre-norm) and olmo3 (post-norm) models.

Part 2, benchmarks: the bench/ scripts at Llama-3.1-8B shape (graphs, projections,
wiring) or on the embedded SmolLM2 (effects, interventions, activations; skipped where it
is not installed), each in its own process under a time limit, with its wall time and
peak GPU memory; then one 8B graph under torch.profiler.

Everything goes under --out: summary.md (bench/RESULTS.md's format, the targets
compared), checks.json, benchmarks.log and profile.txt. Output is unbuffered, so a run
cut short still shows how far it got. Exit status 1 when a check failed or a benchmark
broke.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import runpy
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from circuit_atlas.machine import describe  # noqa: E402

FAMILIES = ("llama", "qwen3", "qwen2", "mistral", "olmo2", "olmo3", "gemma2", "gemma3_text")
# relative errors allowed per dtype: against the same computation in that dtype
# (ours vs Hugging Face, edges vs autograd), and against float64 on the CPU
# (bfloat16: Gemma's HF norms compute in float32 and ours in bfloat16; a tiny Gemma-2
# differs by 0.044 on the CPU, a wrong part by far more)
LIMIT = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 0.1}
LIMIT_VS_FLOAT64 = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 1e-1}
# shares of top-k entries (projections, wiring, exemplars) equal to float64's
SHARE = {"float64": 1.0, "float32": 0.99, "bfloat16": 0.8}
# bfloat16 effects and interventions against float64's (a tiny llama's indirect effects:
# 0.93 on the CPU; a wrong neuron or layer gives about 0)
CORRELATION = 0.85
TARGETS = {
    "graphs": (0.4, "s per graph, Llama-3.1-8B shape, 64 tokens, 500 candidates, one H100"),
    "projections": (3.0, "s for all 458,752 neurons of Llama-3.1-8B"),
}


def rel(a, b) -> float:
    """Largest |a - b| over the largest |b|."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max())


def host(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(t) else np.asarray(t)


@dataclass
class Checks:
    rows: list[dict] = field(default_factory=list)

    def add(self, check: str, model: str, dtype: str, value: float, limit: float,
            higher_is_better: bool = False) -> None:
        ok = bool(value >= limit if higher_is_better else value <= limit)
        self.rows.append({"check": check, "model": model, "dtype": dtype, "value": value,
                          "limit": limit, "ok": ok})
        cmp = ">=" if higher_is_better else "<="
        print(f"  {'ok  ' if ok else 'FAIL'} {check:<34} {model:<18} {dtype:<9} "
              f"{value:.3g} (want {cmp} {limit:g})")

    def broke(self, check: str, model: str, dtype: str, error: BaseException) -> None:
        self.rows.append({"check": check, "model": model, "dtype": dtype, "value": None,
                          "limit": None, "ok": False, "error": repr(error)})
        print(f"  FAIL {check:<34} {model:<18} {dtype:<9} raised {error!r}")
        traceback.print_exc()

    def guard(self, check: str, model: str, dtype: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a CUDA-only bug must not hide the checks after it
            self.broke(check, model, dtype, e)


# ---------------------------------------------------------------- part 1: checks

def on(model64, device: str, dtype: str):
    return copy.deepcopy(model64).to(device=device, dtype=getattr(torch, dtype))


def check_forward(c: Checks, name: str, model64, model, ids, dtype: str) -> None:
    from circuit_atlas.compute.adapters import adapter_for
    from circuit_atlas.compute.trace import forward

    a = adapter_for(model)
    dev = ids.to(a.device)
    with torch.no_grad():
        ours = forward(a, dev, relp=False).logits(a, slice(None))
        c.add("forward = HF logits", name, dtype, rel(host(ours), host(model(dev).logits)),
              LIMIT[dtype])
        c.add("forward = HF logits, float64 CPU", name, dtype,
              rel(host(ours), host(model64(ids).logits)), LIMIT_VS_FLOAT64[dtype])


def check_graph(c: Checks, name: str, a, ids, dtype: str, params, rows=None) -> None:
    from circuit_atlas.compute.attribution import attribute
    from tests.oracles import autograd_edges, target_rows

    g = attribute(a, ids.to(a.device), params)
    targets = target_rows(g)
    incoming = g.adjacency[targets].astype(np.float64).sum(1)
    c.add("graph completeness", name, dtype, rel(incoming, g.read_values[targets]),
          LIMIT[dtype])
    if dtype == "bfloat16":
        return
    reads, expected, _ = autograd_edges(a, ids.to(a.device), g, params, rows)
    picked = targets if rows is None else targets[list(rows)]
    c.add("graph reads = forward", name, dtype, rel(g.read_values[targets], reads),
          LIMIT[dtype])
    c.add("graph edges = autograd", name, dtype, rel(g.adjacency[picked], expected),
          LIMIT[dtype])


def keyed(cols: dict, keys: tuple[str, ...], value: str) -> dict:
    return dict(zip(zip(*(np.asarray(cols[k]).tolist() for k in keys), strict=True),
                    np.asarray(cols[value], dtype=np.float64).tolist(), strict=True))


def check_same_entries(c: Checks, check: str, name: str, dtype: str, got: dict,
                       want: dict) -> None:
    """``got`` and ``want``: {key: value} of top-k entries; the share of float64's keys
    found and the values' error on those."""
    shared = [k for k in want if k in got]
    c.add(f"{check}: entries as float64", name, dtype, len(shared) / max(len(want), 1),
          SHARE[dtype], higher_is_better=True)
    c.add(f"{check}: values as float64", name, dtype,
          rel([got[k] for k in shared], [want[k] for k in shared]), LIMIT_VS_FLOAT64[dtype])


def projection_entries(a) -> dict:
    from circuit_atlas.compute.params import ProjectionParams
    from circuit_atlas.compute.projections import Projector

    p = Projector(a, ProjectionParams(k=5).resolved(str(a.device)))
    out = {}
    for layer in range(a.n_layers):
        cols = p.layer(layer)
        cols["layer"] = np.full(len(cols["neuron"]), layer)
        out.update(keyed(cols, ("layer", "neuron", "kind", "sign", "token_id"), "value"))
    return out


def wiring_entries(a) -> dict:
    from circuit_atlas.compute.params import WiringParams
    from circuit_atlas.compute.wiring import weight_point, wire

    cols = wire(a, WiringParams(k=5).resolved(str(a.device)), weight_point(a))
    out = {}
    for layer_cols in cols.values():
        out.update(keyed(layer_cols, ("direction", "src_layer", "src_neuron", "tgt_layer",
                                      "tgt_neuron"), "strength"))
    return out


def exemplar_entries(model, a, ids) -> tuple[dict, dict]:
    from circuit_atlas.compute.activations import Window, activation_pass
    from circuit_atlas.compute.models import LoadedModel

    windows = [Window(window=i, doc=str(i), start=0, tokens=tuple(row.tolist()))
               for i, row in enumerate(ids)]
    states = activation_pass(LoadedModel("tiny", "", model, None, a), windows, k=5,
                             batch_tokens=64)
    top, stats = {}, {}
    for layer, s in states.items():
        n, k = s.top_value.shape
        for j in range(k):
            top.update({(layer, i, int(s.top_window[i, j]), int(s.top_pos[i, j])):
                        float(s.top_value[i, j]) for i in range(n)})
        for stat, v in (("max", s.max), ("min", s.min), ("mean", s.total / s.count)):
            stats.update({(layer, i, stat): float(v[i]) for i in range(n)})
    return top, stats


# the measured quantities; the ratios, signs, counts and argmax tokens derived from them
# are ill-conditioned where they are near zero or tied, so they are left out
EFFECT_COLUMNS = ("activation", "direct", "indirect", "total", "prob_change")
BATTERY_COLUMNS = ("logit_delta", "prob_delta", "kl")


def check_columns(c: Checks, check: str, name: str, dtype: str, got: dict, want: dict,
                  columns: tuple[str, ...]) -> None:
    """The largest relative error over ``columns``; in bfloat16, the lowest Pearson
    correlation instead: these are differences of logits, whose error is bfloat16's
    on the logits, not on the (much smaller) differences."""
    def measure(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.corrcoef(a, b)[0, 1]) if dtype == "bfloat16" else rel(a, b)

    errors = {k: measure(got[k], want[k]) for k in columns}
    if dtype == "bfloat16":
        worst = min(errors, key=errors.get)
        c.add(f"{check}: correlation with float64 ({worst})", name, dtype, errors[worst],
              CORRELATION, higher_is_better=True)
    else:
        worst = max(errors, key=errors.get)
        c.add(f"{check} as float64 ({worst})", name, dtype, errors[worst],
              LIMIT_VS_FLOAT64[dtype])


def stage_checks(c: Checks, name: str, model64, model, dtype: str) -> None:
    from circuit_atlas.compute.adapters import adapter_for
    from circuit_atlas.compute.battery import Intervention, prompt_battery
    from circuit_atlas.compute.effects import prompt_effects
    from circuit_atlas.lake.units import neuron_unit

    a64, a = adapter_for(model64), adapter_for(model)
    ids = torch.randint(0, a64.embed.shape[0], (3, 9), generator=torch.Generator()
                        .manual_seed(4))
    prompt = ids[:1]
    c.guard("projections", name, dtype, lambda: check_same_entries(
        c, "projections", name, dtype, projection_entries(a), projection_entries(a64)))
    c.guard("wiring", name, dtype, lambda: check_same_entries(
        c, "wiring", name, dtype, wiring_entries(a), wiring_entries(a64)))

    def exemplars():
        top, stats = exemplar_entries(model, a, ids)
        top64, stats64 = exemplar_entries(model64, a64, ids)
        check_same_entries(c, "exemplars", name, dtype, top, top64)
        keys = list(stats64)
        c.add("exemplar statistics as float64", name, dtype,
              rel([stats[k] for k in keys], [stats64[k] for k in keys]),
              LIMIT_VS_FLOAT64[dtype])

    c.guard("exemplars", name, dtype, exemplars)
    neurons = {layer: np.arange(a.n_neurons) for layer in range(a.n_layers)}

    def effects():
        want = prompt_effects(a64, prompt, neurons)
        target = int(want["target_token"][0])  # bf16 may rank the logits otherwise
        got = prompt_effects(a, prompt.to(a.device), neurons, target=target)
        check_columns(c, "effects", name, dtype, got, want, EFFECT_COLUMNS)

    c.guard("effects", name, dtype, effects)

    def interventions():
        units = [neuron_unit(layer, n) for layer in range(a.n_layers) for n in (0, 7, 21)]
        plan = [Intervention("zero"), Intervention("boost", factor=4.0)]
        want, _ = prompt_battery(a64, prompt, units, plan)
        target = int(model64(prompt).logits[0, -1].argmax())
        got, _ = prompt_battery(a, prompt.to(a.device), units, plan, target=target)
        check_columns(c, "interventions", name, dtype, got, want, BATTERY_COLUMNS)

    c.guard("interventions", name, dtype, interventions)


def run_checks(device: str, tiny: bool) -> Checks:
    from bench.graphs import TINY, llama8b
    from circuit_atlas.compute.adapters import adapter_for
    from circuit_atlas.compute.attribution import AttributionParams
    from tests.factories import tiny_llama

    c = Checks()
    dtypes = (["float64"] if device != "cpu" else []) + ["float32", "bfloat16"]
    params = AttributionParams(candidates=40, max_logits=4, logit_prob=0.9, prune=False)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    print(f"checks on {device}: tiny random models of {len(FAMILIES)} families", flush=True)
    for family in FAMILIES:
        model64 = tiny_llama(seed=1, family=family)
        for dtype in dtypes:
            model = on(model64, device, dtype)
            c.guard("forward", family, dtype, check_forward, c, family, model64, model, ids,
                    dtype)
            c.guard("graph", family, dtype, check_graph, c, family, adapter_for(model), ids,
                    dtype, params)
            if family in ("llama", "olmo3"):
                stage_checks(c, family, model64, model, dtype)
    shape = {**(TINY if tiny else {}), "num_hidden_layers": 2}
    name = "2-layer tiny" if tiny else "2-layer 8B widths"
    big = AttributionParams(candidates=500, prune=False)
    wide_ids = torch.randint(0, shape.get("vocab_size", 128256), (1, 16),
                             generator=torch.Generator().manual_seed(5))
    print(f"checks on {device}: a {name} model", flush=True)
    for dtype in ("float32", "bfloat16"):
        def wide(dtype=dtype):
            torch.manual_seed(0)
            a = adapter_for(llama8b(device, getattr(torch, dtype), **shape))
            check_graph(c, name, a, wide_ids, dtype, big, rows=[0, 1, 250, 499, 500])
        c.guard("graph", name, dtype, wide)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return c


# ---------------------------------------------------------------- part 2: benchmarks

@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    gpu: list[str]
    tiny: list[str]
    timeout: int  # seconds on the GPU
    embedded_model: bool = False


BENCHES = [
    Bench("graphs", "graphs.py", ["--model", "llama8b", "--dtype", "bfloat16", "--limit", "16",
                                  "--prompt-batch", "1,8"],
          ["--model", "tiny", "--limit", "2", "--tokens", "16", "--candidates", "50",
           "--prompt-batch", "1,2"], 150),
    Bench("projections", "projections.py", ["--model", "llama8b", "--naive-layers", "2"],
          ["--model", "tiny", "--naive-layers", "2"], 60),
    Bench("wiring", "wiring.py", ["--model", "llama8b", "--naive-layers", "1"],
          ["--model", "tiny"], 90),
    Bench("effects", "effects.py", [], ["--prompts", "1", "--neurons", "10",
                                        "--original-pairs", "3"], 45, True),
    Bench("interventions", "interventions.py", [],
          ["--prompts", "1", "--neurons", "30", "--naive", "2"], 45, True),
    Bench("activations", "activations.py", ["--dtype", "bfloat16", "--windows", "256"],
          ["--windows", "4", "--context", "16", "--repeat", "1"], 45, True),
]
PEAK = "peak GPU memory:"


def child(argv: list[str]) -> None:
    """Run one benchmark script as __main__ and print its peak GPU memory at the end."""
    script, *rest = argv
    sys.argv = [script, *rest]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print(f"{PEAK} {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


def embedded_model_installed() -> bool:
    import importlib.metadata as md

    from circuit_atlas.compute.models import EMBEDDED_PACKAGE

    try:
        md.distribution(EMBEDDED_PACKAGE)
        return True
    except md.PackageNotFoundError:
        return False


@dataclass
class Ran:
    bench: str
    command: str
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: ..."
    seconds: float = 0.0
    peak_gib: float | None = None
    output: str = ""


def run_bench(b: Bench, device: str, tiny: bool, limit: float, log) -> Ran:
    argv = [*(b.tiny if tiny else b.gpu), "--device", device]
    command = f"python bench/{b.script} {' '.join(argv)}"
    if b.embedded_model and not embedded_model_installed():
        return Ran(b.name, command, "skipped: the embedded SmolLM2 is not installed "
                                    "(bash scripts/setup)")
    if limit < 10:
        return Ran(b.name, command, "skipped: out of time")
    print(f"benchmark {b.name}: {command} (limit {limit:.0f} s)", flush=True)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               os.path.join(ROOT, "bench", b.script), *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=limit)
        out, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0
                                                  else f"failed (exit {proc.returncode})")
    except subprocess.TimeoutExpired as e:
        # what a killed child printed comes back as bytes even with text=True
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                      for x in (e.stdout or "", e.stderr or ""))
        status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - t
    log.write(f"===== {b.name}: {command}: {status}, {seconds:.1f} s\n{out}\n")
    log.flush()
    peak = re.findall(rf"{PEAK} ([\d.]+) GiB", out)
    ran = Ran(b.name, command, status, seconds, float(peak[-1]) if peak else None,
              "\n".join(line for line in out.splitlines() if not line.startswith(PEAK)))
    print(f"  {status}, {seconds:.1f} s" + (f", peak GPU memory {ran.peak_gib:.1f} GiB"
                                              if ran.peak_gib is not None else ""), flush=True)
    return ran


def profile_graph(device: str, tiny: bool, path: str) -> str:
    """One graph of a Llama-3.1-8B-shaped model (tiny: small widths) under
    torch.profiler: its phases and the 25 costliest operators, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    from bench.graphs import TINY, llama8b
    from circuit_atlas.compute.adapters import adapter_for
    from circuit_atlas.compute.attribution import AttributionParams, attribute_batch

    a = adapter_for(llama8b(device, torch.bfloat16, **(TINY if tiny else {})))
    ids = torch.randint(0, a.embed.shape[0], (1, 16 if tiny else 64),
                        generator=torch.Generator().manual_seed(0)).to(device)
    params = AttributionParams(candidates=50 if tiny else 500)
    attribute_batch(a, [ids], params)  # warm-up
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        g = attribute_batch(a, [ids], params)[0]
        if cuda:
            torch.cuda.synchronize()
    phases = ", ".join(f"{k} {v:.3f} s" for k, v in g.timings.items())
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    with open(path, "w") as f:
        f.write(f"phases: {phases}\n\n{table}\n")
    return phases


# ---------------------------------------------------------------- summary

def figure(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def targets_table(runs: dict[str, Ran], tiny: bool) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    graphs = runs.get("graphs")
    text = graphs.output if graphs else ""
    limit, what = TARGETS["graphs"]
    batches = re.findall(r"prompts per batch (\d+):", text) or ["1"]
    for batch in batches:
        m = figure(rf"prompts per batch {batch}:(?:\n .*)*?\n  total ([\d.]+) s per graph",
                   text)
        lines.append(f"| graphs <= {limit} {what} (prompt batch {batch}) | "
                     f"{'-' if m is None else f'{m:.3f} s'} | "
                     f"{'-' if m is None or tiny else ('yes' if m <= limit else 'no')} |")
    proj = runs.get("projections")
    m = figure(r"\| ours [^|]*\| [\d.]+ s \| ([\d.]+) s \|", proj.output) if proj else None
    limit, what = TARGETS["projections"]
    lines.append(f"| projections < {limit} {what} | {'-' if m is None else f'{m:.3g} s'} | "
                 f"{'-' if m is None or tiny else ('yes' if m < limit else 'no')} |")
    return lines


def summary(device: str, tiny: bool, c: Checks, runs: list[Ran], phases: str | None,
            started: float) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    failed = [r for r in c.rows if not r["ok"]]
    lines = [f"## GPU checks and benchmarks (`bench/gpu.py{' --tiny' if tiny else ''}`)", "",
             f"{time.strftime('%Y-%m-%d')}, {name} ({device}), {describe()}, "
             f"torch {torch.__version__}; {time.perf_counter() - started:.0f} s in all."
             + (" Tiny mode: small shapes on the CPU, figures not comparable with the "
                "targets." if tiny else ""), "",
             f"Checks: {len(c.rows) - len(failed)} of {len(c.rows)} within their limits"
             + (f"; failed: {', '.join(sorted({r['check'] for r in failed}))}" if failed
                else "") + ".", "",
             "| check | model | dtype | relative error or share | limit | ok |",
             "|---|---|---|---|---|---|"]
    for r in c.rows:
        value = r.get("error") or f"{r['value']:.3g}"
        limit = "-" if r["limit"] is None else f"{r['limit']:g}"
        lines.append(f"| {r['check']} | {r['model']} | {r['dtype']} | {value} | {limit} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "| benchmark | command | status | seconds | peak GPU memory |",
              "|---|---|---|---|---|"]
    for r in runs:
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f} GiB"
        lines.append(f"| {r.bench} | `{r.command}` | {r.status} | {r.seconds:.1f} | {peak} |")
    lines += ["", *targets_table({r.bench: r for r in runs}, tiny), ""]
    if phases:
        lines += [f"One graph under torch.profiler (profile.txt): {phases}.", ""]
    for r in runs:
        if r.output:
            lines += [f"### {r.bench}", "", "```text", r.output.strip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for every file this run writes")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true",
                    help="small shapes on the CPU: checks the script, not the GPU")
    ap.add_argument("--budget", type=float, default=470,
                    help="seconds for the whole run; benchmarks past it are skipped")
    ap.add_argument("--skip-benchmarks", action="store_true")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny for the CPU mode")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    print(f"{describe()}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""),
          flush=True)
    c = run_checks(device, args.tiny)
    with open(os.path.join(args.out, "checks.json"), "w") as f:
        json.dump(c.rows, f, indent=1)
    runs: list[Ran] = []
    phases = None
    if not args.skip_benchmarks:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "benchmarks.log"), "w") as log:
            for b in BENCHES:
                left = args.budget - (time.perf_counter() - started)
                runs.append(run_bench(b, device, args.tiny,
                                      min(b.timeout * (4 if args.tiny else 1), left), log))
        try:
            if args.budget - (time.perf_counter() - started) < 30:
                print("profile skipped: out of time", flush=True)
            else:
                phases = profile_graph(device, args.tiny,
                                       os.path.join(args.out, "profile.txt"))
        except Exception as e:
            print(f"profile failed: {e!r}", flush=True)
            traceback.print_exc()
    text = summary(device, args.tiny, c, runs, phases, started)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    broke = [r for r in runs if r.status != "ok" and not r.status.startswith("skipped")]
    bad = [r for r in c.rows if not r["ok"]]
    print(f"\n{len(c.rows) - len(bad)} of {len(c.rows)} checks within their limits; "
          f"{sum(r.status == 'ok' for r in runs)} of {len(runs)} benchmarks ran; "
          f"{time.perf_counter() - started:.0f} s; summary in "
          f"{os.path.join(args.out, 'summary.md')}", flush=True)
    if bad or broke:
        sys.exit(1)


if __name__ == "__main__":
    main()
