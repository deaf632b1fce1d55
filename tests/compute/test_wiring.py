"""Weight-based wiring: the search against a float64 brute force over all pairs, the
polarity on hand-built weights, the strength against a hooked Hugging Face forward,
the agreement with RelP against a loop over the tables, and the stage end to end."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from circuit_atlas.analysis.wiring import TOP_RELP, agreement_frame
from circuit_atlas.cli import cli
from circuit_atlas.compute.activations import Window
from circuit_atlas.compute.adapters import adapter_for
from circuit_atlas.compute.params import WiringParams
from circuit_atlas.compute.wiring import (
    OperatingPoint,
    Wiring,
    coefficients,
    corpus_point,
    weight_point,
    wire,
)
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from tests.factories import tiny_llama, tiny_model_dir

FAMILIES = ["llama", "qwen3", "qwen2", "mistral", "olmo2", "olmo3", "gemma2", "gemma3_text"]


def brute_force(adapter, point: OperatingPoint, k: int) -> dict:
    """Every pair of every two layers in float64, sorted: {(direction, layer, neuron):
    [(polarity, other layer, other neuron, strength), ...]}."""
    L, N = adapter.n_layers, adapter.n_neurons
    strength = {}
    for l1 in range(L):
        b1 = adapter.blocks[l1]
        write = b1.down.double()
        if b1.mlp_post_norm is not None:
            write = write * b1.mlp_post_norm.double()[:, None]
        for l2 in range(l1 + 1, L):
            b2 = adapter.blocks[l2]
            w = 1.0 if b2.mlp_norm is None else b2.mlp_norm.double()
            c_gate, c_up = (b2.gate.double() * w) @ write, (b2.up.double() * w) @ write
            strength[l1, l2] = (point.alpha[l2].double()[:, None] * c_gate
                                + point.beta[l2].double()[:, None] * c_up).numpy()
    out = {}
    for layer in range(L):
        for n in range(N):
            for direction in ("downstream", "upstream"):
                if direction == "downstream":
                    pairs = [(strength[layer, l2][t, n], l2, t)
                             for l2 in range(layer + 1, L) for t in range(N)]
                else:
                    pairs = [(strength[l1, layer][n, s], l1, s)
                             for l1 in range(layer) for s in range(N)]
                pairs.sort(key=lambda p: -p[0])
                out[direction, layer, n] = (
                    [(1, lo, o, v) for v, lo, o in pairs[:k] if v > 0]
                    + [(-1, lo, o, v) for v, lo, o in pairs[::-1][:k] if v < 0])
    return out


def as_lists(cols: dict[int, dict[str, np.ndarray]]) -> dict:
    out: dict = {}
    for layer, c in cols.items():
        for i in range(len(c["rank"])):
            down = c["direction"][i] == "downstream"
            me = (c["src_neuron"] if down else c["tgt_neuron"])[i]
            other = (c["tgt_layer"][i], c["tgt_neuron"][i]) if down else (
                c["src_layer"][i], c["src_neuron"][i])
            out.setdefault((c["direction"][i], layer, int(me)), []).append(
                (int(c["polarity"][i]), int(other[0]), int(other[1]), float(c["strength"][i])))
    return out


def random_point(adapter, seed: int) -> OperatingPoint:
    """alpha of both signs (targets read where their up projection is negative, too)."""
    gen = torch.Generator().manual_seed(seed)
    n = adapter.n_neurons
    return OperatingPoint([torch.randn(n, generator=gen, dtype=torch.float64)
                           for _ in range(adapter.n_layers)],
                          [torch.rand(n, generator=gen, dtype=torch.float64)
                           for _ in range(adapter.n_layers)], "corpus")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,point", [("float64", "weights"), ("float32", "random")])
def test_top_k_equal_a_float64_brute_force(family, dtype, point):
    """Top-k sets and values identical, pre-norm and post-norm, with the search chunked
    down to one target row (float32: a low-precision search re-scored exactly)."""
    adapter = adapter_for(tiny_llama(family=family, n_layers=4, neurons=24))
    pt = weight_point(adapter, torch.float64) if point == "weights" else random_point(
        adapter, 1)
    k = 4
    got = as_lists(wire(adapter, WiringParams(k=k, dtype=dtype), pt,
                        chunk_bytes=24 * 8 * 5))
    want = brute_force(adapter, pt, k)
    assert set(got) == {key for key, v in want.items() if v}
    for key, rows in want.items():
        mine = got.get(key, [])
        assert [r[:3] for r in mine] == [r[:3] for r in rows], key
        np.testing.assert_allclose([r[3] for r in mine], [r[3] for r in rows], rtol=1e-12)


def test_fewer_partners_than_k_and_the_last_layer():
    """A source of the last layer has no downstream, a target of layer 0 no upstream;
    with k above the partners, each list holds only the right sign."""
    adapter = adapter_for(tiny_llama(n_layers=2, neurons=3))
    cols = wire(adapter, WiringParams(k=5, dtype="float64"), weight_point(adapter,
                                                                          torch.float64))
    assert set(cols[0]["direction"]) == {"downstream"}
    assert set(cols[1]["direction"]) == {"upstream"}
    for c in cols.values():
        assert (np.sign(c["strength"]) == c["polarity"]).all()
        for n in range(3):
            mine = c["src_neuron" if c["direction"][0] == "downstream" else "tgt_neuron"] == n
            assert mine.sum() == 3  # three partners, each in one list


def hand_built():
    """Two layers; source L0/N0 writes e0, the others write where no target reads;
    the four targets of layer 1 read e0 with known signs through gate and up."""
    model = tiny_llama(n_layers=2, neurons=4, d=32)
    e = torch.eye(32, dtype=torch.float64)
    with torch.no_grad():
        mlp0, mlp1 = model.model.layers[0].mlp, model.model.layers[1].mlp
        mlp0.down_proj.weight.copy_(torch.stack([e[0], e[10], e[11], e[12]], 1))
        model.model.layers[1].post_attention_layernorm.weight.fill_(1.0)
        gates = [e[0], -e[0], e[1], 2 * e[1]]
        ups = [e[0], 3 * e[2], -e[0], 0.5 * e[0]]
        mlp1.gate_proj.weight.copy_(torch.stack(gates))
        mlp1.up_proj.weight.copy_(torch.stack(ups))
    return model, gates, ups


def test_polarity_on_hand_built_weights():
    model, gates, ups = hand_built()
    adapter = adapter_for(model)
    cols = wire(adapter, WiringParams(k=4, dtype="float64"), weight_point(adapter,
                                                                          torch.float64))
    up = pl.DataFrame({c: v for c, v in cols[1].items()}).filter(
        (pl.col("direction") == "upstream") & (pl.col("src_neuron") == 0)).sort("tgt_neuron")
    # (c_gate, c_up) by construction; the polarity: excitatory through both, inhibitory
    # through the gate (a switch closed), inhibitory through up, excitatory through up
    assert up["c_gate"].to_list() == [1.0, -1.0, 0.0, 0.0]
    assert up["c_up"].to_list() == [1.0, 0.0, -1.0, 0.5]
    assert up["polarity"].to_list() == [1, -1, -1, 1]
    g0 = torch.tensor([float(g.norm()) for g in gates], dtype=torch.float64)
    u0 = torch.tensor([float(u.norm()) for u in ups], dtype=torch.float64)
    alpha, beta = coefficients(g0, u0)
    expected = alpha * torch.tensor([1.0, -1, 0, 0]) + beta * torch.tensor([1.0, 0, -1, 0.5])
    np.testing.assert_allclose(up["strength"].to_numpy(), expected.numpy(), rtol=1e-12)
    # the sources that write where no target reads have no connections at all
    assert set(up["src_neuron"]) == {0} and len(cols[1]["rank"]) == 4


def no_attention(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


def test_strength_is_the_linearised_change_of_a_hooked_forward():
    """Attention removed, adjacent layers: a source's activation nudged by eps in a
    hooked HF forward, the target's norm held at its RMS, moves the target's
    RelP-linearised read by strength * eps, at the token its operating point is from."""
    model = no_attention(tiny_llama(n_layers=2, neurons=16))
    adapter = adapter_for(model)
    from circuit_atlas.compute.models import LoadedModel

    loaded = LoadedModel("tiny", "local", model, None, adapter)
    tokens = (5, 9, 17, 3, 40, 22)
    ids = torch.tensor([tokens])
    layer0, layer1 = model.model.layers
    norm = layer1.post_attention_layernorm
    x = {}
    hk = norm.register_forward_pre_hook(lambda m, a: x.__setitem__("x", a[0]))
    model(input_ids=ids)
    hk.remove()
    # the norm held at its RMS, in float64 (HF's RMSNorm computes in float32, whose
    # rounding of g would swamp a difference of 1e-3)
    rms = torch.sqrt(x["x"].pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    frozen = norm.register_forward_hook(lambda m, a, o: a[0] / rms * m.weight)
    point = corpus_point(loaded, [Window(1, "d", 0, tokens)],
                         WiringParams(top_share=1 / len(tokens)))
    captured = {}
    layer1.mlp.gate_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("g", o))
    layer1.mlp.up_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("u", o))
    model(input_ids=ids)
    g, u = captured["g"][0], captured["u"][0]
    h = torch.nn.functional.silu(g) * u
    w = Wiring(adapter, WiringParams(dtype="float64"), point)
    checked = 0
    for t in range(16):
        p = int(h[:, t].abs().argmax())
        eps, s = 1e-3, (t * 7) % 16
        nudge = torch.zeros(1, len(tokens), 16, dtype=torch.float64)
        nudge[0, p, s] = eps
        model(input_ids=ids)
        base_g, base_u = captured["g"][0, p, t].item(), captured["u"][0, p, t].item()
        hook = layer0.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, nudge=nudge: (a[0] + nudge,))
        model(input_ids=ids)
        hook.remove()
        d_g, d_u = captured["g"][0, p, t].item() - base_g, captured["u"][0, p, t].item() - base_u
        sig = torch.sigmoid(torch.tensor(base_g)).item()
        read = 0.5 * sig * base_u * d_g + 0.5 * base_g * sig * d_u
        _, _, strength = w.exact_pairs(np.array([0]), np.array([s]), np.array([1]),
                                       np.array([t]))
        np.testing.assert_allclose(strength[0] * eps, read, rtol=1e-7)
        checked += 1
    frozen.remove()
    assert checked == 16


def test_corpus_point_from_hidden_states():
    """alpha and beta of the corpus point against g, u and r recomputed from the
    model's hidden states (attention removed, so the residual before each MLP is the
    hidden state before its layer), over each neuron's top positions."""
    model = no_attention(tiny_llama(n_layers=3, neurons=16))
    adapter = adapter_for(model)
    from circuit_atlas.compute.models import LoadedModel

    loaded = LoadedModel("tiny", "local", model, None, adapter)
    windows = [Window(i, f"d{i}", 0, tuple(int(x) for x in np.random.default_rng(i).integers(
        1, 64, 12)), skip=1) for i in range(3)]
    params = WiringParams(top_share=0.2)
    point = corpus_point(loaded, windows, params)
    counted = sum(len(w.tokens) - 1 for w in windows)
    q = round(0.2 * counted)
    hidden = [model(input_ids=torch.tensor([w.tokens]), output_hidden_states=True
                    ).hidden_states for w in windows]
    for i, layer in enumerate(model.model.layers):
        x = torch.cat([hs[i][0, 1:] for hs in hidden])  # skip=1: position 0 not counted
        normed = layer.post_attention_layernorm(x)
        g, u = layer.mlp.gate_proj(normed), layer.mlp.up_proj(normed)
        r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (torch.nn.functional.silu(g) * u).abs()
        alpha, beta = coefficients(g, u, r)
        negative = 0
        for n in range(16):
            top = torch.argsort(h[:, n], descending=True)[:q]
            negative += int(alpha[top, n].mean() < 0)
            np.testing.assert_allclose(point.alpha[i][n].item(), alpha[top, n].mean().item(),
                                       rtol=1e-9)
            np.testing.assert_allclose(point.beta[i][n].item(), beta[top, n].mean().item(),
                                       rtol=1e-9)
        assert negative  # some neurons are read where they fire negatively


def agreement_oracle(wiring: pl.DataFrame, edges: pl.DataFrame, n_layers: int, n: int,
                     activations: pl.DataFrame | None = None):
    """The all-layer agreement row by loops over plain rows."""
    mean = {} if activations is None else {
        (r["layer"], r["neuron"]): r["activation_mean"] for r in activations.iter_rows(
            named=True)}
    relp: dict = {}
    for r in edges.iter_rows(named=True):
        if (0 <= r["src_layer"] < r["tgt_layer"] < n_layers and r["src_neuron"] >= 0
                and r["tgt_neuron"] >= 0):
            relp.setdefault((r["tgt_layer"], r["tgt_neuron"]), []).append(r)
    strongest: dict = {}
    for r in wiring.filter(pl.col("direction") == "upstream").iter_rows(named=True):
        key = (r["tgt_layer"], r["tgt_neuron"])
        best = strongest.get(key)
        if best is None or (-abs(r["strength"]), r["src_layer"], r["src_neuron"]) < (
                -abs(best["strength"]), best["src_layer"], best["src_neuron"]):
            strongest[key] = r
    hits, chance = [], []
    for key, best in strongest.items():
        if key not in relp:
            continue
        ranked = sorted(relp[key], key=lambda r: (-r["count"], -r["mean_abs_weight"],
                                                  r["src_layer"], r["src_neuron"]))[:TOP_RELP]
        hits.append((best["src_layer"], best["src_neuron"]) in {
            (r["src_layer"], r["src_neuron"]) for r in ranked})
        chance.append(len(ranked) / (key[0] * n))
    seen, both = set(), []
    by_pair = {(r["src_layer"], r["src_neuron"], r["tgt_layer"], r["tgt_neuron"]): r
               for rows in relp.values() for r in rows}
    for r in wiring.iter_rows(named=True):
        pair = (r["src_layer"], r["src_neuron"], r["tgt_layer"], r["tgt_neuron"])
        if pair in by_pair and pair not in seen:
            seen.add(pair)
            both.append((r["strength"] * mean.get(pair[:2], 1.0),
                         by_pair[pair]["mean_weight"]))
    s, m = np.array(both).T
    return {"neurons": len(hits), "hits": sum(hits), "hit_rate": np.mean(hits),
            "chance_rate": np.mean(chance), "pairs": len(both),
            "spearman": stats.spearmanr(s, m).statistic,
            "sign_agreement": np.mean(np.sign(s) == np.sign(m))}


def synthetic(seed: int, n_layers: int = 4, n: int = 12):
    rng = np.random.default_rng(seed)
    rows = []
    for direction in ("downstream", "upstream"):
        for _ in range(150):
            l1 = int(rng.integers(0, n_layers - 1))
            l2 = int(rng.integers(l1 + 1, n_layers))
            rows.append((direction, l1, int(rng.integers(n)), l2, int(rng.integers(n)),
                         float(rng.normal())))
    wiring = pl.DataFrame(rows, schema=["direction", "src_layer", "src_neuron", "tgt_layer",
                                        "tgt_neuron", "strength"], orient="row")
    wiring = wiring.unique(["direction", "src_layer", "src_neuron", "tgt_layer",
                            "tgt_neuron"], keep="first")
    edges = []
    for _ in range(400):  # embedding (-1) and logit (n_layers) nodes among them
        l1 = int(rng.integers(-1, n_layers))
        l2 = int(rng.integers(max(l1, 0), n_layers + 1))
        edges.append((l1, int(rng.integers(n)), l2, int(rng.integers(n)),
                      int(rng.integers(1, 6)), float(rng.normal())))
    edges = pl.DataFrame(edges, schema=["src_layer", "src_neuron", "tgt_layer", "tgt_neuron",
                                        "count", "mean_weight"], orient="row")
    edges = edges.unique(["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"],
                         keep="first").with_columns(mean_abs_weight=pl.col("mean_weight").abs())
    return wiring, edges


@pytest.mark.parametrize("seed", range(4))
def test_agreement_equals_a_loop_over_the_rows(seed):
    wiring, edges = synthetic(seed)
    rng = np.random.default_rng(seed)
    activations = pl.DataFrame({"layer": np.repeat(np.arange(4), 12)[::2],
                                "neuron": np.tile(np.arange(12), 4)[::2],
                                "activation_mean": rng.normal(size=24)}) if seed % 2 else None
    got = agreement_frame(wiring, edges, 4, 12, activations)
    want = agreement_oracle(wiring, edges, 4, 12, activations)
    row = got.row(0, named=True)
    assert row["layer"] is None
    for key, value in want.items():
        np.testing.assert_allclose(row[key], value, rtol=1e-9, err_msg=key)
    assert got["neurons"][1:].sum() == row["neurons"]  # the per-layer rows add up


def test_stage_on_a_model_without_graphs_and_its_atlas(tmp_path):
    """A model with no graph gets an atlas: wiring at the weight-only point, then
    export duckdb --edges wiring with every neuron and the seeds' edge query."""
    import duckdb

    model = tiny_model_dir(tmp_path / "model", n_layers=3, neurons=16)
    lake = str(tmp_path / "lake")
    Lake.init(lake)
    runner = CliRunner()
    out = runner.invoke(cli, ["wiring", "--model", model, "--lake", lake, "--k", "3",
                              "--dtype", "float32"])
    assert out.exit_code == 0, out.output
    assert "operating point weights" in out.output
    db = tmp_path / "atlas.duckdb"
    out = runner.invoke(cli, ["export", "duckdb", str(db), "--model", model, "--lake", lake,
                              "--edges", "wiring"])
    assert out.exit_code == 0, out.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM neurons").fetchone()[0] == 48
    n_edges, sources = con.execute(
        "SELECT count(*), count(DISTINCT (src_layer, src_neuron)) FROM edges").fetchone()
    assert sources == 32 and n_edges <= 32 * 6  # layers 0, 1 have downstream lists
    rows = con.execute("""
        SELECT e.src_layer, e.src_neuron, e.tgt_layer, e.tgt_neuron, e.mean_weight,
               n1.label AS src_label, n2.label AS tgt_label
        FROM edges e
        JOIN neurons n1 ON e.src_layer = n1.layer AND e.src_neuron = n1.neuron
        JOIN neurons n2 ON e.tgt_layer = n2.layer AND e.tgt_neuron = n2.neuron
        ORDER BY e.mean_abs_weight DESC""").fetchall()
    assert len(rows) == n_edges
    assert con.execute("SELECT count(*) FROM edges WHERE effective_strength * polarity <= 0"
                       ).fetchone()[0] == 0
    meta = dict(con.execute("SELECT key, value FROM metadata").fetchall())
    assert "wiring" in meta["edges"]


def test_refusals(tmp_path):
    model = tiny_model_dir(tmp_path / "model", n_layers=2, neurons=8)
    lake = str(tmp_path / "lake")
    Lake.init(lake)
    runner = CliRunner()
    out = runner.invoke(cli, ["wiring", "--model", model, "--lake", lake,
                              "--operating-point", "corpus"])
    assert out.exit_code != 0 and "needs --corpus" in out.output
    out = runner.invoke(cli, ["wiring", "--model", model, "--lake", lake, "--corpus", "c",
                              "--operating-point", "corpus"])
    assert out.exit_code != 0 and "no exemplar windows" in out.output
    out = runner.invoke(cli, ["export", "duckdb", str(tmp_path / "a.duckdb"), "--model", model,
                              "--lake", lake, "--edges", "wiring"])
    assert out.exit_code != 0 and "run: circuit-atlas wiring" in out.output
    with pytest.raises(CircuitAtlasError, match="k >= 1"):
        WiringParams(k=0)


def test_the_demo_lake_wiring_agreement_profile_and_atlas(demo_run):
    """The demo computed the wiring of every SmolLM2 neuron at the corpus operating
    point: its agreement row equals the loop over the real tables, a profile shows it,
    and its atlas file answers the seeds' queries with every neuron in it."""
    import duckdb

    root, printed = demo_run
    lake, key = Lake(str(root)), "general+medical"
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "agreement with RelP" in printed
    manifest = lake.table_manifest(model, key, "wiring")
    assert manifest["inputs"]["operating_point"] == "corpus"
    wiring = lake.table("wiring", model, key).collect()
    assert wiring.height > 1_000_000
    assert (wiring["strength"].sign() == wiring["polarity"]).all()
    row = lake.table("wiring_agreement", model, key).collect().row(0, named=True)
    want = agreement_oracle(wiring, lake.table("edges", model, key).collect(), 30, 1536,
                            lake.table("neurons", model, key).collect())
    for name, value in want.items():
        np.testing.assert_allclose(row[name], value, rtol=1e-6, err_msg=name)
    assert row["hit_rate"] > 10 * row["chance_rate"]  # the weights predict what graphs find
    busiest = lake.table("neurons", model, key).filter(pl.col("layer") == 20).sort(
        "graph_count").tail(1).collect()
    neuron = f"L20/N{busiest['neuron'][0]}"
    out = CliRunner().invoke(cli, ["profile", neuron, "--lake", str(root)])
    assert out.exit_code == 0, out.output
    assert "weight-based wiring (operating point corpus" in out.output
    assert "upstream excitatory: L" in out.output
    db = root / "atlas-wiring.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM neurons").fetchone()[0] == 46080
    assert con.execute("SELECT count(*) FROM edges").fetchone()[0] == wiring.filter(
        pl.col("direction") == "downstream").height
    con.close()
    # the seeds' queries, by top-level module (a one-prompt demo has few sub-modules)
    con = duckdb.connect(str(db), read_only=True)
    ((top,),) = con.execute("SELECT top_cluster FROM neurons WHERE top_cluster IS NOT NULL "
                            "GROUP BY ALL ORDER BY count(*) DESC LIMIT 1").fetchall()
    members = con.execute(f"SELECT layer, neuron, label FROM neurons WHERE top_cluster = {top}"
                          ).fetchall()
    con.execute("SELECT layer, neuron, label, top_cluster FROM neurons "
                "WHERE label ILIKE '%aspirin%'").fetchall()
    largest = con.execute("""
        SELECT top_cluster, count(*) as n,
               list(label ORDER BY max_activation DESC NULLS LAST)[1:3] AS labels
        FROM neurons WHERE top_cluster IS NOT NULL
        GROUP BY top_cluster ORDER BY n DESC, top_cluster LIMIT 20""").fetchall()
    within = con.execute(f"""
        SELECT e.src_layer, e.src_neuron, e.tgt_layer, e.tgt_neuron, e.mean_weight,
               n1.label as src_label, n2.label as tgt_label
        FROM edges e
        JOIN neurons n1 ON e.src_layer = n1.layer AND e.src_neuron = n1.neuron
        JOIN neurons n2 ON e.tgt_layer = n2.layer AND e.tgt_neuron = n2.neuron
        WHERE n1.top_cluster = {top} AND n2.top_cluster = {top}
        ORDER BY e.mean_abs_weight DESC""").fetchall()
    assert members and largest[0][0] == top
    assert all(isinstance(r[4], float) for r in within)


def test_a_rerun_on_the_same_inputs_keeps_the_table(demo_run):
    """The demo's wiring table is up to date for the basis it recorded, and stops being
    so when the parameters, the model's revision or the exemplar windows change, or the
    model is a local folder whose weights may have changed in place."""
    from circuit_atlas.compute.wiring import up_to_date

    lake, key = Lake(str(demo_run[0])), "general+medical"
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    inputs = lake.table_manifest(model, key, "wiring")["inputs"]
    basis = {k: inputs[k] for k in ("params", "model", "model_revision", "model_shape",
                                    "windows")}
    assert set(basis["windows"]) == {"general", "medical"}
    assert up_to_date(lake, model, key, basis)["rows"] == lake.table(
        "wiring", model, key).select(pl.len()).collect().item()
    changed = [{**basis, "params": {**basis["params"], "k": 3}},
               {**basis, "model_revision": "gguf-sha256:0"},
               {**basis, "model_revision": "local"},
               {**basis, "windows": {**basis["windows"], "general": "another"}}]
    assert all(up_to_date(lake, model, key, b) is None for b in changed)
    assert up_to_date(lake, model, "static", basis) is None
