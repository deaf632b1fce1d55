"""The one place tests build lakes and graph tables from (no dicts pasted across files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from circuit_atlas.lake import Lake, graph_id, params_hash, prompt_id

MODEL = "test-org/tiny-llama"
N_LAYERS = 4
PARAMS = {"max_logits": 10, "candidates": 50}
SHAPE = {"n_layers": N_LAYERS, "n_neurons": 2000, "d_model": 16, "vocab_size": 1000}


def graph_tables(
    rng: np.random.Generator, prompts: list[str], model: str = MODEL,
    params: dict = PARAMS, max_nodes: int = 30, max_edges: int = 80, neurons: int = 2000,
) -> dict[str, pa.Table]:
    """Random but schema-valid graphs/nodes/edges tables for ``prompts``."""
    ph = params_hash(params)
    graphs, nodes, edges = [], [], []
    for text in prompts:
        pid = prompt_id(text)
        gid = graph_id(model, pid, ph)
        n_tok = int(rng.integers(1, 12))
        graphs.append({
            "graph_id": gid, "prompt_id": pid, "n_tokens": n_tok,
            "input_tokens": rng.integers(0, 1000, n_tok).tolist(),
            "target_tokens": rng.integers(0, 1000, 3).tolist(),
            "target_probs": rng.random(3).astype(np.float32).tolist(),
            "params_hash": ph,
        })
        n_nodes = int(rng.integers(0, max_nodes))
        nodes.append({
            "graph_id": np.full(n_nodes, gid, np.int64),
            "layer": rng.integers(-1, N_LAYERS + 1, n_nodes).astype(np.int16),
            "neuron": rng.integers(-1, neurons, n_nodes).astype(np.int32),
            "position": rng.integers(0, n_tok, n_nodes).astype(np.int32),
            "activation": rng.normal(size=n_nodes).astype(np.float32),
            "score": rng.normal(size=n_nodes).astype(np.float32),
            "influence": rng.random(n_nodes).astype(np.float32),
        })
        n_edges = int(rng.integers(0, max_edges))
        edges.append({
            "graph_id": np.full(n_edges, gid, np.int64),
            "src_layer": rng.integers(-1, N_LAYERS, n_edges).astype(np.int16),
            "src_neuron": rng.integers(-1, neurons, n_edges).astype(np.int32),
            "src_pos": rng.integers(0, n_tok, n_edges).astype(np.int32),
            "tgt_layer": rng.integers(0, N_LAYERS + 1, n_edges).astype(np.int16),
            "tgt_neuron": rng.integers(0, neurons, n_edges).astype(np.int32),
            "tgt_pos": rng.integers(0, n_tok, n_edges).astype(np.int32),
            "weight": rng.normal(size=n_edges).astype(np.float32),
        })

    def stack(parts: list[dict]) -> dict:
        keys = parts[0].keys() if parts else []
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    from circuit_atlas.lake import GRAPH_EDGES, GRAPH_NODES, GRAPHS
    from circuit_atlas.lake.validate import conform

    return {
        "graphs": conform(pa.Table.from_pylist(graphs, schema=GRAPHS.schema), GRAPHS, "test"),
        "graph_nodes": conform(pa.table(stack(nodes)), GRAPH_NODES, "test") if nodes
        else GRAPH_NODES.schema.empty_table(),
        "graph_edges": conform(pa.table(stack(edges)), GRAPH_EDGES, "test") if edges
        else GRAPH_EDGES.schema.empty_table(),
    }


def write_shard(lake: Lake, corpus: str, prompts: list[str], seed: int = 0,
                model: str = MODEL, params: dict = PARAMS, neurons: int = 2000):
    """Commit one shard of random graphs for ``prompts``; returns (Shard, tables)."""
    tables = graph_tables(np.random.default_rng(seed), prompts, model, params, neurons=neurons)
    with lake.open_shard(model, corpus, params=params, model_revision="r1",
                         model_shape=SHAPE) as shard:
        for name, table in tables.items():
            shard.write(name, table)
    return shard.committed, tables


def commit_twice(lake: Lake, shard) -> None:
    """Commit ``shard``'s graphs a second time, as a second shard: what two racing jobs
    leave on a filesystem that cannot create files exclusively (where the commit
    protocol cannot see the race)."""
    from circuit_atlas.lake import layout
    from circuit_atlas.lake.shards import new_shard_name, shards_log

    name = new_shard_name()
    for table in layout.GRAPH_TABLES:
        dst = lake.path(layout.shard_file(table, shard.model, shard.corpus, name))
        lake.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        lake.fs.copy(shard.file(table), dst)
    import datetime as dt

    record = {k: v for k, v in shard.commit.items() if k != "seq"}
    shards_log(lake, shard.model, shard.corpus).commit(
        {**record, "shard": name, "committed_at": dt.datetime.now(dt.UTC).isoformat()})


def prompts_of(n: int, tag: str = "p") -> list[str]:
    return [f"{tag} prompt number {i}" for i in range(n)]


# what each family's tiny model adds to the common config: sliding windows shorter
# than the test prompts (so a missing window mask shows), per-type rotary tables
FAMILY_CONFIG = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "olmo3": {"sliding_window": 3,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
              "rope_parameters": {
                  "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}},
    # Gemma: a query scale other than 1/sqrt(head_dim), soft-caps small enough to bite
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 3,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 3,
                    "layer_types": ["sliding_attention", "full_attention",
                                    "sliding_attention"],
                    "rope_parameters": {
                        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}},
}


def tiny_llama(seed: int = 0, dtype=None, n_layers: int = 3, d: int = 32, heads: int = 4,
               kv_heads: int = 2, neurons: int = 48, vocab: int = 64, family: str = "llama",
               **config_extra):
    """A tiny random gated-MLP decoder of ``family`` built in memory (no download).

    Norm weights and biases are randomised too, so a bug that ignores them cannot hide.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {**FAMILY_CONFIG.get(family, {}), **config_extra}
    if "layer_types" in extra and n_layers != 3:
        extra["layer_types"] = ["sliding_attention"] * n_layers
    config = AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=d, intermediate_size=neurons,
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6, **extra)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).to(dtype or torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if "embed" in name else 0.15)
    return model.eval().requires_grad_(False)


def planted_edges(rng: np.random.Generator, modules: int = 6, size: int = 30,
                  p_in: float = 0.3, p_out: float = 0.005, n_layers: int = N_LAYERS,
                  sub_modules: int = 1, p_sub: float = 0.6):
    """An edges table (EDGE_STATS columns) of a layered directed block model: links only
    from a lower layer to a higher one, dense inside modules (denser still inside
    ``sub_modules`` per module), sparse between. Returns (table, module, sub_module)
    with the planted labels per neuron index."""
    import polars as pl

    n = modules * size
    module = np.repeat(np.arange(modules), size)
    sub = np.tile(np.repeat(np.arange(sub_modules), -(-size // sub_modules))[:size], modules)
    layer = rng.integers(0, n_layers, n)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    same = module[a] == module[b]
    p = np.where(same, np.where(sub[a] == sub[b], p_sub, p_in) if sub_modules > 1 else p_in,
                 p_out)
    s, t = np.nonzero((rng.random((n, n)) < p) & (layer[a] < layer[b]))
    count = rng.integers(5, 40, len(s))
    mean_abs = rng.uniform(0.05, 0.2, len(s))
    sign = np.where(rng.random(len(s)) < 0.8, 1.0, -1.0)
    table = pl.DataFrame({
        "src_layer": layer[s].astype(np.int16), "src_neuron": s.astype(np.int32),
        "tgt_layer": layer[t].astype(np.int16), "tgt_neuron": t.astype(np.int32),
        "count": count, "graph_count": count,
        "weight_sum": sign * mean_abs * count, "weight_abs_sum": mean_abs * count,
        "weight_sq_sum": mean_abs ** 2 * count,
        "weight_min": (sign * mean_abs).astype(np.float32),
        "weight_max": (sign * mean_abs).astype(np.float32),
        "mean_weight": sign * mean_abs, "mean_abs_weight": mean_abs,
    })
    return table, module, sub


def write_edge_table(lake: Lake, table, model: str = MODEL, corpus: str = "c",
                     n_layers: int | None = N_LAYERS) -> None:
    """Publish ``table`` (a polars frame with EDGE_STATS columns) as the edges table, as
    a reduce would (manifest with the model shape)."""
    from circuit_atlas.lake.schemas import EDGE_STATS

    version = lake.new_table_version(model, corpus, "edges")
    name = version.write("src_layer-all.parquet", table.to_arrow(), EDGE_STATS)
    shape = {**SHAPE, "n_layers": n_layers} if n_layers is not None else None
    version.publish([name], {"shards": [], "params": {}, "state": [], "model": model,
                             "model_shape": shape})


WORDS = [f"w{i}" for i in range(63)]


def tiny_model_dir(path, seed: int = 0, plant=None, extra_words: tuple[str, ...] = (),
                   **kwargs) -> str:
    """A tiny random llama saved as a model folder with a real word-level tokenizer
    (one token per word of :data:`WORDS` and ``extra_words``, "[UNK]" for the rest),
    loadable by name like any local model (by Dask workers too); ``plant`` may edit its
    weights first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate((*WORDS, *extra_words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = tiny_llama(seed=seed, vocab=len(vocab), **kwargs)
    if plant is not None:
        plant(model)
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)
