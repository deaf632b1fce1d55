"""The graph job: every prompt of a corpus to a pruned RelP graph, committed in shards.

A rerun with the same (model, corpus, parameters) skips the prompts whose graphs
are committed, so a killed job simply resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from circuit_atlas.compute.attribution import AttributionParams, RawGraph, attribute_batch
from circuit_atlas.compute.models import LoadedModel, ModelRef
from circuit_atlas.compute.params import MAX_TOKENS, PROMPT_BATCH, GraphsParams
from circuit_atlas.compute.prune import node_influence, prune
from circuit_atlas.lake import GRAPH_EDGES, GRAPH_NODES, GRAPHS, Lake, graph_id, params_hash
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake


def run_params(model: LoadedModel | ModelRef, params: AttributionParams, max_tokens: int
               ) -> dict:
    """Everything that decides a graph's content: hashed into its identity."""
    return {**params.to_dict(), "max_tokens": max_tokens, "dtype": model.dtype_name,
            "model_revision": model.revision}


def graph_tables(raw: RawGraph, gid: int, pid: str, phash: str, prune_graph: bool,
                 node_threshold: float, edge_threshold: float) -> dict[str, pa.Table]:
    """The lake rows of one graph: its graphs row, its nodes and its nonzero edges."""
    if prune_graph:
        keep, edge_mask, inf = prune(raw, node_threshold, edge_threshold)
    else:
        inf = node_influence(raw)
        keep, edge_mask = np.ones(raw.n_nodes, bool), raw.adjacency != 0
    tgt, src = np.nonzero(edge_mask & (raw.adjacency != 0))
    nodes = np.flatnonzero(keep)
    return {
        "graphs": pa.table({
            "graph_id": [gid], "prompt_id": [pid], "n_tokens": [len(raw.tokens)],
            "input_tokens": [raw.tokens.tolist()],
            "target_tokens": [raw.targets.tokens.tolist()],
            "target_probs": [raw.targets.probs.astype(np.float32).tolist()],
            "params_hash": [phash],
        }, schema=GRAPHS.schema),
        "graph_nodes": pa.table({
            "graph_id": np.full(len(nodes), gid, np.int64),
            "layer": raw.layer[nodes].astype(np.int16),
            "neuron": raw.index[nodes].astype(np.int32),
            "position": raw.position[nodes].astype(np.int32),
            "activation": raw.activation[nodes].astype(np.float32),
            "score": raw.relevance[nodes].astype(np.float32),
            "influence": inf[nodes].astype(np.float32),
        }, schema=GRAPH_NODES.schema),
        "graph_edges": pa.table({
            "graph_id": np.full(len(src), gid, np.int64),
            "src_layer": raw.layer[src].astype(np.int16),
            "src_neuron": raw.index[src].astype(np.int32),
            "src_pos": raw.position[src].astype(np.int32),
            "tgt_layer": raw.layer[tgt].astype(np.int16),
            "tgt_neuron": raw.index[tgt].astype(np.int32),
            "tgt_pos": raw.position[tgt].astype(np.int32),
            "weight": raw.adjacency[tgt, src].astype(np.float32),
        }, schema=GRAPH_EDGES.schema),
    }


def tokenize(model: LoadedModel, text: str, max_tokens: int) -> torch.Tensor:
    ids = model.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    return ids.to(model.adapter.device)


def commit_shard(lake: Lake, model: LoadedModel, corpus: str, prompts: list[tuple[str, str]],
                 params: AttributionParams, max_tokens: int = MAX_TOKENS, batch_rows: int = 256,
                 on_graph: Callable[[int, int], None] | None = None, total: int = 0,
                 prompt_batch: int = PROMPT_BATCH) -> int:
    """Compute the graphs of ``prompts`` (id, text) and commit them as one shard.

    Prompts of similar length go through phases 1-3 together, ``prompt_batch`` at a
    time (sorted by length, so little is padding)."""
    rp = run_params(model, params, max_tokens)
    phash = params_hash(rp)
    encoded = sorted(((pid, tokenize(model, text, max_tokens)) for pid, text in prompts),
                     key=lambda p: p[1].shape[1])
    with lake.open_shard(model.name, corpus, params=rp, model_revision=model.revision,
                         model_shape=model.shape) as shard:
        step = max(1, prompt_batch)
        for start in range(0, len(encoded), step):
            group = encoded[start:start + step]
            raws = attribute_batch(model.adapter, [ids for _, ids in group], params, batch_rows)
            for (pid, _), raw in zip(group, raws, strict=True):
                tables = graph_tables(raw, graph_id(model.name, pid, phash), pid, phash,
                                      params.prune, params.node_threshold,
                                      params.edge_threshold)
                for name, table in tables.items():
                    shard.write(name, table)
                if on_graph:
                    on_graph(1, total)
    return len(prompts)


def shard_task(lake: Lake, model_spec: str, device: str, dtype: str, corpus: str,
               prompts: list[tuple[str, str]], params: AttributionParams, max_tokens: int,
               batch_rows: int, prompt_batch: int = PROMPT_BATCH) -> int:
    """A Dask task: one shard of graphs; the model is loaded once per worker process."""
    from circuit_atlas.compute.workers import worker_model

    model = worker_model(model_spec, device, dtype)
    # a retried task (its worker died after the commit, before Dask heard of it) must
    # not commit the same graphs twice
    done = lake.committed_prompt_ids(model.name, corpus,
                                     params_hash(run_params(model, params, max_tokens)))
    todo = [(pid, text) for pid, text in prompts if pid not in done]
    if todo:
        commit_shard(lake, model, corpus, todo, params, max_tokens, batch_rows,
                     prompt_batch=prompt_batch)
    return len(prompts)


@dataclass
class GraphRunReport(Report):
    model: str
    corpus: str
    params_hash: str
    computed: int
    skipped: int
    shards: int
    seconds: float
    dtype: str = ""

    def __str__(self) -> str:
        return (f"graphs {self.corpus}: {self.computed} computed, {self.skipped} already "
                f"committed, {self.shards} shard(s), {self.seconds:.1f} s (model "
                f"{self.model}, {self.dtype}, params {self.params_hash})")


@dataclass
class GraphsReport(Report):
    runs: list[GraphRunReport]

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.runs)

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.runs)


def run_graphs(lake: Lake | str, *, model: str | LoadedModel, corpora: str | list[str],
               params: GraphsParams | None = None, cluster=None,
               progress: Progress | None = None) -> GraphsReport:
    """Compute and commit the RelP attribution graphs of every prompt of ``corpora``
    not yet in the lake (a killed run resumes where it stopped).

    ``model``: a name (loaded here, or by each Dask worker) or a loaded model.
    ``cluster``: None or 'none' computes in this process; 'local', 'slurm', an
    address or a Client run one task per shard (with ``device='cuda'`` on SLURM the
    jobs ask for a GPU each).
    """
    from circuit_atlas.compute.workers import compute_session

    lake, params = open_lake(lake), params or GraphsParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    for corpus in corpora:
        lake.check_corpus(corpus)
    with compute_session(model, params.device, params.dtype, "graphs", cluster,
                         progress) as (client, ready):
        runs = []
        for corpus in corpora:
            done = 0

            def tick(n: int, total: int, corpus=corpus) -> None:
                nonlocal done
                done += n
                progress.update(f"graphs {corpus}", done, total)

            report = graph_job(lake, ready, corpus, params.attribution(),
                               shard_size=params.shard_size, limit=params.limit,
                               max_tokens=params.max_tokens, batch_rows=params.batch_rows,
                               on_graph=tick, client=client,
                               model_spec=model if isinstance(model, str) else None,
                               prompt_batch=params.prompt_batch)
            report.dtype = ready.dtype_name
            runs.append(report)
    return GraphsReport(runs)


def graph_job(
    lake: Lake, model: LoadedModel | ModelRef, corpus: str, params: AttributionParams,
    shard_size: int = 32, limit: int | None = None, max_tokens: int = MAX_TOKENS,
    batch_rows: int = 256, on_graph: Callable[[int, int], None] | None = None,
    client=None, model_spec: str | None = None, prompt_batch: int = PROMPT_BATCH,
) -> GraphRunReport:
    """Compute and commit the graphs of ``corpus`` not yet in the lake.

    In this process by default (``model`` loaded); with a Dask ``client``, one task per
    shard: the workers load the model themselves (``model`` may then be a
    :class:`ModelRef`, nothing loaded here), and on a GPU device the tasks ask for a
    ``GPU`` worker resource, so a mixed cluster never runs them on a CPU worker.
    ``on_graph(done, total)`` is called after each graph (for progress bars).
    """
    lake.check_corpus(corpus)
    phash = params_hash(run_params(model, params, max_tokens))
    prompts = (lake.scan("prompts", corpus=corpus).select("prompt_id", "text")
               .sort("prompt_id").collect().rows())
    if limit is not None:
        prompts = prompts[:limit]
    done = lake.committed_prompt_ids(model.name, corpus, phash)
    todo = [(pid, text) for pid, text in prompts if pid not in done]
    groups = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
    t0 = time.perf_counter()
    if client is None:
        if not isinstance(model, LoadedModel):
            raise TypeError("graphs in this process need a loaded model (load_model)")
        for group in groups:
            commit_shard(lake, model, corpus, group, params, max_tokens, batch_rows, on_graph,
                         len(todo), prompt_batch)
    else:
        from distributed import as_completed

        device, dtype = model.device, model.dtype_name
        from circuit_atlas.compute.workers import worker_resources

        resources = worker_resources(client, device) if todo else None
        spec = model_spec or getattr(model, "spec", None) or model.name
        futures = [client.submit(shard_task, lake, spec, device, dtype,
                                 corpus, group, params, max_tokens, batch_rows, prompt_batch,
                                 resources=resources, pure=False) for group in groups]
        for future in as_completed(futures):
            if on_graph:
                on_graph(future.result(), len(todo))
    return GraphRunReport(model.name, corpus, phash, len(todo), len(prompts) - len(todo),
                          len(groups), time.perf_counter() - t0)
