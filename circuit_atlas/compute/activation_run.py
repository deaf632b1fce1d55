"""The activations stage: every text of a corpus through the model, forward only,
into every MLP neuron's exemplars (top and bottom contexts) and activation statistics.

1. **Shards.** Texts (by id) are cut into windows and grouped into shards of about
   ``shard_tokens`` tokens; each shard runs the activation pass
   (:func:`compute.activations.activation_pass`) and commits its exemplar state
   (:mod:`lake.activation_shards`). With a Dask client, one task per shard, the model
   loaded once per worker. A rerun skips the texts a shard holds, so a killed job
   resumes; new texts make new shards.
2. **Merge** (:mod:`etl.exemplars`): one task per layer folds the shards' states into
   the ``activation_stats`` table and the exemplar index, from the previous version's
   state when the parameters match, so only new shards are read.
3. **Replay**: the windows the exemplars name run once more, to read each exemplar
   neuron's activation at every token of its window and the model's next-token
   predictions there: the ``exemplars`` and ``exemplar_windows`` tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from circuit_atlas.compute.activations import Window, activation_pass, replay, text_windows
from circuit_atlas.compute.exemplars import state_table
from circuit_atlas.compute.models import LoadedModel, ModelRef
from circuit_atlas.compute.params import ActivationsParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake, params_hash
from circuit_atlas.lake.activation_shards import (
    ActivationShard,
    activation_shards,
    commit_activation_shard,
    committed_texts,
    read_shard_table,
)
from circuit_atlas.lake.schemas import (
    ACTIVATION_SAMPLES,
    EXEMPLAR_WINDOWS,
    EXEMPLARS,
    TOKEN_ACTIVATIONS,
)
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake

Text = tuple[str, list[Window]]  # a text's prompt id and its windows


def run_params(model: LoadedModel | ModelRef, params: ActivationsParams) -> dict:
    """What decides a shard's content: hashed into its identity."""
    return {"k": params.k, "context": params.context, "stride": params.window_stride,
            "skip_first": params.skip_first, "dtype": model.dtype_name,
            "model_revision": model.revision}


def plan_texts(tokenizer, texts: list[tuple[str, str]], params: ActivationsParams
               ) -> list[Text]:
    """The windows of each text, in the order given, within the token budget (the text
    that crosses it is cut short)."""
    out, total = [], 0
    budget = params.max_tokens
    for pid, text in texts[:params.limit] if params.limit is not None else texts:
        if budget is not None and total >= budget:
            break
        ids = tokenizer(text).input_ids
        if budget is not None:
            ids = ids[:budget - total]
        if not ids:
            continue
        total += len(ids)
        out.append((pid, text_windows(pid, ids, params.context, params.window_stride,
                                      params.skip_first)))
    return out


def text_tokens(text: Text) -> int:
    return sum(len(w.tokens) - w.skip for w in text[1])


def budget_groups(items: list, size: Callable[[Any], int], budget: int) -> list[list]:
    """Consecutive items in groups whose sizes add up to at most ``budget`` (an item
    larger than that is a group of its own; items are never split)."""
    groups, current, total = [], [], 0
    for item in items:
        if current and total + size(item) > budget:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size(item)
    return groups + ([current] if current else [])


def shard_groups(texts: list[Text], shard_tokens: int) -> list[list[Text]]:
    """Consecutive texts in groups of about ``shard_tokens`` tokens (a text is never
    split: a shard commits whole texts)."""
    return budget_groups(texts, text_tokens, shard_tokens)


def windows_table(windows: list[Window]) -> pa.Table:
    return pa.table({
        "window_id": pa.array([w.window for w in windows], pa.int64()),
        "prompt_id": [w.doc for w in windows],
        "start": pa.array([w.start for w in windows], pa.int32()),
        "skip": pa.array([w.skip for w in windows], pa.int32()),
        "token_ids": pa.array([list(w.tokens) for w in windows], pa.list_(pa.int32())),
    })


def commit_texts(lake: Lake, model: LoadedModel, corpus: str, texts: list[Text],
                 params: ActivationsParams, on_tokens: Callable[[int], None] | None = None
                 ) -> ActivationShard | None:
    """Run one shard's texts and commit its state (None: another shard holds one of
    them already, and nothing was committed)."""
    rp = run_params(model, params)
    windows = [w for _, ws in texts for w in ws]
    states = activation_pass(model, windows, k=params.k, batch_tokens=params.batch_tokens,
                             on_batch=on_tokens)
    state = pa.concat_tables([state_table(layer, states[layer]) for layer in sorted(states)])
    return commit_activation_shard(
        lake, model.name, corpus, params=rp, params_hash=params_hash(rp),
        prompt_ids=[pid for pid, _ in texts],
        tables={"activation_state": state, "activation_windows": windows_table(windows)},
        model_revision=model.revision, model_shape=model.shape,
        rows_per_group=model.adapter.n_neurons)


def shard_task(lake: Lake, spec: str, device: str, dtype: str, corpus: str,
               texts: list[Text], params: ActivationsParams) -> int:
    """A Dask task: one shard (its texts already committed by an earlier attempt of
    this task are left out); returns the tokens it stands for."""
    from circuit_atlas.compute.workers import worker_model

    model = worker_model(spec, device, dtype)
    done = committed_texts(lake, model.name, corpus, params_hash(run_params(model, params)))
    todo = [t for t in texts if t[0] not in done]
    if todo:
        commit_texts(lake, model, corpus, todo, params)
    return sum(text_tokens(t) for t in texts)


EXEMPLAR, SAMPLE = 0, 1  # the kinds of replay index entries


def replay_index(exemplars: pa.Table, samples: pa.Table | None) -> pa.Table:
    """One index of what the replay reads: exemplars (group: the sign) and quantile
    samples (group: the bin)."""
    parts = [exemplars.rename_columns(["group" if c == "sign" else c
                                       for c in exemplars.column_names])
             .append_column("kind", pa.array(np.full(exemplars.num_rows, EXEMPLAR, np.int8)))]
    if samples is not None:
        parts.append(samples.select(parts[0].column_names[:-1]).append_column(
            "kind", pa.array(np.full(samples.num_rows, SAMPLE, np.int8))))
    return pa.concat_tables(parts, promote_options="permissive")


def exemplar_rows(model: LoadedModel, windows: list[Window], index: pa.Table,
                  batch_tokens: int, on_tokens: Callable[[int], None] | None = None
                  ) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The exemplars, activation_samples and exemplar_windows rows of the index entries
    whose windows are ``windows``: each entry's activations at every token of its
    window, by a replay."""
    wid = index.column("window_id").to_numpy()
    got = replay(model, windows, wid, index.column("layer").to_numpy(),
                 index.column("neuron").to_numpy(), batch_tokens, on_tokens)
    where = got.where
    rows = pa.table({
        **{c: index.column(c) for c in ("layer", "neuron", "group", "rank", "activation",
                                        "window_id")},
        "prompt_id": pa.array([w.doc for w in windows]).take(pa.array(where)),
        "start": np.array([w.start for w in windows], np.int32)[where],
        "position": index.column("position"),
        "acts": pa.LargeListArray.from_arrays(pa.array(got.offsets), pa.array(got.values)
                                              ).cast(pa.list_(pa.float32())),
    })
    # the index holds the exemplars, then the samples, each in its table's order
    n_ex = int(pc.sum(pc.equal(index.column("kind"), EXEMPLAR)).as_py() or 0)

    def part(name: str, rows: pa.Table) -> pa.Table:
        return rows.rename_columns([name if c == "group" else c for c in rows.column_names])

    win = pa.table({
        "window_id": pa.array([w.window for w in windows], pa.int64()),
        "prompt_id": [w.doc for w in windows],
        "start": pa.array([w.start for w in windows], pa.int32()),
        "skip": pa.array([w.skip for w in windows], pa.int32()),
        "token_ids": pa.array([list(w.tokens) for w in windows], pa.list_(pa.int32())),
        "next_tokens": pa.array([got.next_tokens[w.window].ravel() for w in windows],
                                pa.list_(pa.int32())),
    })
    return part("sign", rows.slice(0, n_ex)), part("bin", rows.slice(n_ex)), win


def replay_task(lake: Lake, model: LoadedModel | tuple[str, str, str], windows: list[Window],
                index: pa.Table, versions: tuple, name: str, batch_tokens: int,
                on_tokens: Callable[[int], None] | None = None) -> tuple[str, str, str, int]:
    """A Dask task (or a call here, with a loaded model): one group of windows replayed
    and written as a part of the exemplars, activation_samples and exemplar_windows
    versions; returns their parts and the exemplar rows."""
    if not isinstance(model, LoadedModel):
        from circuit_atlas.compute.workers import worker_model

        model = worker_model(*model)
    ex, samples, win = exemplar_rows(model, windows, index, batch_tokens, on_tokens)
    ex_version, sample_version, win_version = versions
    # sorted by layer and neuron: row groups of 64K rows let a reader of one layer skip
    # the others
    return (ex_version.write(name, ex, EXEMPLARS, row_group_size=1 << 16),
            sample_version.write(name, samples, ACTIVATION_SAMPLES, row_group_size=1 << 16),
            win_version.write(name, win, EXEMPLAR_WINDOWS), ex.num_rows)


@dataclass
class ActivationRunReport(Report):
    model: str
    corpus: str
    params_hash: str
    texts: int
    skipped: int
    tokens: int
    shards: int
    merged: int
    exemplars: int
    seconds: float
    dtype: str = ""

    def __str__(self) -> str:
        merged = ("tables up to date" if self.merged == 0 and self.shards == 0
                  else f"{self.merged} shard(s) merged, {self.exemplars:,} exemplars")
        return (f"activations {self.corpus}: {self.texts} text(s) run ({self.tokens:,} "
                f"tokens, {self.shards} shard(s)), {self.skipped} already committed; "
                f"{merged}; {self.seconds:.1f} s (model {self.model}, {self.dtype}, params "
                f"{self.params_hash})")


@dataclass
class ActivationsReport(Report):
    runs: list[ActivationRunReport]

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.runs)


def run_activations(lake: Lake | str, *, model: str | LoadedModel, corpora: str | list[str],
                    params: ActivationsParams | None = None, cluster=None,
                    progress: Progress | None = None) -> ActivationsReport:
    """Compute every neuron's exemplars and activation statistics over ``corpora``
    (the ``exemplars``, ``exemplar_windows``, ``activation_stats``,
    ``activation_samples`` and ``token_activations`` tables of each corpus), running
    only the texts not yet committed and merging only new shards.

    ``model``: a name (loaded here, or by each Dask worker) or a loaded model.
    ``cluster``: None or 'none' runs everything in this process; 'local', 'slurm', an
    address or a Client run one task per shard, per layer and per replay group.
    """
    from circuit_atlas.compute.models import load_tokenizer
    from circuit_atlas.compute.workers import compute_session, worker_resources

    lake, params = open_lake(lake), params or ActivationsParams()
    progress = progress or Progress()
    corpora = as_corpora(corpora)
    for corpus in corpora:
        lake.check_corpus(corpus)
    with compute_session(model, params.device, params.dtype, "activations", cluster,
                         progress) as (client, ready):
        tokenizer = ready.tokenizer if isinstance(ready, LoadedModel) else load_tokenizer(model)
        resources = worker_resources(client, params.device) if client is not None else None
        job = _Job(lake, ready, params, progress, client, resources,
                   model if isinstance(model, str) else None)
        runs = [job.run(corpus, tokenizer) for corpus in corpora]
    return ActivationsReport(runs)


@dataclass
class _Job:
    lake: Lake
    model: LoadedModel | ModelRef
    params: ActivationsParams
    progress: Progress
    client: object
    resources: dict | None
    spec: str | None

    @property
    def worker_key(self) -> tuple[str, str, str]:
        return (self.spec or self.model.name, self.model.device, self.model.dtype_name)

    def run(self, corpus: str, tokenizer) -> ActivationRunReport:
        t0 = time.perf_counter()
        lake, params, model = self.lake, self.params, self.model
        phash = params_hash(run_params(model, params))
        texts = (lake.scan("prompts", corpus=corpus).select("prompt_id", "text")
                 .sort("prompt_id").collect().rows())
        planned = plan_texts(tokenizer, texts, params)
        done = committed_texts(lake, model.name, corpus, phash)
        todo = [t for t in planned if t[0] not in done]
        groups = shard_groups(todo, params.shard_tokens)
        tokens = sum(text_tokens(t) for t in todo)
        self._shards(corpus, groups, tokens)
        shards = activation_shards(lake, model.name, corpus, phash)
        merged, exemplars = self._merge(corpus, shards, phash) if shards else (0, 0)
        return ActivationRunReport(model.name, corpus, phash, len(todo),
                                   len(planned) - len(todo), tokens, len(groups), merged,
                                   exemplars, time.perf_counter() - t0, model.dtype_name)

    def _shards(self, corpus: str, groups: list[list[Text]], total: int) -> None:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            self.progress.update(f"activations {corpus}", done, total)

        if self.client is None:
            for group in groups:
                commit_texts(self.lake, self.model, corpus, group, self.params, tick)
            return
        from distributed import as_completed

        spec, device, dtype = self.worker_key
        futures = [self.client.submit(shard_task, self.lake, spec, device, dtype, corpus,
                                      group, self.params, resources=self.resources, pure=False)
                   for group in groups]
        for future in as_completed(futures):
            tick(future.result())

    def _merge(self, corpus: str, shards: list[ActivationShard], phash: str
               ) -> tuple[int, int]:
        """Merge, replay and publish; (shards merged, exemplar rows), (0, 0) when the
        tables already hold every shard."""
        from circuit_atlas.compute.samples import sample_windows
        from circuit_atlas.etl.exemplars import bin_edges, layer_file, merge_task, stats_task
        from circuit_atlas.lake.derived import TableVersion

        lake, name = self.lake, self.model.name
        ids = [s.shard for s in shards]
        current = lake.table_manifest(name, corpus, "activation_stats")
        inputs = (current or {}).get("inputs", {})
        held = set(inputs.get("shards", [])) if inputs.get("params_hash") == phash else set()
        if held and held == set(ids):
            return 0, 0
        resume = bool(held) and held <= set(ids)
        base = {}
        if resume:
            base = {int(p.rsplit("layer-", 1)[1][:3]): p for p in inputs.get("state", [])}
        fresh = [s for s in shards if not resume or s.shard not in held]
        n_layers = shards[0].record["model_shape"]["n_layers"]
        versions = {t: TableVersion(lake, name, corpus, t) for t in (
            "activation_stats", "exemplars", "activation_samples", "exemplar_windows",
            "token_activations")}
        stats = versions["activation_stats"]
        self.progress.message(f"merging {len(fresh)} activation shard(s) of {corpus} ...")
        merged = self._tasks(merge_task, [(lake, stats, fresh, layer, base.get(layer))
                                          for layer in range(n_layers)])
        states = [r[0] for r in merged]
        windows = self._all_windows(shards)
        samples = sample_windows(list(windows.values()), self.params.sample_tokens)
        self.progress.message(f"sampling {len(samples)} window(s) of {corpus} ...")
        picked, tokens, corr, corr_tokens = self._sample(
            samples, {layer: r[2] for layer, r in enumerate(merged)})
        index = replay_index(pa.concat_tables([r[1] for r in merged]), picked)
        wanted = np.unique(index.column("window_id").to_numpy())
        parts = self._replay(corpus, [windows[w] for w in wanted.tolist()], index,
                             (versions["exemplars"], versions["activation_samples"],
                              versions["exemplar_windows"]))
        stat_parts = self._tasks(stats_task, [(lake, stats, layer, states[layer],
                                               corr.get(layer), corr_tokens)
                                              for layer in range(n_layers)])
        if any(layer_file(i) not in p for i, p in enumerate(stat_parts)):
            raise CircuitAtlasError("activation merge: a layer's part is missing")
        common = {"params_hash": phash, "params": shards[0].record["params"]}
        token_parts = ([] if tokens is None else
                       [versions["token_activations"].write("tokens.parquet", tokens,
                                                            TOKEN_ACTIVATIONS)])
        sampled = {**common, "sample_tokens": self.params.sample_tokens,
                   "sample_windows": len(samples)}
        # readers of the statistics find every table they refer to: those first
        versions["exemplar_windows"].publish(parts[2], common)
        versions["exemplars"].publish(parts[0], common)
        versions["activation_samples"].publish(parts[1], sampled)
        versions["token_activations"].publish(token_parts, sampled)
        stats.publish(stat_parts, {**common, "shards": ids, "state": states,
                                   "bin_edges": bin_edges(), **sampled,
                                   "tokens": int(sum(s.record["tokens"] for s in shards))})
        stats.drop_scratch()
        return len(fresh), parts[3]

    def _tasks(self, fn, args: list[tuple]) -> list:
        """``fn`` over ``args`` here, or one Dask task each."""
        if self.client is None:
            return [fn(*a) for a in args]
        return self.client.gather([self.client.submit(fn, *a, pure=False) for a in args])

    def _all_windows(self, shards: list[ActivationShard]) -> dict[int, Window]:
        """Every window the shards ran, by id."""
        out = {}
        for shard in shards:
            t = read_shard_table(self.lake, shard, "activation_windows")
            for w, pid, start, skip, toks in zip(*(t.column(c).to_pylist() for c in (
                    "window_id", "prompt_id", "start", "skip", "token_ids")), strict=True):
                out[w] = Window(w, pid, start, tuple(toks), skip)
        return out

    def _sample(self, windows: list[Window], layer_bounds: dict) -> tuple:
        """The quantile samples and token means over the sample windows (one task on a
        worker, which holds the model, when there is a cluster)."""
        from circuit_atlas.compute.samples import sample_task

        if self.client is None:
            return sample_task(self.model, windows, layer_bounds, self.params.batch_tokens)
        return self.client.submit(sample_task, self.worker_key, windows, layer_bounds,
                                  self.params.batch_tokens, resources=self.resources,
                                  pure=False).result()

    def _replay(self, corpus: str, windows: list[Window], index: pa.Table, versions: tuple
                ) -> tuple[list[str], list[str], list[str], int]:
        groups = _window_groups(windows, self.params.shard_tokens)
        wid = index.column("window_id")
        total = sum(len(w.tokens) for w in windows)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            self.progress.update(f"exemplars {corpus}", done, total)

        tasks = []
        for i, group in enumerate(groups):
            ids = pa.array([w.window for w in group], pa.int64())
            part = index.filter(pc.is_in(wid, value_set=ids))
            tasks.append((group, part, versions, f"part-{i:05d}.parquet"))
        if self.client is None:
            results = [replay_task(self.lake, self.model, g, p, v, n,
                                   self.params.batch_tokens, tick) for g, p, v, n in tasks]
        else:
            from distributed import as_completed

            futures = {self.client.submit(replay_task, self.lake, self.worker_key, g, p, v, n,
                                          self.params.batch_tokens, resources=self.resources,
                                          pure=False): sum(len(w.tokens) for w in g)
                       for g, p, v, n in tasks}
            results = []
            for future in as_completed(futures):
                results.append(future.result())
                tick(futures[future])
        return ([r[0] for r in results], [r[1] for r in results], [r[2] for r in results],
                sum(r[3] for r in results))


def _window_groups(windows: list[Window], tokens: int) -> list[list[Window]]:
    """The replay's task groups: windows by length, about ``tokens`` tokens each."""
    return budget_groups(sorted(windows, key=lambda w: (len(w.tokens), w.window)),
                         lambda w: len(w.tokens), tokens)
