"""Weight-based wiring: which neurons of earlier layers excite or inhibit each neuron
through the residual stream, and which later ones it excites or inhibits, from the
weights alone, for every neuron, before any prompt is run.

For a source neuron s of layer l1 and a target t of a later layer l2, along the direct
path through the residual stream (attention and the MLPs in between left out):

    c_gate = W_gate[l2][t] . (w_l2 * v_s)        c_up = W_up[l2][t] . (w_l2 * v_s)

where v_s = W_down[l1][:, s] is what s writes per unit of its activation (in post-norm
families, OLMo-2/3, times the weight of the source MLP's output norm; that norm's
division by its input's RMS is left out) and w_l2 is the weight of the norm in front of
the target's MLP (post-norm families have none there: 1).

**Strength.** The target's activation is h = SiLU(g) * u. We read it the way RelP
linearises it: SiLU by the identity rule (sigma(g) held at its value) and the product
by the half rule, so that a source activation a_s moves the target's linearised read by
``strength * a_s``, with

    strength = alpha_t * c_gate + beta_t * c_up
    alpha_t = 0.5 * sigma(g) * u / r          beta_t = 0.5 * SiLU(g) / r

at the target's operating point (g, u its pre-activations, r the RMS of the residual its
norm divides by, held as RelP holds it; r = 1 without a norm). We take this read, not
the exact derivative ``SiLU'(g) u c_gate + SiLU(g) c_up``, because it is the one whose
contributions add up: over all of the target's inputs they sum to h itself (0.5 sigma(g)
u g + 0.5 SiLU(g) u = h), exactly as a target's incoming RelP edges sum to its read. So
a strength times a source activation is what a RelP edge between the two would be on
the direct path, and the two can be compared (``analysis.wiring``). Polarity is the
strength's sign: +1 excitatory (a positive source activation raises the target's
activation), -1 inhibitory. c_gate and c_up stay in the table: whether a source acts
through the target's gate (a switch) or its up projection (a value). For Gemma's GELU
gate, sigma(g) becomes GELU(g) / g and SiLU(g) becomes GELU(g): the same rule.

**Operating points.** ``corpus``: each target is read where it is active: the
exemplar windows of a corpus (the activations stage's) run once through the model, and
alpha_t and beta_t averaged over the positions of its largest activations by magnitude
(the top ``top_share`` of those tokens; many SwiGLU neurons fire negatively, with
u < 0, and are read there, alpha then negative): the average of the linearised
coefficients, not the coefficients at an average g and u. ``weights``, when no
activations exist: the target is taken to fire positively at one standard deviation of
each pre-activation over a random residual of unit RMS, g = |w_l2 * W_gate[t]|,
u = |w_l2 * W_up[t]|, r = 1: then alpha_t, beta_t > 0 and the polarity is that of
``sigma(g) u c_gate + SiLU(g) c_up``.

**Search.** Since alpha_t and beta_t do not depend on the source, the strengths of all
pairs of two layers are one matrix product, ``(alpha * W_gate' + beta * W_up') @ V``
(gate and up combined before it: half the FLOPs of computing c_gate and c_up apart).
Per target layer and chunk of its neurons, one such product for each earlier layer,
in ``dtype``; from each, every row's (target's) top K of each sign merges into the
target's running upstream lists and every column's (source's) into the source's
running downstream lists, so no more than a chunk of a layer pair's matrix exists at
once. K = k + margin after a low-precision search, whose candidates are then re-scored
exactly (c_gate, c_up and strength in float32, float64 for a float64 model) and
ranked; the top k of each sign are kept, where the sign is right (a neuron with fewer
than k excitatory partners has fewer excitatory rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from circuit_atlas.compute.adapters import FAMILIES, Adapter, activation, activation_ratio
from circuit_atlas.compute.params import WiringParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

CHUNK_BYTES = 256 * 2**20  # one chunk of a layer pair's strength matrix
RESCORE_PAIRS = 4096  # pairs re-scored together (their rows stay in cache)
DOWNSTREAM, UPSTREAM = "downstream", "upstream"


@dataclass
class OperatingPoint:
    """Each layer's alpha and beta (see the module docstring), and where they came
    from."""

    alpha: list[torch.Tensor]  # per layer, (N,)
    beta: list[torch.Tensor]
    source: str  # "weights" or "corpus"
    fallback: int = 0  # neurons read at the weight-only point in a corpus point
    tokens: int = 0  # corpus tokens the point was measured on


def layer_reads(adapter: Adapter, dtype: torch.dtype) -> tuple[list, list, list]:
    """(gate, up, write) per layer in ``dtype``: the gate and up rows with the MLP norm's
    weight folded in (N, d), and what each neuron writes (d, N)."""
    gates, ups, writes = [], [], []
    for blk in adapter.blocks:
        w = 1 if blk.mlp_norm is None else blk.mlp_norm.to(dtype)
        gates.append(blk.gate.to(dtype) * w)
        ups.append(blk.up.to(dtype) * w)
        down = blk.down.to(dtype)
        writes.append(down if blk.mlp_post_norm is None
                      else down * blk.mlp_post_norm.to(dtype)[:, None])
    return gates, ups, writes


def coefficients(g: torch.Tensor, u: torch.Tensor, r: torch.Tensor | float = 1.0,
                 act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) of the RelP-linearised read of h = act(g) * u at (g, u, r): act(g)/g
    held constant (sigma(g) for SiLU) and half the product to each factor."""
    return 0.5 * activation_ratio(act, g) * u / r, 0.5 * activation(act, g) / r


def weight_point(adapter: Adapter, dtype: torch.dtype = torch.float32) -> OperatingPoint:
    """The weight-only operating point: every neuron firing positively at one standard
    deviation of its gate and up pre-activations over a unit-RMS random residual."""
    gates, ups, _ = layer_reads(adapter, dtype)
    alpha, beta = zip(*(coefficients(g.norm(dim=1), u.norm(dim=1), act=adapter.act)
                        for g, u in zip(gates, ups, strict=True)), strict=True)
    return OperatingPoint(list(alpha), list(beta), "weights")


@torch.no_grad()
def corpus_point(model, windows: Iterable, params: WiringParams,
                 on_batch: Callable[[int], None] | None = None) -> OperatingPoint:
    """The operating point measured on ``windows`` (``compute.activations.Window``):
    per neuron, alpha and beta averaged over its top ``top_share`` activations by
    magnitude; a neuron that is exactly 0 there takes the weight-only point."""
    from circuit_atlas.compute.activations import forward_batches

    a = model.adapter
    device, exact = a.device, torch.float64 if a.dtype == torch.float64 else torch.float32
    windows = list(windows)
    counted = sum(len(w.tokens) - w.skip for w in windows)
    if counted < 1:
        raise CircuitAtlasError("no tokens to measure operating points on")
    q = max(1, int(round(params.top_share * counted)))
    layers = model.model.model.layers
    post = adapter_post_norm(a)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    top: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    keep: torch.Tensor | None = None

    def grab(layer: int, name: str):
        def hook(_m, args, out=None):
            seen.setdefault(layer, {})[name] = (args[0] if out is None else out)
        return hook

    def fold(layer: int) -> None:
        got = seen.pop(layer)
        g, u = (got[n].reshape(-1, a.n_neurons).to(exact) for n in ("g", "u"))
        if post:
            r = torch.ones((g.shape[0], 1), dtype=exact, device=device)
        else:
            x = got["x"].reshape(-1, a.d_model).to(exact)
            r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + a.eps)
        if keep is not None:
            g, u, r = g[keep], u[keep], r[keep]
        h = (a.activation(g) * u).abs()
        alpha, beta = coefficients(g, u, r, a.act)
        if layer in top:
            h0, a0, b0 = top[layer]
            h, alpha, beta = torch.cat([h0, h]), torch.cat([a0, alpha]), torch.cat([b0, beta])
        best = h.topk(min(q, h.shape[0]), dim=0)
        top[layer] = (best.values, alpha.gather(0, best.indices), beta.gather(0, best.indices))

    hooks = []
    for i, layer in enumerate(layers):
        if not post:
            hooks.append(getattr(layer, FAMILIES[a.family].mlp_norm_module)
                         .register_forward_pre_hook(grab(i, "x")))
        hooks.append(layer.mlp.gate_proj.register_forward_hook(grab(i, "g")))
        hooks.append(layer.mlp.up_proj.register_forward_hook(grab(i, "u")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, _args, i=i: fold(i)))
    try:
        # fold() reads the batch's keep mask as its forward runs
        for _, _, keep in forward_batches(  # noqa: B007
                model, windows, params.batch_tokens, on_batch):
            pass
    finally:
        for hk in hooks:
            hk.remove()
    weights = weight_point(a, exact)
    alphas, betas, fallback = [], [], 0
    for i in range(a.n_layers):
        h, alpha, beta = top[i]
        active = h > 0
        n = active.sum(0)
        never = n == 0
        fallback += int(never.sum())
        mean_a = torch.where(active, alpha, 0).sum(0) / n.clamp(min=1)
        mean_b = torch.where(active, beta, 0).sum(0) / n.clamp(min=1)
        alphas.append(torch.where(never, weights.alpha[i], mean_a))
        betas.append(torch.where(never, weights.beta[i], mean_b))
    return OperatingPoint(alphas, betas, "corpus", fallback, counted)


def adapter_post_norm(adapter: Adapter) -> bool:
    """Whether the family's MLP reads the raw residual (no norm in front of it)."""
    return adapter.blocks[0].mlp_norm is None


def _merge(lists: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor,
           ids: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if lists is not None:
        values, ids = torch.cat([lists[0], values], 1), torch.cat([lists[1], ids], 1)
    best = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
    return best.values, ids.gather(1, best.indices)


class Wiring:
    """The wiring search of one model at one operating point."""

    def __init__(self, adapter: Adapter, params: WiringParams, point: OperatingPoint,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        a = adapter
        self.a, self.p = a, params
        self.low = getattr(torch, params.dtype)
        self.exact = torch.float64 if a.dtype == torch.float64 else torch.float32
        self.gates, self.ups, self.writes = layer_reads(a, self.exact)
        self.alpha = [x.to(self.exact) for x in point.alpha]
        self.beta = [x.to(self.exact) for x in point.beta]
        self.K = params.k + (params.margin if self.low != self.exact else 0)
        self.reads = self.written = None
        self.chunk_bytes = chunk_bytes

    def pairs(self) -> int:
        return self.a.n_layers * (self.a.n_layers - 1) // 2

    def search(self, on_pair: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
        """Candidate lists {layer: ((hi values, hi ids), (lo values, lo ids))} for the
        upstream and the downstream direction; ids are layer * N + neuron."""
        a, K, N = self.a, self.K, self.a.n_neurons
        # every layer's writes side by side: a target chunk against all earlier layers
        # is one product, one top-k per sign for its rows and one for its columns
        # (d, L * N): a column's index is its global id, layer * N + neuron
        writes = torch.cat([w.to(self.low) for w in self.writes], 1)
        bytes_ = torch.finfo(self.low).bits // 8
        up: dict[int, list] = {}
        down: dict[int, list] = {i: [None, None] for i in range(a.n_layers - 1)}
        for l2 in range(1, a.n_layers):
            reads = (self.alpha[l2][:, None] * self.gates[l2]
                     + self.beta[l2][:, None] * self.ups[l2]).to(self.low)
            chunk = max(1, min(N, self.chunk_bytes // (l2 * N * bytes_)))
            rows = []
            for lo in range(0, N, chunk):
                s = reads[lo:lo + chunk] @ writes[:, :l2 * N]  # (C, l2 * N)
                lists = []
                for slot, largest in enumerate((True, False)):
                    best = s.topk(min(K, s.shape[1]), dim=1, largest=largest)
                    lists.append((best.values, best.indices))
                    col = s.topk(min(K, s.shape[0]), dim=0, largest=largest)
                    values, tgt = col.values.T, col.indices.T + (l2 * N + lo)
                    for l1 in range(l2):
                        part = slice(l1 * N, (l1 + 1) * N)
                        down[l1][slot] = _merge(down[l1][slot], values[part], tgt[part], K,
                                                largest)
                rows.append(lists)
            up[l2] = [tuple(torch.cat([r[j][m] for r in rows]) for m in range(2))
                      for j in range(2)]
            if on_pair:
                on_pair(l2 * (l2 + 1) // 2, self.pairs())
        return up, down

    def exact_pairs(self, src_layer: np.ndarray, src: np.ndarray, tgt_layer: np.ndarray,
                    tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c_gate, c_up, strength) of each given pair, exactly."""
        if self.reads is None:  # (N, 2, d) gate and up rows, (N, d) writes: rows to gather
            self.reads = [torch.stack([g, u], 1) for g, u in zip(self.gates, self.ups,
                                                                strict=True)]
            self.written = [w.T.contiguous() for w in self.writes]
        n, d = len(src), self.a.d_model
        c_gate, c_up, strength = (np.zeros(n, np.float64) for _ in range(3))
        key = src_layer.astype(np.int64) * self.a.n_layers + tgt_layer
        # gathered into buffers reused step after step: fresh ones cost more in page
        # faults than the products
        step = RESCORE_PAIRS
        buf_r = torch.empty((min(step, n), 2, d), dtype=self.exact, device=self.a.device)
        buf_w = torch.empty((min(step, n), d), dtype=self.exact, device=self.a.device)
        for k in np.unique(key):
            where = np.flatnonzero(key == k)
            l1, l2 = divmod(int(k), self.a.n_layers)
            for lo in range(0, len(where), step):
                sel = where[lo:lo + step]
                s = torch.as_tensor(src[sel], device=self.a.device)
                t = torch.as_tensor(tgt[sel], device=self.a.device)
                r = torch.index_select(self.reads[l2], 0, t, out=buf_r[:len(sel)])
                w = torch.index_select(self.written[l1], 0, s, out=buf_w[:len(sel)])
                c = torch.bmm(r, w[:, :, None])[:, :, 0]
                st = self.alpha[l2][t] * c[:, 0] + self.beta[l2][t] * c[:, 1]
                c_gate[sel], c_up[sel], strength[sel] = (x.cpu().double().numpy()
                                                         for x in (c[:, 0], c[:, 1], st))
        return c_gate, c_up, strength

    def ranked(self, layer: int, direction: str, lists) -> dict[str, np.ndarray]:
        """The exact top k of each sign of ``layer``'s neurons' candidate lists."""
        N, k = self.a.n_neurons, self.p.k
        parts = []
        for polarity, (_, ids) in zip((1, -1), lists, strict=True):
            ids = ids.cpu().numpy()
            n, width = ids.shape
            mine = np.repeat(np.arange(n), width)
            other_layer, other = np.divmod(ids.ravel(), N)
            me = np.full(n * width, layer)
            if direction == DOWNSTREAM:
                cols = (me, mine, other_layer, other)
            else:
                cols = (other_layer, other, me, mine)
            c_gate, c_up, strength = self.exact_pairs(*cols)
            signed = (polarity * strength).reshape(n, width)
            order = np.argsort(-signed, axis=1, kind="stable")[:, :k]
            picked = (np.arange(n)[:, None] * width + order).ravel()
            good = (polarity * strength[picked]) > 0
            picked = picked[good]
            rank = np.tile(np.arange(order.shape[1]), n)[good]
            parts.append({
                "src_layer": cols[0][picked], "src_neuron": cols[1][picked],
                "tgt_layer": cols[2][picked], "tgt_neuron": cols[3][picked],
                "polarity": np.full(len(picked), polarity), "rank": rank,
                "c_gate": c_gate[picked], "c_up": c_up[picked],
                "strength": strength[picked]})
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


@torch.no_grad()
def wire(adapter: Adapter, params: WiringParams, point: OperatingPoint | None = None,
         on_pair: Callable[[int, int], None] | None = None,
         chunk_bytes: int = CHUNK_BYTES) -> dict[int, dict[str, np.ndarray]]:
    """Every neuron's top-k excitatory and inhibitory upstream and downstream
    connections: {layer: columns} with each layer's downstream rows (its neurons as
    sources) and upstream rows (as targets); ``params.dtype`` must be resolved."""
    if params.dtype == "auto":
        raise CircuitAtlasError("resolve the wiring dtype first (WiringParams.resolved)")
    point = point or weight_point(adapter)
    w = Wiring(adapter, params, point, chunk_bytes)
    up, down = w.search(on_pair)
    out = {}
    for layer in range(adapter.n_layers):
        parts = []
        if layer in down:
            parts.append((DOWNSTREAM, w.ranked(layer, DOWNSTREAM, down[layer])))
        if layer in up:
            parts.append((UPSTREAM, w.ranked(layer, UPSTREAM, up[layer])))
        cols = {c: np.concatenate([p[c] for _, p in parts]) for c in parts[0][1]}
        cols["direction"] = np.concatenate([np.full(len(p["rank"]), d) for d, p in parts])
        out[layer] = cols
    return out


def wiring_table(cols: dict[str, np.ndarray]) -> pa.Table:
    from circuit_atlas.lake.schemas import WIRING

    return pa.table({
        "direction": pa.array(cols["direction"], pa.string()),
        "src_layer": pa.array(cols["src_layer"], pa.int16()),
        "src_neuron": pa.array(cols["src_neuron"], pa.int32()),
        "tgt_layer": pa.array(cols["tgt_layer"], pa.int16()),
        "tgt_neuron": pa.array(cols["tgt_neuron"], pa.int32()),
        "polarity": pa.array(cols["polarity"], pa.int8()),
        "rank": pa.array(cols["rank"], pa.int16()),
        "strength": pa.array(cols["strength"], pa.float32()),
        "c_gate": pa.array(cols["c_gate"], pa.float32()),
        "c_up": pa.array(cols["c_up"], pa.float32()),
    }, schema=WIRING.schema)


def exemplar_windows(lake, model: str, versions: dict[str, str], tokens: int) -> list:
    """Exemplar windows of the activation runs ``versions`` names ({corpus: version of
    its exemplar_windows, as ``window_versions`` gives them}; ``tokens`` shared among
    them, each corpus's first windows by id until their counted tokens reach its
    share); [] when there is none."""
    from circuit_atlas.compute.activations import Window

    out = []
    for corpus, version in versions.items():
        df = (lake.table("exemplar_windows", model, corpus, version=version)
              .select("window_id", "prompt_id", "start", "skip", "token_ids")
              .sort("window_id").collect())
        counted = (df["token_ids"].list.len() - df["skip"]).cum_sum()
        df = df.filter(counted.shift(1, fill_value=0) < tokens // len(versions))
        out += [Window(r["window_id"], r["prompt_id"], r["start"], tuple(r["token_ids"]),
                       r["skip"]) for r in df.iter_rows(named=True)]
    return out


@dataclass
class WiringReport(Report):
    model: str
    rows: int
    neurons: int
    params: WiringParams
    point: str  # "weights" or "corpus <key> (N tokens, F neurons at the weight-only point)"
    corpus: str  # the partition the table went to
    seconds: float
    agreement: dict | None = None  # the all-layer row of wiring_agreement

    def __str__(self) -> str:
        p = self.params
        line = (f"wiring {self.model}: {self.rows:,} connections of {self.neurons:,} neurons "
                f"(top {p.k} per direction and polarity, search in {p.dtype}, operating point "
                f"{self.point}), {self.seconds:.1f} s")
        if self.agreement:
            from circuit_atlas.analysis.wiring import describe

            line += "\n" + describe(self.agreement)
        return line


def run_wiring(lake, *, model, corpora=None, params: WiringParams | None = None,
               cluster=None, progress: Progress | None = None) -> WiringReport:
    """Weight-based wiring of every neuron: the ``wiring`` table. With ``corpora``, the
    operating points come from their activation run's exemplar windows (``auto``) and
    the wiring is compared with their RelP edges where they are reduced (table
    ``wiring_agreement``); the table goes under the corpus key then, else under corpus
    ``static``. Runs in this process (``cluster`` unused: one pass over the weights)."""
    from circuit_atlas.analysis.wiring import agreement, write_agreement
    from circuit_atlas.compute.models import loaded
    from circuit_atlas.lake.layout import corpus_key
    from circuit_atlas.lake.schemas import STATIC_CORPUS, WIRING

    lake, params = open_lake(lake), params or WiringParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    start = time.perf_counter()
    model = loaded(model, params.device, "float32", "wiring", progress)
    params = params.resolved(model.device, progress.message)
    key = corpus_key(corpora) if corpora else None
    windows = []
    if params.operating_point != "weights":
        if key is None and params.operating_point == "corpus":
            raise CircuitAtlasError("--operating-point corpus needs --corpus")
        if key is not None:  # the versions read are the ones the table records
            versions = window_versions(lake, model.name, corpora)
            windows = exemplar_windows(lake, model.name, versions, params.operating_tokens)
        if not windows and params.operating_point == "corpus":
            raise CircuitAtlasError(
                f"no exemplar windows for {model.name!r} in {', '.join(corpora)}; run: "
                f"circuit-atlas "
                f"activations --corpus ... first, or use --operating-point weights")
    a = model.adapter
    where = key if windows else STATIC_CORPUS
    basis = {"params": params.to_dict(), "model": model.name,
             "model_revision": model.revision, "model_shape": model.shape,
             "windows": versions if windows else None}
    current = up_to_date(lake, model.name, where, basis)
    if current is not None:
        rows, described = current["rows"], current["described"] + ", up to date: kept"
    else:
        if windows:
            total = sum(len(w.tokens) for w in windows)
            point = corpus_point(model, windows, params,
                                 _counter(progress, "operating points", total))
            described = (f"corpus {key} ({point.tokens:,} tokens, {point.fallback:,} "
                         f"neurons at the weight-only point)")
        else:
            point, described = weight_point(a), "weights"
        cols = wire(a, params, point,
                    on_pair=lambda d, t: progress.update("wiring layer pairs", d, t))
        version = lake.new_table_version(model.name, where, "wiring")
        files, rows = [], 0
        for layer, c in cols.items():
            table = wiring_table(c)
            files.append(version.write(f"layer-{layer:03d}.parquet", table, WIRING))
            rows += table.num_rows
        version.publish(files, {**basis, "operating_point": point.source,
                                "operating_corpus": key if point.source == "corpus" else None,
                                "operating_tokens": point.tokens, "fallback": point.fallback,
                                "rows": rows, "described": described})
    summary = None
    if key is not None and lake.table_manifest(model.name, key, "edges") is not None:
        table = agreement(lake, model.name, key, a.n_layers, a.n_neurons, where)
        write_agreement(lake, model.name, key, table, where)
        summary = table.row(0, named=True)
    return WiringReport(model.name, rows, a.n_layers * a.n_neurons, params, described, where,
                        time.perf_counter() - start, summary)


def window_versions(lake, model: str, corpora: list[str]) -> dict[str, str]:
    """The current version of each corpus's exemplar windows: what a corpus operating
    point was measured on."""
    out = {}
    for corpus in corpora:
        manifest = lake.table_manifest(model, corpus, "exemplar_windows")
        if manifest is not None:
            out[corpus] = manifest["version"]
    return out


def up_to_date(lake, model: str, where: str, basis: dict) -> dict | None:
    """The inputs of the current wiring table when it was built from ``basis`` (the
    same parameters, model revision and exemplar windows) by this code version, else
    None. A model without a revision (a local folder) is never up to date: its weights
    may have changed in place."""
    import json

    from circuit_atlas._version import __version__
    from circuit_atlas.compute.models import LOCAL_REVISION

    basis = json.loads(json.dumps(basis))  # as the manifest holds it (tuples as lists)
    if basis["model_revision"] in (None, "", LOCAL_REVISION):
        return None
    manifest = lake.table_manifest(model, where, "wiring")
    if manifest is None or manifest.get("code_version") != __version__:
        return None
    inputs = manifest["inputs"]
    if "rows" not in inputs or any(inputs.get(k) != v for k, v in basis.items()):
        return None
    return inputs


def _counter(progress: Progress, task: str, total: int) -> Callable[[int], None]:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress.update(task, done, total)
    return tick
