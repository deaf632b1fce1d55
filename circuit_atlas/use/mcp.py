"""The atlas for agents: a Model Context Protocol server over one lake (read-only but
for the graphs ``trace`` stores).

Built on the official ``mcp`` Python SDK (stdio, or streamable HTTP). Its tools are
:class:`AtlasTools` methods, callable from Python too, each answering with the rows it
read and ``source``: the tables it came from, their published versions and the keys
it read (so an agent's claim can be traced to a version of a table):

- ``sql``: read-only SQL (polars) over every table, rows and seconds capped;
- ``profile``: everything the lake holds about one neuron (``circuit-atlas profile``);
- ``search_labels``: current labels by substring or regular expression;
- ``neighbours``: a neuron's strongest upstream or downstream edges, with labels;
- ``cluster``: a module's summary and members, with labels;
- ``exemplars``: a neuron's top and bottom contexts, activating tokens marked;
- with an intervention budget (``--interventions N``), ``activations`` (a neuron's
  activation at every token of new prompts), ``trace`` (a new prompt's graph grouped
  into supernodes by the atlas's clusters; stored in the traces corpus),
  ``intervene`` (ablate or boost a
  neuron or module on a new prompt: what happens to the next token) and ``steer``
  (generation with it held), on the model itself, N calls in all.

The resource ``atlas://tables`` lists every table with its columns and row count.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from typing import Any

import polars as pl

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake
from circuit_atlas.lake.neurons import NodeNames, neuron_label, parse_neuron

MAX_ROWS = 200  # rows an answer holds at most
SQL_SECONDS = 30.0


def _jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, other types as strings)."""
    return json.loads(json.dumps(value, default=str))


class AtlasTools:
    """The questions an agent may ask of one atlas (model and corpus set) of a lake."""

    def __init__(self, lake: Lake | str, model: str | None = None, corpus: str | None = None,
                 tokenizer: Any = None, max_rows: int = MAX_ROWS,
                 sql_seconds: float = SQL_SECONDS, interventions: int = 0,
                 model_spec: str | None = None, embeddings: Any = None,
                 loaded: Any = None) -> None:
        self.lake = lake if isinstance(lake, Lake) else Lake(lake)
        models = self.lake.models() if model is None else [model]
        if len(models) != 1:
            raise CircuitAtlasError(f"the lake holds {len(models)} models "
                                    f"({', '.join(models) or 'none'}); say which with --model")
        self.model = models[0]
        self.corpus = self.lake.reduced_corpus(self.model, corpus)
        self.tokenizer, self.max_rows, self.sql_seconds = tokenizer, max_rows, sql_seconds
        manifest = self.lake.table_manifest(self.model, self.corpus, "neurons") or {}
        self.n_layers = ((manifest.get("inputs") or {}).get("model_shape") or {}).get("n_layers")
        self.budget = interventions  # intervene and steer calls left
        self.model_spec = model_spec or (manifest.get("inputs") or {}).get("model")
        self._loaded = loaded  # a LoadedModel the caller has already (else loaded on use)
        if loaded is not None and self.tokenizer is None:
            self.tokenizer = loaded.tokenizer
        self.embeddings = embeddings  # labeling.client.EmbeddingSettings: semantic search
        self._vectors: dict[str, Any] = {}  # label text -> its embedding

    @property
    def names(self) -> NodeNames:
        return NodeNames(self.tokenizer, self.n_layers)

    # provenance ------------------------------------------------------------------------

    def _version(self, table: str, corpus: str | None = None) -> str | None:
        m = self.lake.table_manifest(self.model, corpus or self.corpus, table)
        return None if m is None else m.get("version")

    def _source(self, table: str, corpus: str | None = None, **keys: Any) -> dict[str, Any]:
        """A citation: the table (of the atlas's corpus set, or of one ``corpus``), its
        published version, the keys read."""
        corpus = corpus or self.corpus
        return {"table": table, "model": self.model, "corpus": corpus,
                "version": self._version(table, corpus), "keys": keys}

    def _labels(self) -> pl.DataFrame | None:
        from circuit_atlas.lake.labels import current_labels

        return current_labels(self.lake, self.model, self.corpus)

    def _label_of(self) -> dict[tuple[int, int], str]:
        labels = self._labels()
        if labels is None:
            return {}
        return {(r[0], r[1]): r[2] for r in labels.select("layer", "neuron", "label").iter_rows()}

    # tools -----------------------------------------------------------------------------

    def tables(self) -> dict[str, Any]:
        """Every table with its columns and row count."""
        from circuit_atlas.lake.query import frames

        rows = []
        for name, lf in frames(self.lake).items():
            schema = lf.collect_schema()
            rows.append({"table": name, "rows": lf.select(pl.len()).collect().item(),
                         "columns": {c: str(t) for c, t in schema.items()}})
        return {"tables": rows}

    def sql(self, query: str, limit: int = 50) -> dict[str, Any]:
        """Run a read-only SQL query (polars SQL) over every table of the lake."""
        from circuit_atlas.lake.query import frames

        if not re.match(r"\s*(select|with)\b", query, flags=re.I):
            raise CircuitAtlasError("only SELECT (or WITH ... SELECT) queries are allowed")
        limit = max(1, min(int(limit), self.max_rows))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            df = pool.submit(self.lake.sql, query).result(timeout=self.sql_seconds)
        except concurrent.futures.TimeoutError:
            raise CircuitAtlasError(f"the query ran past {self.sql_seconds:g} s; narrow it "
                                    "(a WHERE on layer, a LIMIT)") from None
        finally:
            pool.shutdown(wait=False)
        used = [t for t in frames(self.lake) if re.search(rf"\b{re.escape(t)}\b", query)]
        return {"columns": df.columns, "rows": _jsonable(df.head(limit).rows()),
                "row_count": df.height, "truncated": df.height > limit,
                "source": [self._source(t) for t in used]}

    def profile(self, neuron: str, top: int = 10) -> dict[str, Any]:
        """Everything the lake holds about one neuron (L12/N345)."""
        from circuit_atlas.analysis.profile import neuron_profile

        layer, index = parse_neuron(neuron)
        found = neuron_profile(self.lake, self.model, layer, index, self.corpus,
                               min(top, self.max_rows), self.tokenizer)
        sections = ("neurons", "edges", "neuron_tokens", "cooccurrence", "neuron_effects",
                    "roles", "specificity", "neuron_causal", "cluster_assignments", "labels")
        return {**_jsonable(found), "source": [
            self._source(t, layer=layer, neuron=index) for t in sections
            if self._version(t) is not None]}

    def search_labels(self, text: str, regex: bool = False, limit: int = 20,
                      semantic: bool = False) -> dict[str, Any]:
        """Neurons whose current label or description matches ``text``: a substring
        (case-insensitive), a regular expression (``regex``), or with ``semantic`` the
        labels nearest in meaning (cosine similarity of embeddings; the server needs an
        embedding endpoint)."""
        labels = self._labels()
        if labels is None:
            raise CircuitAtlasError("no labels in this atlas yet (circuit-atlas label)")
        limit = max(1, min(int(limit), self.max_rows))
        if semantic:
            rows, similarity = self._nearest(labels, text, limit)
        else:
            pattern = text if regex else re.escape(text)
            try:
                hit = (pl.col("label").str.contains(f"(?i){pattern}")
                       | pl.col("description").fill_null("").str.contains(f"(?i){pattern}"))
                rows = labels.filter(hit).sort("layer", "neuron")
            except pl.exceptions.ComputeError as e:
                raise CircuitAtlasError(f"bad regular expression {text!r}: {e}") from None
            similarity = None
        out = [{"neuron": neuron_label(r["layer"], r["neuron"]), **{
            k: r[k] for k in ("pass", "label", "description") if k in r}}
            for r in rows.head(limit).iter_rows(named=True)]
        if similarity is not None:
            for o, sim in zip(out, similarity, strict=False):
                o["similarity"] = round(float(sim), 4)
        source = [self._source("labels", text=text, regex=regex, semantic=semantic)]
        if semantic:
            source.append({"table": None, "computed": "embeddings",
                           "model": self.embeddings.model})
        return {"matches": _jsonable(out), "count": rows.height if not semantic else len(out),
                "source": source}

    @staticmethod
    def label_text(label: str, description: str | None) -> str:
        return label if not description else f"{label}: {description}"

    def _nearest(self, labels: pl.DataFrame, text: str, limit: int
                 ) -> tuple[pl.DataFrame, list[float]]:
        """The ``limit`` labels nearest ``text`` in meaning, with their similarity (the
        labels' embeddings asked once per server, then kept)."""
        import numpy as np

        if self.embeddings is None:
            raise CircuitAtlasError("semantic search needs an embedding endpoint: start the "
                                    "server with --embedding-model (and --embedding-base-url)")
        docs = [self.label_text(a, b) for a, b in
                labels.select("label", "description").iter_rows()]
        missing = sorted({d for d in docs if d not in self._vectors})
        if missing:
            self._vectors.update(zip(missing, self.embeddings.embed(missing), strict=True))
        query = self.embeddings.embed([text])[0]
        sims = np.array([self._vectors[d] @ query for d in docs])
        order = np.lexsort((np.arange(len(docs)), -sims))[:limit]
        return labels[order.tolist()], sims[order].tolist()

    def neighbours(self, neuron: str, direction: str = "downstream", top: int = 10
                   ) -> dict[str, Any]:
        """A neuron's strongest edges (by summed |weight|) upstream or downstream, each
        other end with its label."""
        if direction not in ("upstream", "downstream"):
            raise CircuitAtlasError("direction: upstream or downstream")
        layer, index = parse_neuron(neuron)
        mine, other = ("tgt", "src") if direction == "upstream" else ("src", "tgt")
        rows = (self.lake.table("edges", self.model, self.corpus)
                .filter((pl.col(f"{mine}_layer") == layer) & (pl.col(f"{mine}_neuron") == index))
                .sort("weight_abs_sum", descending=True)
                .head(max(1, min(int(top), self.max_rows))).collect())
        labels = self._label_of()
        out = [{"node": self.names.node(r[f"{other}_layer"], r[f"{other}_neuron"]),
                "label": labels.get((r[f"{other}_layer"], r[f"{other}_neuron"])),
                **{k: r[k] for k in ("count", "graph_count", "mean_weight", "weight_abs_sum")}}
               for r in rows.iter_rows(named=True)]
        return {"neuron": neuron_label(layer, index), "direction": direction,
                "edges": _jsonable(out),
                "source": [self._source("edges", **{f"{mine}_layer": layer,
                                                    f"{mine}_neuron": index})]}

    def cluster(self, path: str, method: str = "infomap", top: int = 50) -> dict[str, Any]:
        """A module's summary (size, layers, flow) and its members by flow, with labels."""
        summary = (self.lake.table("clusters", self.model, self.corpus)
                   .filter((pl.col("method") == method) & (pl.col("cluster_path") == path))
                   .drop("model", "corpus").collect())
        if summary.is_empty():
            raise CircuitAtlasError(f"no module {path!r} in the {method} clustering")
        members = (self.lake.table("cluster_assignments", self.model, self.corpus)
                   .filter((pl.col("method") == method)
                           & ((pl.col("cluster_path") == path)
                              | pl.col("cluster_path").str.starts_with(path + ":")))
                   .sort("flow", descending=True).collect())
        labels = self._label_of()
        shown = [{"neuron": neuron_label(r["layer"], r["neuron"]),
                  "cluster_path": r["cluster_path"], "flow": r["flow"],
                  "label": labels.get((r["layer"], r["neuron"]))}
                 for r in members.head(max(1, min(int(top), self.max_rows))).iter_rows(
                     named=True)]
        return {"module": _jsonable(summary.row(0, named=True)), "members": _jsonable(shown),
                "member_count": members.height,
                "source": [self._source("clusters", method=method, cluster_path=path),
                           self._source("cluster_assignments", method=method,
                                        cluster_path=path)]}

    def exemplars(self, neuron: str, top: int = 5) -> dict[str, Any]:
        """A neuron's top and bottom contexts (<<marked>> where it fires)."""
        from circuit_atlas.analysis.exemplars import corpora_of, neuron_exemplars

        layer, index = parse_neuron(neuron)
        found = neuron_exemplars(self.lake, self.model, self.corpus, layer, index,
                                 max(1, min(int(top), self.max_rows)), self.tokenizer)
        if found is None:
            raise CircuitAtlasError("no exemplars yet (circuit-atlas activations)")
        versions = [self._source("exemplars", c, layer=layer, neuron=index)
                    for c in corpora_of(self.corpus)]
        return {"neuron": neuron_label(layer, index), **_jsonable(found), "source": versions}


    # interventions on the model (a budget of calls) --------------------------------------

    def _spend(self) -> Any:
        """The loaded model (float32, loaded on first use), one call of the budget spent."""
        if self.budget <= 0:
            raise CircuitAtlasError("no intervention budget left (the server was started "
                                    "with --interventions N: N calls in all)")
        self.budget -= 1
        if self._loaded is None:
            from circuit_atlas.compute.models import load_model

            self._loaded = load_model(self.model_spec, dtype="float32", stage="interventions")
        return self._loaded

    def activations(self, neuron: str, prompts: list[str]) -> dict[str, Any]:
        """Run new prompts (up to 8) through the model and read one neuron's (L12/N345)
        activation at every token: each prompt's tokens with their activations, the
        highest and where (after the first ``skip`` tokens, which the corpus statistics
        leave out too: the attention sink); beside them the neuron's largest activation
        over the corpus, for scale. Spends one call of the intervention budget."""
        import torch

        from circuit_atlas.analysis.exemplars import activation_stats
        from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize
        from circuit_atlas.compute.trace import forward

        layer, index = parse_neuron(neuron)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or len(texts) > 8 or not all(isinstance(t, str) and t for t in texts):
            raise CircuitAtlasError("prompts: a list of 1 to 8 non-empty texts")
        stats = activation_stats(self.lake, self.model, self.corpus, layer, index)
        skip = 1  # the activations stage's default
        if stats:
            m = self.lake.table_manifest(self.model, stats[0]["corpus"], "activation_stats")
            skip = int(((m or {}).get("inputs") or {}).get("params", {}).get("skip_first", 1))
        model = self._spend()
        if not 0 <= layer < len(model.adapter.blocks) or not (
                0 <= index < model.adapter.n_neurons):
            self.budget += 1  # nothing ran
            raise CircuitAtlasError(f"no neuron {neuron_label(layer, index)} in this model")
        text = model.tokenizer.decode
        out = []
        with torch.no_grad():
            for t in texts:
                tokens = tokenize(model, t, MAX_TOKENS)
                acts = forward(model.adapter, tokens).act[layer][0, :, index].double().tolist()
                at = max(range(min(skip, len(acts) - 1), len(acts)), key=acts.__getitem__)
                out.append({"prompt": t, "max": round(acts[at], 4),
                            "max_token": text([int(tokens[0, at])]), "max_position": at,
                            "tokens": [[text([int(i)]), round(a, 4)]
                                       for i, a in zip(tokens[0].tolist(), acts, strict=True)]})
        return {"neuron": neuron_label(layer, index), "results": out, "skip": skip,
                "corpus_max": max((s["max"] for s in stats), default=None),
                "budget_left": self.budget,
                "source": [{"table": None, "computed": "a forward pass of the model",
                            "model": self.model_spec},
                           *[self._source("activation_stats", s["corpus"], layer=layer,
                                          neuron=index) for s in stats]]}

    def trace(self, prompt: str, level: int = 1, method: str = "infomap") -> dict[str, Any]:
        """The attribution graph of a new prompt, its neurons grouped into supernodes by
        the atlas's cluster modules at ``level`` (named by their labels): each
        supernode with its members, the strongest neurons outside them, the logits,
        and how much of the graph's influence and link weight the grouping keeps. The
        graph is stored in the lake's traces corpus (a second trace reads it back) and
        written as circuit-tracer graph JSON and an HTML view. Spends one call of the
        intervention budget."""
        import os
        import tempfile

        from circuit_atlas.use.params import TraceParams
        from circuit_atlas.use.supernodes import neuron_of, run_trace, ungrouped_neurons

        if method not in ("infomap", "leiden"):
            raise CircuitAtlasError("method: infomap or leiden")
        model = self._spend()
        folder = tempfile.mkdtemp(prefix="circuit-atlas-trace-")
        report = run_trace(self.lake, model=model, prompt=prompt, corpora=self.corpus,
                           params=TraceParams(level=int(level), method=method,
                                              out=os.path.join(folder, "trace.json")))
        with open(report.out, encoding="utf-8") as f:
            graph = json.load(f)
        labels = self._label_of()
        by_id = {n["node_id"]: n for n in graph["nodes"]}
        g = report.grouping

        def member(node_id: str) -> dict[str, Any]:
            n = by_id[node_id]
            return {"node": n["clerp"], "position": n["ctx_idx"],
                    "influence": n.get("influence"), "label": labels.get(neuron_of(n))}
        return {"prompt": prompt, "prompt_id": report.prompt_id,
                "tokens": graph["metadata"]["prompt_tokens"],
                "logits": [{"token": n["clerp"], "prob": n.get("token_prob")}
                           for n in graph["nodes"] if n["feature_type"] == "logit"],
                "supernodes": [{"name": s[0], "module": g.modules[s[0]],
                                "members": [member(i) for i in s[1:]][:self.max_rows]}
                               for s in g.supernodes],
                "outside": [member(n["node_id"]) for n in ungrouped_neurons(graph, g)[:10]],
                "coverage": g.coverage, "links_kept": g.links_kept,
                "nodes": report.nodes, "links": report.links,
                "files": {"graph_json": report.out, "html": report.html},
                "budget_left": self.budget,
                "source": [{"table": "graphs", "model": self.model, "corpus": "traces",
                            "keys": {"prompt_id": report.prompt_id}},
                           self._source("cluster_assignments", method=method),
                           *([self._source("cluster_labels", method=method)]
                             if self._version("cluster_labels") else [])]}

    def _unit(self, unit: str, method: str) -> Any:
        """A neuron (L12/N345), or a module: "infomap:4:2", or a path of ``method``'s
        clustering that cannot be read as a neuron ("4"; "4:2" reads as L4/N2)."""
        from circuit_atlas.lake.units import select_units

        unit = unit.strip()
        chosen, path = method, None
        for m in ("infomap", "leiden"):
            if unit.startswith(m + ":"):
                chosen, path = m, unit[len(m) + 1:]
        if path is None and re.fullmatch(r"L?-?\d+[/:]N?\d+", unit) is None:
            path = unit
        return select_units(self.lake, self.model, self.corpus, self.n_layers,
                            neurons=[] if path else [unit], modules=[path] if path else [],
                            method=chosen)[0]

    def _iv(self, unit: Any, intervention: str, factor: float) -> tuple[Any, Any, list]:
        from circuit_atlas.analysis.exemplars import corpora_of
        from circuit_atlas.compute.battery import Intervention, activation_values

        kinds = {"zero": Intervention("zero"), "mean": Intervention("mean"),
                 "boost": Intervention("boost", factor=float(factor))}
        if intervention not in kinds:
            raise CircuitAtlasError("intervention: zero, mean or boost")
        iv = kinds[intervention]
        values, cited = None, []
        if iv.needs_stats:
            values = activation_values(self.lake, self.model, corpora_of(self.corpus), [unit])
            cited = [self._source("activation_stats", c, unit=unit.name)
                     for c in corpora_of(self.corpus)]
        return iv, values, cited

    def intervene(self, unit: str, prompt: str, intervention: str = "zero",
                  factor: float = 4.0, method: str = "infomap") -> dict[str, Any]:
        """Ablate (zero, or mean over the corpus) or boost (x factor) a neuron (L12/N345)
        or a module (infomap:4:2) at every position of a new prompt, and say what happens to the
        next token: the clean top prediction's probability, the new top token, KL, the
        tokens raised and lowered most. Spends one call of the intervention budget."""
        from circuit_atlas.compute.battery import prompt_battery
        from circuit_atlas.compute.graphs import MAX_TOKENS, tokenize

        u = self._unit(unit, method)
        iv, values, cited = self._iv(u, intervention, factor)
        model = self._spend()
        tokens = tokenize(model, prompt, MAX_TOKENS)
        cols, _ = prompt_battery(model.adapter, tokens, [u], [iv], values)
        text = model.tokenizer.decode
        moved = [(text([int(t)]), round(float(d), 4))
                 for t, d in zip(cols["moved_tokens"][0], cols["moved_deltas"][0],
                                 strict=True)]
        return {"unit": u.name, "members": u.size, "intervention": str(iv), "prompt": prompt,
                "target": text([int(cols["target_token"][0])]),
                "prob_clean": float(cols["prob_clean"][0]),
                "prob_delta": float(cols["prob_delta"][0]),
                "top1_flip": bool(cols["top1_flip"][0]),
                "top1": text([int(cols["top1_token"][0])]), "kl": float(cols["kl"][0]),
                "raised": moved[:5], "lowered": moved[5:],
                "budget_left": self.budget,
                "source": [{"table": None, "computed": "a forward pass of the model",
                            "model": self.model_spec}, *cited]}

    def steer(self, unit: str, prompt: str, intervention: str = "boost", factor: float = 4.0,
              max_new_tokens: int = 16, method: str = "infomap") -> dict[str, Any]:
        """Generate greedily from a new prompt with a neuron or module held under an
        intervention (zero, mean, or boost x factor) at every step, beside the clean
        continuation. Spends one call of the intervention budget."""
        from circuit_atlas.compute.steer import steer

        u = self._unit(unit, method)
        iv, values, cited = self._iv(u, intervention, factor)
        model = self._spend()
        out = steer(model, prompt, u, iv, values, max(1, min(int(max_new_tokens), 64)))
        return {**out.to_dict(), "budget_left": self.budget,
                "source": [{"table": None, "computed": "greedy generation with the model",
                            "model": self.model_spec}, *cited]}


TOOLS = ("sql", "profile", "search_labels", "neighbours", "cluster", "exemplars")
CAUSAL_TOOLS = ("activations", "intervene", "steer", "trace")


def build_server(tools: AtlasTools) -> Any:
    """The MCP server: each of :data:`TOOLS` as a tool answering JSON text (a refused
    question answers its one-line reason as a tool error), and the tables resource."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    app = MCPServer("circuit-atlas", instructions=(
        f"A circuit atlas of {tools.model}'s MLP neurons ({tools.corpus}). Neurons are "
        "named L<layer>/N<index>. Start with the atlas://tables resource or search_labels; "
        "every answer cites the tables and versions it read."))

    def answer(question: Any, *args: Any) -> str:
        try:
            return json.dumps(question(*args), ensure_ascii=False)
        except CircuitAtlasError as e:  # the reason, to the agent, as a tool error
            raise ToolError(str(e)) from None

    @app.tool(description=AtlasTools.sql.__doc__)
    def sql(query: str, limit: int = 50) -> str:
        return answer(tools.sql, query, limit)

    @app.tool(description=AtlasTools.profile.__doc__)
    def profile(neuron: str, top: int = 10) -> str:
        return answer(tools.profile, neuron, top)

    @app.tool(description=AtlasTools.search_labels.__doc__)
    def search_labels(text: str, regex: bool = False, limit: int = 20,
                      semantic: bool = False) -> str:
        return answer(tools.search_labels, text, regex, limit, semantic)

    @app.tool(description=AtlasTools.neighbours.__doc__)
    def neighbours(neuron: str, direction: str = "downstream", top: int = 10) -> str:
        return answer(tools.neighbours, neuron, direction, top)

    @app.tool(description=AtlasTools.cluster.__doc__)
    def cluster(path: str, method: str = "infomap", top: int = 50) -> str:
        return answer(tools.cluster, path, method, top)

    @app.tool(description=AtlasTools.exemplars.__doc__)
    def exemplars(neuron: str, top: int = 5) -> str:
        return answer(tools.exemplars, neuron, top)

    if tools.budget > 0:
        @app.tool(description=AtlasTools.activations.__doc__)
        def activations(neuron: str, prompts: list[str]) -> str:
            return answer(tools.activations, neuron, prompts)

        @app.tool(description=AtlasTools.trace.__doc__)
        def trace(prompt: str, level: int = 1, method: str = "infomap") -> str:
            return answer(tools.trace, prompt, level, method)

        @app.tool(description=AtlasTools.intervene.__doc__)
        def intervene(unit: str, prompt: str, intervention: str = "zero", factor: float = 4.0,
                      method: str = "infomap") -> str:
            return answer(tools.intervene, unit, prompt, intervention, factor, method)

        @app.tool(description=AtlasTools.steer.__doc__)
        def steer(unit: str, prompt: str, intervention: str = "boost", factor: float = 4.0,
                  max_new_tokens: int = 16, method: str = "infomap") -> str:
            return answer(tools.steer, unit, prompt, intervention, factor, max_new_tokens,
                          method)

    @app.resource("atlas://tables", name="tables", mime_type="application/json",
                  description="Every table of the lake with its columns and row count.")
    def tables() -> str:
        return answer(tools.tables)

    return app


def run_mcp(lake: Lake | str, *, model: str | None = None, corpora=None,
            transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765,
            interventions: int = 0, embeddings: Any = None) -> None:
    """Serve the atlas of ``lake`` over MCP until the client goes away (stdio) or the
    process is stopped (streamable HTTP at ``http://host:port/mcp``); ``interventions``:
    calls of the tools that run the model allowed in all (0: those tools are not
    offered); ``embeddings`` (labeling.client.EmbeddingSettings): semantic label search."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.names import model_name
    from circuit_atlas.stage import as_corpora

    tools = AtlasTools(lake, None if model is None else model_name(model),
                       as_corpora(corpora) or None, interventions=interventions,
                       model_spec=model, embeddings=embeddings)
    if tools.model_spec is not None:  # token ids named as text where the tokenizer is at hand
        tools.tokenizer = optional_tokenizer(tools.model_spec)
    app = build_server(tools)
    if transport == "stdio":
        app.run("stdio")
    else:
        app.run("streamable-http", host=host, port=port)
